"""Forward-only gradient estimates: exact restore, unbiasedness against autograd, replay in another process."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from bbfl.optim.zeroth_order import (
    Perturbation,
    apply_seed_update,
    central_difference,
    direction,
    jvp_gradient,
)

REPLAY = """
import sys, torch
from safetensors.torch import save_file
from bbfl.optim.zeroth_order import apply_seed_update
w = [torch.linspace(-1, 1, 60).reshape(6, 10).clone(), torch.full((7,), 0.25)]
for step, scalar in enumerate([0.3, -1.7, 2.25, 1e-3]):
    apply_seed_update(w, seed=11, step=step, scalar=scalar, lr=0.05)
save_file({"a": w[0], "b": w[1]}, sys.argv[1])
"""


def _linear_problem():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 8, generator=g), torch.randint(0, 4, (64,), generator=g)
    w = torch.randn(4, 8, generator=g) * 0.3

    def loss_of(tensors):
        return torch.nn.functional.cross_entropy(x @ tensors[0].T, y)

    return w, loss_of


def test_directions_are_a_pure_function_of_seed_and_step():
    a = direction([torch.Size([3, 4]), torch.Size([5])], seed=7, step=2)
    b = direction([torch.Size([3, 4]), torch.Size([5])], seed=7, step=2)
    c = direction([torch.Size([3, 4]), torch.Size([5])], seed=7, step=3)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])


def test_perturb_restore_is_bit_identical(tiny_models):
    from transformers import AutoModelForMaskedLM

    model = AutoModelForMaskedLM.from_pretrained(tiny_models["bert"])
    params = [p for n, p in model.named_parameters() if "bias" in n]  # BitFit's tensors
    before = [p.detach().clone() for p in params]
    pert = Perturbation(params)
    z = direction([p.shape for p in params], seed=1, step=0)
    for scale in (1e-3, -1e-3, 0.37):  # scales whose +/- round trip would not be exact in fp32
        pert.apply(z, scale)
    assert not torch.equal(params[0], before[0])
    pert.restore()
    assert all(torch.equal(p, b) for p, b in zip(params, before))


def test_central_difference_is_unbiased_on_a_linear_model():
    w, loss_of = _linear_problem()
    exact = w.clone().requires_grad_(True)
    loss_of([exact]).backward()
    with torch.inference_mode():
        draws = [central_difference(lambda: float(loss_of([w])), [w], seed=3, step=i, h=1e-3) for i in range(4000)]
    estimate = sum(s * z[0] for s, z in draws) / len(draws)
    cosine = torch.nn.functional.cosine_similarity(estimate.flatten(), exact.grad.flatten(), dim=0)
    rel = float((estimate - exact.grad).norm() / exact.grad.norm())
    # d = 32: the mean of N estimates has relative error ~ sqrt(d / N) ~ 0.09 around the true gradient
    assert cosine > 0.98 and rel < 0.2, (float(cosine), rel)


def test_forward_gradient_of_a_soft_prompt_through_a_transformer(tiny_models):
    from bbfl.blackbox import LocalBlackBox
    from bbfl.data import load_task

    bb = LocalBlackBox(str(tiny_models["bert"]), prompt_attention="full")
    task = load_task("demo")
    data = bb.encode(task, task.train.head(6))
    prompt = (torch.randn(1, 2, bb.hidden_size, generator=torch.Generator().manual_seed(0)) * 0.5).requires_grad_(True)
    torch.nn.functional.cross_entropy(bb.forward(prompt, data)[0], data.labels).backward()
    exact = prompt.grad.clone()
    weights = prompt.detach().clone()

    def loss() -> float:
        with torch.inference_mode():
            return float(torch.nn.functional.cross_entropy(bb.forward(weights, data)[0], data.labels))

    k = 600  # SPSA: k central differences along seeded directions, estimate = mean_i s_i z_i
    pairs = [central_difference(loss, [weights], seed=5, step=i, h=1e-2) for i in range(k)]
    scalars, estimate = [s for s, _ in pairs], [sum(s * z[0] for s, z in pairs) / k]
    cosine = torch.nn.functional.cosine_similarity(estimate[0].flatten(), exact.flatten(), dim=0)
    assert len(scalars) == 600 and cosine > 0.6, float(cosine)  # ~0.9 expected for d = 128, N = 600


def test_jvp_equals_autograd_directional_derivative():
    w, loss_of = _linear_problem()
    exact = w.clone().requires_grad_(True)
    loss_of([exact]).backward()
    s, z = jvp_gradient(loss_of, [w], seed=9, step=4)
    assert s == pytest.approx(float((exact.grad * z[0]).sum()), rel=1e-5, abs=1e-7)


def test_seed_replay_in_another_process_is_bit_identical(tmp_path):
    from safetensors.torch import load_file

    local = [torch.linspace(-1, 1, 60).reshape(6, 10).clone(), torch.full((7,), 0.25)]
    for step, scalar in enumerate([0.3, -1.7, 2.25, 1e-3]):
        apply_seed_update(local, seed=11, step=step, scalar=scalar, lr=0.05)
    out = tmp_path / "replayed.safetensors"
    subprocess.run([sys.executable, "-c", REPLAY, str(out)], check=True, env={"OMP_NUM_THREADS": "1", "PATH": ""})
    remote = load_file(out)
    assert torch.equal(remote["a"], local[0]) and torch.equal(remote["b"], local[1])
    assert not np.allclose(local[0].numpy(), np.linspace(-1, 1, 60).reshape(6, 10))  # the updates did move it
