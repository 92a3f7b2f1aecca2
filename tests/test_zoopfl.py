"""ZooPFL: the ZO code-gradient against autograd, private state stays private, per-client state resumes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bbfl.blackbox import LocalBlackBox
from bbfl.data import load_task
from bbfl.experiment import BlackBoxConfig, PersonalDataConfig
from bbfl.federation import engine as engine_module
from bbfl.federation.engine import EngineConfig
from bbfl.io import load_arrays
from bbfl.methods.zoopfl import ZooPFLConfig, zo_code_gradient
from bbfl.methods.zoopfl.experiment import run_zoopfl_experiment

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
    small, ~7e-4, so mu = 0.03 keeps the float32 finite differences above rounding noise; the prompt
    enters as word embeddings, the function this tolerance was set on.)"""
    bb = LocalBlackBox(str(tiny_models["bert"]), prompt_attention="full", prompt_placement="inputs_embeds")
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


# ---------------------------------------------------------------------- ZooPFL's shared-prompt baselines
def test_personal_accuracy_of_prompt_matches_a_direct_computation(tiny_models):
    """Test-size-weighted personal accuracy = accuracy on the union of the clients' tests (another code path)."""
    from bbfl.methods.bbt import evaluate_prompt
    from bbfl.methods.zoopfl import personal_accuracy_of_prompt

    bb = LocalBlackBox(str(tiny_models["bert"]))
    task = load_task("demo")
    parts = [np.arange(0, 7), np.arange(7, 10), np.arange(10, 22)]
    clients = [bb.encode(task, task.test.subset(p)) for p in parts]
    union = bb.encode(task, task.test.subset(np.concatenate(parts)))
    prompt = bb.token_embeddings(".", 3) + 0.5 * torch.randn(
        3, bb.hidden_size, generator=torch.Generator().manual_seed(0)
    )
    labels = union.labels.cpu().numpy()
    scores = bb.logits(prompt[None], union)[0].cpu()
    remaps = [(np.array([[0.0, 1.0], [1.0, 0.0]], np.float32), np.zeros(2, np.float32))] * 3  # swap the classes

    for maps, expected_scores in [(None, scores), (remaps, scores.flip(-1))]:
        got = personal_accuracy_of_prompt(bb, prompt, clients, maps)
        right = expected_scores.argmax(-1).numpy() == labels
        per_client = [right[p].mean() for p in parts]
        assert got["personal_accuracy"] == pytest.approx(right.mean())
        assert got["personal_accuracy_min"] == pytest.approx(min(per_client))
        assert got["personal_accuracy_client_mean"] == pytest.approx(np.mean(per_client))
        assert got["client_accuracies"] == pytest.approx(per_client)
    plain = personal_accuracy_of_prompt(bb, prompt, clients)["personal_accuracy"]
    assert plain == pytest.approx(evaluate_prompt(bb, prompt, union)[0])
    swapped = personal_accuracy_of_prompt(bb, prompt, clients, remaps)["personal_accuracy"]
    assert swapped == pytest.approx(1 - plain)  # two classes: swapping them flips every prediction


def test_fit_remap_is_zoopfls_remap_only_client(tiny_models):
    """The public re-mapping fit is the one ZooPFL's re-mapping-only client runs, to the last bit."""
    from bbfl.methods.zoopfl import ZooPFL, fit_remap

    bb = LocalBlackBox(str(tiny_models["bert"]))
    task = load_task("demo")
    clients = [bb.encode(task, task.train.subset(np.arange(i, i + 8))) for i in (0, 8)]
    cfg = ZooPFLConfig(**SMALL, surgery=False)
    method = ZooPFL(cfg, bb, clients, clients, bb.encode(task, task.test.head(8)), task.num_classes)
    arrays, header = method.downlink(1)
    method.client_update(0, 1, arrays, header, seed=0)
    scores = method._scores(method.encoder, torch.zeros(cfg.client_embed_dim), method.features[0], clients[0])
    weight, bias = fit_remap(scores, clients[0].labels, cfg, rounds=1)
    state = method.client_state(0)
    np.testing.assert_array_equal(weight, state["remap_weight"])
    np.testing.assert_array_equal(bias, state["remap_bias"])
    assert not np.allclose(weight, np.eye(2))  # it did learn something
    clock = method.evaluate(1)
    assert 0 < clock["client_remap_seconds"] <= clock["client_seconds"]  # a part of the client's wall-clock


def test_fedbpt_baseline_uses_zoopfls_clients_and_keeps_the_remap_private(tmp_path, tiny_models, monkeypatch):
    from bbfl.methods.fedbpt import FedBPTConfig
    from bbfl.methods.fedbpt.experiment import run_fedbpt_personal_experiment

    sent = []
    encode = engine_module.encode_message

    def spy(arrays, header, dtype="float32"):
        sent.append((set(arrays), set(header)))
        return encode(arrays, header, dtype)

    monkeypatch.setattr(engine_module, "encode_message", spy)
    data = PersonalDataConfig(task="demo", k_shot=12, num_clients=3, partition="dirichlet", alpha=0.5, test_limit=20)
    fed = FedBPTConfig(intrinsic_dim=20, prompt_length=2, local_popsize=3, local_iter=2)  # seed 42 = ZooPFL's
    run, records, summary = run_fedbpt_personal_experiment(
        data,
        fed,
        EngineConfig(rounds=1, seed=2),
        BlackBoxConfig(model=str(tiny_models["bert"])),
        ZooPFLConfig(**SMALL, surgery=False),
        out_root=tmp_path / "fedbpt",
    )
    assert sent and all(keys == {"mean"} and not any("remap" in h for h in head) for keys, head in sent)
    zoo_run, _ = _run(tmp_path, tiny_models, "zoo", rounds=1)
    assert run.config["client_sizes"] == zoo_run.config["client_sizes"]  # the same clients and splits
    assert sorted(p.name for p in (run.path / "remap").iterdir()) == ["0.safetensors", "1.safetensors", "2.safetensors"]
    for key in ("no_prompt", "start", "global", "remap"):  # fractions, not percentages
        assert all(0 <= summary[key][m] <= 1 for m in ("personal_accuracy", "personal_accuracy_min"))
    assert summary["remap_queries"] == 3 and summary["client_updates"] == 3
    assert 0 < summary["client_blackbox_seconds"] <= summary["client_seconds"]


def test_building_zoopfl_leaves_the_global_rng_alone(tiny_models):
    from bbfl.methods.zoopfl import ZooPFL

    bb = LocalBlackBox(str(tiny_models["bert"]))
    task = load_task("demo")
    clients = [bb.encode(task, task.train.subset(np.arange(i, i + 4))) for i in (0, 4)]
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = ZooPFL(ZooPFLConfig(**SMALL), bb, clients, clients, clients[0], task.num_classes)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's stream is untouched
    first._module_from(first._shared_arrays(first.encoder))
    assert torch.equal(torch.get_rng_state(), state)
    again = ZooPFL(ZooPFLConfig(**SMALL), bb, clients, clients, clients[0], task.num_classes)
    for k, v in first._shared_arrays(first.encoder).items():  # still the seed's initial weights
        np.testing.assert_array_equal(again._shared_arrays(again.encoder)[k], v)
