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
from bbfl.memory import peak_memory_mb
from bbfl.methods.fedkseed import FedKSeed, FedKSeedConfig
from bbfl.methods.fwdllm import FwdLLM, FwdLLMConfig
from bbfl.peft import PeftConfig, PeftWeights

REPLAY = """
import sys, numpy as np
from safetensors.numpy import save_file
from bbfl.blackbox import LocalBlackBox
from bbfl.io import load_arrays
from bbfl.memory import peak_memory_mb
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
    for k in finals["dense"]:  # the same float32 operations in the same order on client and server
        np.testing.assert_array_equal(finals["seed"][k], finals["dense"][k])
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

    from bbfl.optim.zeroth_order import direction

    picky = _method(tiny, perturbations=1, max_perturbations=1, candidates=10)
    shapes = [v.shape for v in arrays.values()]
    for planted in (3, 8):  # the previous gradient *is* candidate `planted`'s direction (cosine 1)
        prev = {"prev/" + k: d.numpy() for k, d in zip(arrays, direction(shapes, 1, planted))}
        _, head = picky.client_update(0, 1, {**arrays, **prev}, header, seed=1)
        assert head["steps"] == [planted]
        _, head = picky.client_update(0, 1, {**arrays, **{k: -v for k, v in prev.items()}}, header, seed=1)
        assert head["steps"] != [planted]  # its opposite is the least aligned candidate
    picky.weights.remove()


def test_pacing_takes_two_directions_before_reading_a_variance(tiny):
    from bbfl.exceptions import ConfigError
    from bbfl.methods.fwdllm.method import probe_variance

    with pytest.raises(ConfigError, match="got 1"):
        probe_variance([torch.ones(3)])
    with pytest.raises(ConfigError, match="max_perturbations >= 2"):
        FwdLLMConfig(perturbations=1, max_perturbations=1, variance_threshold=0.1)
    lenient = _method(tiny, perturbations=1, max_perturbations=6, variance_threshold=1e9)
    arrays, header = lenient.downlink(1)
    assert len(lenient.client_update(0, 1, arrays, header, seed=1)[1]["steps"]) == 2
    lenient.weights.remove()


def _client_loss(method, weights: dict, data) -> float:
    method.weights.load_arrays(weights)
    return method.weights.forward_loss(data)


def test_fwdllm_server_step_lowers_the_training_loss(tiny):
    # one client whose batch is all its data: a small step along -g must lower that loss (a flipped sign
    # anywhere between the estimate and the server's update would raise it)
    bb, clients, test = tiny
    m = FwdLLM(FwdLLMConfig(peft="bitfit", seed=7, batch_size=64, perturbations=4, lr=0.05), bb, clients, test, 1)
    before = dict(m.global_weights)
    arrays, header = m.downlink(1)
    update, head = m.client_update(0, 1, arrays, header, seed=3)
    m.aggregate(1, [(0, update, head)])
    assert _client_loss(m, m.global_weights, clients[0]) < _client_loss(m, before, clients[0])
    m.weights.remove()


def test_fedkseed_server_step_lowers_the_training_loss(tiny):
    bb, clients, test = tiny
    cfg = FedKSeedConfig(peft="bitfit", num_seeds=64, local_steps=1, batch_size=64, lr=0.05, seed=7)
    m = FedKSeed(cfg, bb, clients, test)
    before = m.global_weights()
    arrays, header = m.downlink(1)
    update, head = m.client_update(0, 1, arrays, header, seed=3)
    m.aggregate(1, [(0, update, head)])
    after = m.global_weights()
    assert not all(np.array_equal(after[k], before[k]) for k in after)
    assert _client_loss(m, after, clients[0]) < _client_loss(m, before, clients[0])
    m.weights.remove()


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


def test_fedkseed_pro_probabilities_by_hand():
    from bbfl.methods.fedkseed import seed_probabilities

    # histories (each starts with one 0): seed 0 [0, 2, -4] -> amp 2; seed 1 [0] -> 0; seed 2 [0, -1] -> 0.5;
    # seed 3 [0, 3000 clipped to 1000] -> 500. min-max: [0.004, 0, 0.001, 1]; softmax: e^x / 5.7233
    amps = np.array([2.0, 0.0, 0.5, 500.0])
    normalised = amps / (500.0 + 1e-10)
    expected = np.exp(normalised) / np.exp(normalised).sum()
    assert expected.round(4).tolist() == [0.1754, 0.1747, 0.1749, 0.475]
    np.testing.assert_allclose(
        seed_probabilities(np.array([6.0, 0.0, 1.0, 1000.0]), np.array([3, 1, 2, 2])), expected, rtol=1e-12
    )
    # signed sums cancel (+1 - 1 = 0), magnitudes do not: seed 0 beats the never-used seed 1
    p = seed_probabilities(np.array([2.0, 0.0]), np.array([3, 1]))
    assert p[0] > p[1] and p.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(seed_probabilities(np.zeros(5), np.ones(5)), 0.2)  # nothing yet: uniform


def test_fedkseed_pro_server_history_drives_the_next_round(tiny, tmp_path):
    bb, clients, test = tiny
    cfg = FedKSeedConfig(peft="bitfit", num_seeds=16, local_steps=4, batch_size=8, lr=0.05, seed=7, pro=True)
    m = FedKSeed(cfg, bb, clients, test)
    arrays, header = m.downlink(1)
    np.testing.assert_allclose(arrays["seed_probabilities"], 1 / 16)  # round 1: uniform
    updates = [(c, *m.client_update(c, 1, arrays, header, seed=10 + c)) for c in range(2)]
    m.aggregate(1, updates)
    counts = sum(u["counts"] for _, u, _ in updates)
    assert counts.sum() == 2 * 4 and np.array_equal(m.counts, 1 + counts)
    used = counts > 0
    amps = m.abs_sums / m.counts
    assert (amps[used] > 0).all() and (amps[~used] == 0).all()
    probs = m.downlink(2)[0]["seed_probabilities"]
    assert probs[used].min() > probs[~used].max()  # seeds with larger history are drawn more
    saved = m.state()
    m.weights.remove()
    again = FedKSeed(cfg, bb, clients, test)
    again.load_state(*saved)
    np.testing.assert_array_equal(again.downlink(2)[0]["seed_probabilities"], probs)
    again.weights.remove()


def test_half_precision_step_below_resolution_warns():
    from bbfl.optim.zeroth_order import warn_if_step_unresolved

    with pytest.warns(UserWarning, match=r"eps=0.0005 is below what a bfloat16 forward resolves \(>= 0.005\)"):
        assert warn_if_step_unresolved(5e-4, torch.bfloat16, "eps")
    assert not warn_if_step_unresolved(5e-4, torch.float32, "eps")
    assert not warn_if_step_unresolved(1e-2, torch.bfloat16, "h")


@pytest.mark.parametrize("command", ["fwdllm", "fedkseed"])
def test_cli_runs_resumes_and_reports_peak_memory(tiny_models, tmp_path, command):
    import json

    from typer.testing import CliRunner

    from bbfl.cli import app

    args = [command, "--model", str(tiny_models["bert"]), "--rounds", "2", "--clients", "3", "--k-shot", "6"]
    args += ["--test-limit", "10", "--peft", "bitfit", "--out", str(tmp_path), "--eval-every", "2"]
    args += ["--local-steps", "2"] if command == "fedkseed" else ["--uplink", "seed"]
    peak_before = peak_memory_mb()["cpu_peak_rss_mb"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    run_dir = next(tmp_path.iterdir())
    summary = json.loads((run_dir / "summary.json").read_text())
    # the process's own peak RSS (MB) while the run was in it: a wrong unit or source would leave the bracket
    assert summary["rounds"] == 2 and peak_before <= summary["cpu_peak_rss_mb"] <= peak_memory_mb()["cpu_peak_rss_mb"]
    assert {"accuracy_vs_round.png", "peft.safetensors", "metrics.jsonl"} <= {p.name for p in run_dir.iterdir()}
    # --eval-every 2: round 1 trains without scoring the test split (its line shows a dash), round 2 scores it
    logged = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    rounds = [r for r in logged if r.get("phase") == "round"]
    assert [("test_accuracy" in r) for r in rounds] == [True, False, True] and "test acc –" in result.output
    metrics, weights = (run_dir / "metrics.jsonl").read_bytes(), load_arrays(run_dir / "peft.safetensors")[0]
    resumed = CliRunner().invoke(app, [command, "--resume", str(run_dir)])  # already done: nothing to redo
    assert resumed.exit_code == 0, resumed.output
    assert (run_dir / "metrics.jsonl").read_bytes() == metrics  # no round re-run, no record appended
    again = load_arrays(run_dir / "peft.safetensors")[0]
    assert sorted(again) == sorted(weights) and all(np.array_equal(again[k], weights[k]) for k in weights)
    assert json.loads((run_dir / "summary.json").read_text()) == summary  # same queries, same accuracy
    bad = CliRunner().invoke(app, [command, "--peft", "qlora", "--out", str(tmp_path)])
    assert bad.exit_code != 0 and "qlora" in bad.output and "lora, bitfit" in bad.output


def test_dp_clips_each_client_estimate(tiny):
    m = _method(tiny, perturbations=2, max_perturbations=2, dp_clip=0.01)
    arrays, header = m.downlink(1)
    update, _ = m.client_update(0, 1, arrays, header, seed=2)
    m.weights.remove()
    assert np.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for v in update.values())) <= 0.01 * (1 + 1e-5)
