"""ZooPFL: the ZO code-gradient against autograd, private state stays private, per-client state resumes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bbfl.blackbox import LocalBlackBox
from bbfl.data import load_task
from bbfl.federation import engine as engine_module
from bbfl.federation.engine import EngineConfig
from bbfl.io import load_arrays
from bbfl.methods.zoopfl import ZooPFLConfig, zo_code_gradient
from bbfl.pipeline import BlackBoxConfig, PersonalDataConfig, run_zoopfl_experiment

SMALL = dict(hidden_dim=16, latent_dim=4, client_embed_dim=2, prompt_length=2, local_steps=2, pretrain_steps=5)


def _run(tmp_path, tiny_models, name, rounds=3, **kw):
    data = PersonalDataConfig(task="demo", k_shot=12, num_clients=3, partition="dirichlet", alpha=0.5, test_limit=20)
    return run_zoopfl_experiment(
        data,
        ZooPFLConfig(**SMALL),
        EngineConfig(rounds=rounds, seed=2),
        BlackBoxConfig(model=str(tiny_models["bert"])),
        out_root=tmp_path / name,
        **kw,
    )


@pytest.mark.parametrize(("estimator", "q", "min_cosine"), [("coordinate", 6, 0.99), ("random", 24, 0.5)])
def test_zo_code_gradient_matches_autograd(tiny_models, estimator, q, min_cosine):
    """On a white-box model the ZO estimate in code space must point where the true gradient points.

    (Random 6-D directions would give |cosine| ~ 0.2 over these 24 numbers; the tiny model's gradient is
    small, ~7e-4, so mu = 0.03 keeps the float32 finite differences above rounding noise.)"""
    bb = LocalBlackBox(str(tiny_models["bert"]), prompt_attention="full")
    task = load_task("demo")
    data = bb.encode(task, task.train.head(4))
    torch.manual_seed(0)
    decoder = torch.randn(3 * bb.hidden_size, 6) * bb.embedding_std
    p0 = bb.token_embeddings(".", 3)

    def prefixes(codes: torch.Tensor) -> torch.Tensor:
        return (codes @ decoder.T).unflatten(-1, (3, bb.hidden_size)) + p0

    def loss_at(codes: torch.Tensor) -> torch.Tensor:
        scores = bb.paired_logits(prefixes(codes), data)
        flat = torch.nn.functional.cross_entropy(scores.flatten(0, 1), data.labels.repeat(len(codes)), reduction="none")
        return flat.view(len(codes), -1)

    code = torch.rand(len(data), 6) * 2 - 1
    exact = code.clone().requires_grad_(True)
    scores = bb.forward(prefixes(exact)[None], data, paired=True)[0]
    torch.nn.functional.cross_entropy(scores, data.labels, reduction="sum").backward()
    directions = (
        torch.eye(6) if estimator == "coordinate" else torch.randn(q, 6, generator=torch.Generator().manual_seed(1))
    )
    estimate, _ = zo_code_gradient(loss_at, code, directions, 0.03, estimator)
    cosine = torch.nn.functional.cosine_similarity(estimate.flatten(), exact.grad.flatten(), dim=0)
    assert cosine > min_cosine, float(cosine)
    assert bb.counter.stats.queries == 1 + len(directions)  # all probes in one batched call


def test_personal_parts_never_leave_the_client(tmp_path, tiny_models, monkeypatch):
    sent = []
    encode = engine_module.encode_message

    def spy(arrays, header, dtype="float32"):
        sent.append(set(arrays))
        return encode(arrays, header, dtype)

    monkeypatch.setattr(engine_module, "encode_message", spy)
    run, records = _run(tmp_path, tiny_models, "private", rounds=2)
    shared = {"encode.0.weight", "encode.0.bias", "encode.2.weight", "encode.2.bias"}
    shared |= {"reconstruct.weight", "reconstruct.bias"}
    assert sent and all(keys == shared for keys in sent)  # every message, down and up
    server, _ = load_arrays(run.path / "server_state.safetensors")
    assert set(server) == shared
    client_files = sorted((run.path / "clients").glob("*.safetensors"))
    assert client_files  # the private state is on the client's side of the line, in its own file
    for path in client_files:
        private, _ = load_arrays(path)
        assert {"embedding", "remap_weight", "remap_bias"} <= set(private)
    assert "personal_accuracy" in records[-1] and "test_accuracy" in records[-1]


def test_per_client_state_survives_resume(tmp_path, tiny_models):
    _, straight = _run(tmp_path, tiny_models, "straight")
    run, first = _run(tmp_path, tiny_models, "split", stop_after=1)
    assert [r["round"] for r in first] == [0, 1]
    (run.path / "clients" / "0.r9.safetensors").write_bytes(b"from a round that never finished")
    _, resumed = run_zoopfl_experiment(None, None, None, None, resume=run.path)
    assert not (run.path / "clients" / "0.r9.safetensors").exists()
    for a, b in zip(straight, resumed):
        assert a["personal_accuracy"] == b["personal_accuracy"] and a["test_accuracy"] == b["test_accuracy"]
    straight_dir = next((tmp_path / "straight").iterdir())
    for path in sorted((run.path / "clients").glob("*.safetensors")):
        mine, _ = load_arrays(path)
        theirs, _ = load_arrays(straight_dir / "clients" / path.name)
        for key in mine:
            np.testing.assert_array_equal(mine[key], theirs[key])


def test_local_only_sends_nothing_and_config_errors(tmp_path, tiny_models):
    data = PersonalDataConfig(task="demo", k_shot=8, num_clients=2, test_limit=10)
    _, records = run_zoopfl_experiment(
        data,
        ZooPFLConfig(**SMALL, federate=False),
        EngineConfig(rounds=1, seed=0),
        BlackBoxConfig(model=str(tiny_models["bert"])),
        out_root=tmp_path,
    )
    assert records[1]["aggregated"] == [0, 1] and records[1]["bytes_up_per_client"] < 200  # header only
    with pytest.raises(ValueError, match="surgery"):
        ZooPFLConfig(surgery=False, remap=False)
    with pytest.raises(ValueError, match="estimator"):
        ZooPFLConfig(estimator="adam")
