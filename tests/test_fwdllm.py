"""FwdLLM and FedKSeed: PEFT hooks, forward gradients vs autograd, seed uplink, replay in another process."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from bbfl.blackbox import LocalBlackBox
from bbfl.data import load_task
from bbfl.federation.engine import EngineConfig, run_federation
from bbfl.io import load_arrays
from bbfl.methods.fedkseed import FedKSeed, FedKSeedConfig
from bbfl.methods.fwdllm import FwdLLM, FwdLLMConfig
from bbfl.peft import PeftConfig, PeftWeights

REPLAY = """
import sys, numpy as np
from safetensors.numpy import save_file
from bbfl.blackbox import LocalBlackBox
from bbfl.io import load_arrays
from bbfl.methods.fedkseed import replay
from bbfl.peft import PeftConfig, PeftWeights
model, state, out = sys.argv[1:4]
initial = PeftWeights(LocalBlackBox(model, prompt_attention="full"), PeftConfig("lora", rank=2), seed=7).to_arrays()
coefficients = load_arrays(state)[0]["coefficients"]
save_file({k: t.numpy() for k, t in zip(initial, replay(initial, coefficients, 7))}, out)
"""


@pytest.fixture(scope="module")
def tiny(tiny_models):
    bb = LocalBlackBox(str(tiny_models["bert"]), prompt_attention="full")
    task = load_task("demo")
    clients = [bb.encode(task, task.train.subset(range(i, 40, 4))) for i in range(4)]
    return bb, clients, bb.encode(task, task.test.head(20))


def _scores(bb, data, weights=None):
    with torch.inference_mode():
        return weights.scores(data) if weights is not None else bb.forward(None, data)[0]


@pytest.mark.parametrize("kind", ["lora", "bitfit", "adapter", "full"])
def test_peft_starts_at_the_frozen_model_and_never_touches_it(tiny, kind):
    bb, clients, _ = tiny
    frozen = {k: v.clone() for k, v in bb.model.state_dict().items()}
    before = _scores(bb, clients[0])
    weights = PeftWeights(bb, PeftConfig(kind, rank=2), seed=0)
    assert weights.num_parameters > 0
    torch.testing.assert_close(_scores(bb, clients[0], weights), before)  # zero-initialised deltas
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in weights.params():  # random, not constant: LayerNorm would cancel a uniform shift
            t.add_(0.05 * torch.randn(t.shape, generator=g))
    assert not torch.allclose(_scores(bb, clients[0], weights), before)  # the hooks do change the forward
    weights.remove()
    torch.testing.assert_close(_scores(bb, clients[0]), before)
    assert all(torch.equal(v, frozen[k]) for k, v in bb.model.state_dict().items())


def test_lora_targets_llama_projections(tiny_models):
    bb = LocalBlackBox(str(tiny_models["llama"]), prompt_attention="full")
    weights = PeftWeights(bb, PeftConfig("lora", rank=2), seed=0)
    assert any("q_proj.lora_A" in k for k in weights.tensors) and any("v_proj.lora_B" in k for k in weights.tensors)
    weights.remove()


def _method(tiny, rounds=2, **overrides):
    bb, clients, test = tiny
    cfg = FwdLLMConfig(**{"peft": "bitfit", "seed": 7, "batch_size": 8, **overrides})
    return FwdLLM(cfg, bb, clients, test, rounds=rounds)


def test_forward_gradient_agrees_with_autograd_in_expectation(tiny):
    exact_m = _method(tiny, estimator="backprop")
    arrays, header = exact_m.downlink(1)
    exact, _ = exact_m.client_update(0, 1, arrays, header, seed=3)
    exact_m.weights.remove()
    n = 600
    fwd_m = _method(tiny, perturbations=n, max_perturbations=n)
    estimate, head = fwd_m.client_update(0, 1, arrays, header, seed=3)  # same seed: the same batch
    fwd_m.weights.remove()
    assert len(head["steps"]) == n and head["queries"] == 2 * n
    flat = [np.concatenate([d[k].ravel() for k in sorted(d)]) for d in (exact, estimate)]
    cosine = float(flat[0] @ flat[1] / np.linalg.norm(flat[0]) / np.linalg.norm(flat[1]))
    dim = flat[0].size
    # E[s z] = grad; the mean of n single-direction estimates has cosine ~ sqrt(n / (n + dim)) with it
    expected = (n / (n + dim)) ** 0.5
    assert cosine > 0.6 * expected, (cosine, expected, dim)
    assert 0.2 < np.linalg.norm(flat[1]) / np.linalg.norm(flat[0]) / (1 + dim / n) ** 0.5 < 5


def test_jvp_matches_central_difference_direction_by_direction(tiny):
    scalars = {}
    for estimator in ("central", "jvp"):
        m = _method(tiny, estimator=estimator, perturbations=4, max_perturbations=4, uplink="seed")
        arrays, header = m.downlink(1)
        update, head = m.client_update(1, 1, arrays, header, seed=11)
        scalars[estimator] = update["scalars"]
        m.weights.remove()
    np.testing.assert_allclose(scalars["jvp"], scalars["central"], rtol=0.05, atol=1e-3)
    assert np.abs(scalars["jvp"]).max() > 1e-3  # not trivially zero


def test_seed_uplink_reaches_the_same_model_with_a_fraction_of_the_bytes(tiny, tmp_path):
    finals, bytes_up = {}, {}
    for uplink in ("dense", "seed"):
        m = _method(tiny, perturbations=2, max_perturbations=2, uplink=uplink, lr=0.01)
        records = run_federation(m, EngineConfig(rounds=2, seed=5), tmp_path / uplink)
        finals[uplink], bytes_up[uplink] = m.global_weights, records[-1]["bytes_up_per_client"]
        m.weights.remove()
    for k in finals["dense"]:
        np.testing.assert_allclose(finals["seed"][k], finals["dense"][k], rtol=1e-4, atol=1e-6)
    assert not all(np.array_equal(finals["dense"][k], np.zeros_like(finals["dense"][k])) for k in finals["dense"])
    assert bytes_up["seed"] < 1000 < bytes_up["dense"] / 5, bytes_up


def test_variance_pacing_and_discriminative_sampling(tiny):
    never = _method(tiny, perturbations=2, max_perturbations=6, variance_threshold=1e9)
    arrays, header = never.downlink(1)
    assert len(never.client_update(0, 1, arrays, header, seed=1)[1]["steps"]) == 2  # low variance: stop at 2
    never.weights.remove()
    always = _method(tiny, perturbations=2, max_perturbations=6, variance_threshold=1e-30)
    assert len(always.client_update(0, 1, arrays, header, seed=1)[1]["steps"]) == 6  # never low enough: the cap
    always.weights.remove()

    picky = _method(tiny, perturbations=1, max_perturbations=1, candidates=10)
    prev = {k: np.random.default_rng(0).normal(size=v.shape).astype(np.float32) for k, v in arrays.items()}
    _, head = picky.client_update(0, 1, {**arrays, **{"prev/" + k: v for k, v in prev.items()}}, header, seed=1)
    picky.weights.remove()
    assert 0 <= head["steps"][0] < 10
    from bbfl.optim.zeroth_order import direction

    flat_prev = np.concatenate([prev[k].ravel() for k in picky.names])
    shapes = [v.shape for v in arrays.values()]
    cos = []
    for i in range(10):
        z = np.concatenate([d.numpy().ravel() for d in direction(shapes, 1, i)])
        cos.append(z @ flat_prev / np.linalg.norm(z) / np.linalg.norm(flat_prev))
    assert head["steps"][0] == int(np.argmax(cos))  # the candidate most aligned with the previous gradient


def test_fedkseed_messages_and_replay_in_another_process(tiny, tiny_models, tmp_path):
    bb, clients, test = tiny
    cfg = FedKSeedConfig(peft="lora", rank=2, alpha=4.0, num_seeds=4096, local_steps=3, batch_size=8, lr=0.05, seed=7)
    method = FedKSeed(cfg, bb, clients, test)
    records = run_federation(method, EngineConfig(rounds=2, seed=1), tmp_path / "run")
    local = method.global_weights()
    method.weights.remove()
    # K = 4096 fp32 scalars each way, plus the message header: FedKSeed's "under 18 KB"
    assert records[-1]["bytes_up_per_client"] <= 18 * 1024 and records[-1]["bytes_down_per_client"] <= 18 * 1024
    assert 0 < records[-1]["seeds_used"] <= 2 * 4 * 3  # rounds x clients x local steps
    out = tmp_path / "replayed.safetensors"
    state = tmp_path / "run" / "server_state.safetensors"
    env = {"OMP_NUM_THREADS": "1", "PATH": "", "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", REPLAY, str(tiny_models["bert"]), str(state), str(out)], check=True, env=env)
    remote, _ = load_arrays(out)
    assert sorted(remote) == sorted(local)
    for k in local:
        np.testing.assert_array_equal(remote[k], local[k])
    assert any(np.abs(local[k]).sum() > 0 for k in local if k.endswith("lora_B"))  # training moved B off zero


def test_fedkseed_pro_prefers_seeds_with_large_history():
    from bbfl.methods.fedkseed import seed_probabilities

    c = np.zeros(8, dtype=np.float32)
    assert seed_probabilities(c, pro=True) is None  # nothing learned yet: uniform
    c[3] = 2.0
    p = seed_probabilities(c, pro=True)
    assert p.argmax() == 3 and p.min() > 0 and p.sum() == pytest.approx(1.0)
    assert seed_probabilities(c, pro=False) is None


@pytest.mark.parametrize("command", ["fwdllm", "fedkseed"])
def test_cli_runs_resumes_and_reports_peak_memory(tiny_models, tmp_path, command):
    import json

    from typer.testing import CliRunner

    from bbfl.cli import app

    args = [command, "--model", str(tiny_models["bert"]), "--rounds", "2", "--clients", "3", "--k-shot", "6"]
    args += ["--test-limit", "10", "--peft", "bitfit", "--out", str(tmp_path)]
    args += ["--local-steps", "2"] if command == "fedkseed" else ["--uplink", "seed"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    run_dir = next(tmp_path.iterdir())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["cpu_peak_rss_mb"] > 50
    assert {"accuracy_vs_round.png", "peft.safetensors", "metrics.jsonl"} <= {p.name for p in run_dir.iterdir()}
    resumed = CliRunner().invoke(app, [command, "--resume", str(run_dir)])  # already done: nothing to redo
    assert resumed.exit_code == 0, resumed.output
    bad = CliRunner().invoke(app, [command, "--peft", "qlora", "--out", str(tmp_path)])
    assert bad.exit_code != 0 and "qlora" in bad.output and "lora, bitfit" in bad.output


def test_dp_clips_each_client_estimate(tiny):
    m = _method(tiny, perturbations=2, max_perturbations=2, dp_clip=0.01)
    arrays, header = m.downlink(1)
    update, _ = m.client_update(0, 1, arrays, header, seed=2)
    m.weights.remove()
    assert np.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for v in update.values())) <= 0.01 * (1 + 1e-5)
