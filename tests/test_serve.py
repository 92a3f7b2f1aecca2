"""`bbfl serve` in a real subprocess: auth, limits, the soft-prompt wire, OpenAI-compatible routes, and
RemoteBlackBox giving the same BBT numbers as the local model."""

from __future__ import annotations

import json
import math
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from bbfl.blackbox import LocalBlackBox
from bbfl.blackbox.remote import RemoteBlackBox, pack
from bbfl.data import few_shot, load_task
from bbfl.exceptions import BudgetExceeded, ConfigError
from bbfl.methods.bbt import BBTConfig, SubspaceProjection, run_bbt
from bbfl.serve import spawn_server

TOKEN = "test-serve-token-5f2c9e"  # must never reach a file a run writes
MAX_PROMPTS = 8


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def served(tiny_models):
    """`bbfl serve` on the tiny BERT-MLM: (url, model path). 1 MiB request limit, 8 prompts per request."""
    args = ["--model", str(tiny_models["bert"]), "--max-request-mb", "1", "--max-prompts", str(MAX_PROMPTS)]
    proc, url = spawn_server(args, token=TOKEN)
    try:
        yield url, tiny_models["bert"]
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def demo():
    task = load_task("demo")
    train, dev = few_shot(task.train, 4, seed=0)
    return task, train, dev


def auth(token: str = TOKEN) -> dict:
    return {"Authorization": f"Bearer {token}"}


def test_health_is_open_everything_else_needs_the_token(served):
    url, _ = served
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    for headers in ({}, auth("wrong"), {"Authorization": TOKEN}):
        resp = httpx.get(f"{url}/v1/bbfl/info", headers=headers)
        assert resp.status_code == 401
        assert "bearer token" in resp.json()["error"]["message"]
    assert httpx.get(f"{url}/v1/bbfl/info", headers=auth()).json()["head"] == "mlm"
    with pytest.raises(ConfigError, match="BBFL_SERVE_TOKEN"):
        RemoteBlackBox(url, token="wrong")


def test_limits_give_clear_4xx(served, demo):
    url, _ = served
    task, train, _ = demo
    from bbfl.blackbox.remote import task_spec

    meta = {"task": task_spec(task), "texts": train.texts[:2], "text_pairs": None, "perturb": None}
    post = lambda body: httpx.post(f"{url}/v1/bbfl/scores", content=body, headers=auth())  # noqa: E731
    big = post(pack({"prompts": torch.zeros(1, 4200, 64)}, meta))  # 1.07 MB > 1 MiB
    assert big.status_code == 413 and "limit 1048576 bytes" in big.json()["error"]["message"]
    many = post(pack({"prompts": torch.zeros(MAX_PROMPTS + 1, 2, 64)}, meta))
    assert many.status_code == 422
    assert many.json()["error"]["message"].startswith(f"prompts: {MAX_PROMPTS + 1} items in one request > limit 8")
    long = post(pack({"prompts": torch.zeros(1, 300, 64)}, meta))
    assert long.status_code == 422 and "prompt length: 300 items in one request > limit 256" in long.text
    wrong_h = post(pack({"prompts": torch.zeros(1, 2, 32)}, meta))
    assert wrong_h.status_code == 422 and "hidden size 32" in wrong_h.json()["error"]["message"]
    assert post(b"not safetensors at all").status_code == 400
    text = "x" * 1_100_000
    resp = httpx.post(f"{url}/v1/embeddings", json={"input": text}, headers=auth())
    assert resp.status_code == 413
    resp = httpx.post(f"{url}/v1/chat/completions", json={"messages": [], "top_logprobs": 3}, headers=auth())
    assert resp.status_code == 422 and "messages" in resp.json()["error"]["message"]


def test_remote_bbt_gives_the_local_numbers(served, demo):
    url, path = served
    task, train, dev = demo
    cfg = BBTConfig(intrinsic_dim=16, prompt_length=4, popsize=6, budget=24, eval_every=12, seed=3)
    results, boxes = [], []
    for bb in (LocalBlackBox(str(path)), RemoteBlackBox(url, token=TOKEN)):
        p0 = bb.token_embeddings(".", cfg.prompt_length)
        proj = SubspaceProjection(cfg.intrinsic_dim, p0, bb.embedding_std, seed=cfg.seed)
        results.append(run_bbt(cfg, bb, bb.encode(task, train), bb.encode(task, dev), proj))
        boxes.append(bb)
    local, remote = results
    assert [h["train_loss"] for h in local.history] == [h["train_loss"] for h in remote.history]
    np.testing.assert_array_equal(local.z_best, remote.z_best)
    np.testing.assert_array_equal(local.z_mean, remote.z_mean)
    assert boxes[0].counter.stats.queries == boxes[1].counter.stats.queries
    assert boxes[0].counter.stats.tokens == boxes[1].counter.stats.tokens
    # FedBPT's perturbed data is perturbed by the server's tokenizer: same scores as local
    prompts = torch.randn(MAX_PROMPTS + 3, 4, 64) * 0.02  # more than one request holds: the client splits it
    lb, rb = boxes
    lp, rp = lb.perturbed(lb.encode(task, train), 0.5, seed=1), rb.perturbed(rb.encode(task, train), 0.5, seed=1)
    torch.testing.assert_close(rb.logits(prompts, rp), lb.logits(prompts, lp), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rb.logits(None, rb.encode(task, dev)), lb.logits(None, lb.encode(task, dev)))


def test_remote_budget_is_never_exceeded(served, demo):
    url, _ = served
    task, train, _ = demo
    bb = RemoteBlackBox(url, token=TOKEN, budget=5)
    data = bb.encode(task, train)
    bb.logits(torch.zeros(4, 2, 64), data)
    before = httpx.get(f"{url}/health").json()["requests"]
    with pytest.raises(BudgetExceeded):
        bb.logits(torch.zeros(2, 2, 64), data)
    assert httpx.get(f"{url}/health").json()["requests"] == before  # refused before sending anything
    assert bb.counter.stats.queries == 4


def test_openai_client_drives_the_openai_routes(served):
    import openai

    url, _ = served
    client = openai.OpenAI(api_key=TOKEN, base_url=f"{url}/v1", max_retries=0)
    as_b64 = client.embeddings.create(model="tiny", input=["a good film", "a bad film"])  # the client's base64
    as_float = client.embeddings.create(model="tiny", input=["a good film", "a bad film"], encoding_format="float")
    assert len(as_b64.data) == 2 and len(as_b64.data[0].embedding) == 64
    np.testing.assert_allclose(as_b64.data[1].embedding, as_float.data[1].embedding, rtol=1e-6)
    assert math.isclose(float(np.linalg.norm(as_float.data[0].embedding)), 1.0, rel_tol=1e-5)

    text = "the film was [MASK] ."
    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": text}], max_tokens=1, logprobs=True, top_logprobs=5
    )
    top = chat.choices[0].logprobs.content[0].top_logprobs
    assert len(top) == 5 and all(a.logprob >= b.logprob for a, b in zip(top, top[1:]))
    assert chat.choices[0].message.content == top[0].token and chat.usage.prompt_tokens > 0
    comp = client.completions.create(model="tiny", prompt=[text], max_tokens=1, logprobs=5)
    table = comp.choices[0].logprobs.top_logprobs[0]
    assert {t.token: t.logprob for t in top} == pytest.approx(table, rel=1e-5)
    assert sum(math.exp(v) for v in table.values()) < 1.0
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(api_key="wrong", base_url=f"{url}/v1", max_retries=0).embeddings.create(model="t", input="x")
    # concurrent requests are batched on the server: the same answers as one at a time (padding aside)
    texts = [f"movie number {i} was {'really ' * i}[MASK] ." for i in range(12)]

    def ask(t: str) -> list:
        resp = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": t}], logprobs=True, top_logprobs=3
        )
        return [(e.token, e.logprob) for e in resp.choices[0].logprobs.content[0].top_logprobs]

    def batching() -> dict:
        return httpx.get(f"{url}/health").json()["batching"]["next_token"]

    alone = [ask(t) for t in texts]
    before = batching()
    with ThreadPoolExecutor(len(texts)) as pool:
        parallel = list(pool.map(ask, texts))
    after = batching()
    for got, want in zip(parallel, alone):
        assert [t for t, _ in got] == [t for t, _ in want]
        np.testing.assert_allclose([v for _, v in got], [v for _, v in want], atol=1e-4)
    assert after["requests"] - before["requests"] == len(texts)
    assert after["model_calls"] - before["model_calls"] < len(texts)  # some requests shared a forward


def test_batcher_merges_what_queued_and_isolates_bad_input():
    """Deterministic: the first call blocks until 5 more jobs have queued; they then run as one call, and a
    job whose input breaks the merged call fails alone."""
    import threading

    from bbfl.serve import Batcher

    gate, calls = threading.Event(), []

    def run(items: list) -> list:
        calls.append(list(items))
        if len(calls) == 1:
            gate.wait(10)
        if "bad" in items:
            raise ValueError("bad item")
        return [x.upper() for x in items]

    batcher = Batcher(run, max_items=8)
    jobs = [["a"], ["b", "c"], ["d"], ["bad"], ["e", "f", "g", "h", "i"], ["j"]]
    results: dict[int, object] = {}

    def submit(i: int) -> None:
        try:
            results[i] = batcher.submit(jobs[i])
        except ValueError as exc:
            results[i] = exc

    threads = [threading.Thread(target=submit, args=(0,))]
    threads[0].start()
    while not calls:
        time.sleep(0.001)
    for i in range(1, len(jobs)):
        threads.append(threading.Thread(target=submit, args=(i,)))
        threads[-1].start()
    while batcher._queue.qsize() < len(jobs) - 1:
        time.sleep(0.001)
    gate.set()
    for t in threads:
        t.join(10)
    assert results[0] == ["A"] and results[1] == ["B", "C"] and results[2] == ["D"] and results[5] == ["J"]
    assert results[4] == ["E", "F", "G", "H", "I"] and isinstance(results[3], ValueError)
    # call 2 merged jobs 1-3 (4 items; job 4's 5 items would pass max_items = 8), failed on "bad", so jobs
    # 1, 2 and 3 were re-run alone; then job 4 (carried over) and job 5 ran together
    assert calls[1] == ["b", "c", "d", "bad"]
    assert calls[2:5] == [["b", "c"], ["d"], ["bad"]]
    assert calls[5] == ["e", "f", "g", "h", "i", "j"]
    assert batcher.jobs == 5 and batcher.calls == 6


def test_openai_blackbox_reads_label_words_from_top_logprobs(served, demo):
    from bbfl.blackbox.openai import LABEL_FLOOR, OpenAIBlackBox

    url, _ = served
    task, _, dev = demo
    # a random tiny model spreads its mass over 30k tokens: a floor below that, so the test sees real values
    bb = OpenAIBlackBox("tiny", base_url=f"{url}/v1", api_key=TOKEN, top_logprobs=5, label_floor=1e-9)
    assert bb.scoring == "chat"  # detected: the endpoint returns logprobs
    data = bb.encode(task, dev.head(2))
    import openai

    client = openai.OpenAI(api_key=TOKEN, base_url=f"{url}/v1", max_retries=0)
    resp = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": data.texts[0]}], logprobs=True, top_logprobs=5
    )
    top = resp.choices[0].logprobs.content[0].top_logprobs
    # label words: the model's 1st and 3rd choices, and one it does not rank in its top 5
    data.label_words = [top[0].token, top[2].token, "zzzqqq"]
    scores = bb.logits(None, data)
    assert scores.shape == (1, 2, 3)
    assert scores[0, 0, 0].item() == pytest.approx(top[0].logprob, rel=1e-5)
    assert scores[0, 0, 1].item() == pytest.approx(top[2].logprob, rel=1e-5)
    assert scores[0, 0, 2].item() == pytest.approx(math.log(1e-9))
    fedone = OpenAIBlackBox("tiny", base_url=f"{url}/v1", api_key=TOKEN, scoring="chat", top_logprobs=5)
    assert fedone.label_floor == LABEL_FLOOR == 0.01  # FedOne's floor by default
    torch.testing.assert_close(fedone.logits(None, data), torch.full((1, 2, 3), math.log(0.01)))
    assert fedone.cost()["requests"] == 3  # the build-time probe of scoring="chat", then one request per example


def test_bbt_cli_against_served_model_writes_no_secret(served, tmp_path, monkeypatch):
    from bbfl.cli import app

    url, _ = served
    monkeypatch.setenv("BBFL_SERVE_TOKEN", TOKEN)
    args = ["bbt", "--model", url, "--budget", "12", "--popsize", "4", "--k-shot", "2", "--test-limit", "8"]
    args += ["--prompt-length", "3", "--intrinsic-dim", "8", "--eval-every", "8", "--out", str(tmp_path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    (run_dir,) = tmp_path.iterdir()
    recorded = json.loads((run_dir / "config.json").read_text())["blackbox"]
    assert recorded["model"] == url and recorded["head"] == "mlm"  # what the server reported (a tiny BERT-MLM)
    assert not {"dtype", "device", "max_length", "max_tokens"} & set(recorded)  # ignored settings are not recorded
    files = [p for p in Path(tmp_path).rglob("*") if p.is_file()]
    assert files and not [p for p in files if TOKEN.encode() in p.read_bytes()]
    monkeypatch.delenv("BBFL_SERVE_TOKEN")
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "BBFL_SERVE_TOKEN" in result.output


def test_serve_cli_refuses_to_run_without_a_token(monkeypatch):
    from bbfl.cli import app

    monkeypatch.delenv("BBFL_SERVE_TOKEN", raising=False)
    result = CliRunner().invoke(app, ["serve"])
    assert result.exit_code == 2 and "--no-auth" in result.output


def test_fedbpt_with_a_served_model_matches_local(served, tmp_path, monkeypatch):
    from bbfl.experiment import BlackBoxConfig, FederatedDataConfig
    from bbfl.federation.engine import EngineConfig
    from bbfl.methods.fedbpt import FedBPTConfig
    from bbfl.methods.fedbpt.experiment import run_fedbpt_experiment

    url, path = served
    monkeypatch.setenv("BBFL_SERVE_TOKEN", TOKEN)
    data = FederatedDataConfig(task="demo", k_shot=4, num_clients=2, test_limit=8)
    fed = FedBPTConfig(intrinsic_dim=8, prompt_length=3, local_popsize=4, local_iter=2, perturb_rate=0.5, seed=1)
    runs = []
    for model in (str(path), url):
        _, records = run_fedbpt_experiment(data, fed, EngineConfig(rounds=2), BlackBoxConfig(model=model), tmp_path)
        runs.append(records)
    assert [r["test_accuracy"] for r in runs[0]] == [r["test_accuracy"] for r in runs[1]]
    assert [r["train_queries"] for r in runs[0]] == [r["train_queries"] for r in runs[1]]
    local_dir, remote_dir = sorted(tmp_path.iterdir())
    from bbfl.io import load_arrays

    np.testing.assert_array_equal(
        load_arrays(local_dir / "prompt.safetensors")[0]["z"], load_arrays(remote_dir / "prompt.safetensors")[0]["z"]
    )


def test_zoopfl_with_a_served_model_matches_local(served, tmp_path, monkeypatch):
    """ZooPFL's features come from /v1/bbfl/features and its probes from paired scores: bit for bit local."""
    from bbfl.experiment import BlackBoxConfig, PersonalDataConfig
    from bbfl.federation.engine import EngineConfig
    from bbfl.io import load_arrays
    from bbfl.methods.zoopfl import ZooPFLConfig
    from bbfl.methods.zoopfl.experiment import run_zoopfl_experiment

    url, path = served
    monkeypatch.setenv("BBFL_SERVE_TOKEN", TOKEN)
    data = PersonalDataConfig(task="demo", k_shot=8, num_clients=2, test_limit=8)
    zoo = ZooPFLConfig(
        hidden_dim=16, latent_dim=4, client_embed_dim=2, prompt_length=2, local_steps=2, pretrain_steps=5
    )
    runs = []
    for name, model in (("local", str(path)), ("remote", url)):
        run, records = run_zoopfl_experiment(
            data, zoo, EngineConfig(rounds=2, seed=2), BlackBoxConfig(model=model), tmp_path / name
        )
        runs.append((run.path, records))
    (local_dir, local), (remote_dir, remote) = runs
    keys = ("test_accuracy", "personal_accuracy", "personal_accuracy_min", "train_queries", "client_train_loss")
    assert [[r.get(k) for k in keys] for r in local] == [[r.get(k) for k in keys] for r in remote]
    assert len(remote) == 3 and "personal_accuracy" in remote[-1]
    server_local, server_remote = (load_arrays(d / "server_state.safetensors")[0] for d in (local_dir, remote_dir))
    for key in server_local:
        np.testing.assert_array_equal(server_local[key], server_remote[key])
    client_files = sorted(p.name for p in (local_dir / "clients").glob("*.safetensors"))
    assert client_files == sorted(p.name for p in (remote_dir / "clients").glob("*.safetensors")) != []
    for name in client_files:
        mine, theirs = load_arrays(local_dir / "clients" / name)[0], load_arrays(remote_dir / "clients" / name)[0]
        assert set(mine) == set(theirs)
        for key in mine:
            np.testing.assert_array_equal(mine[key], theirs[key])


def test_features_endpoint_equals_local_and_is_not_a_query(served, demo):
    from bbfl.data import Split
    from bbfl.methods.zoopfl import example_features

    url, path = served
    task, train, _ = demo
    lb, rb = LocalBlackBox(str(path)), RemoteBlackBox(url, token=TOKEN)
    assert torch.equal(example_features(rb, rb.encode(task, train)), example_features(lb, lb.encode(task, train)))
    assert rb.feature_requests == 1 and rb.counter.stats.queries == 0  # no forward: no query charged
    # more texts than one request may hold (max_examples 1024): the client splits, the numbers do not change
    many = Split([f"review {i}: {'good ' * (i % 5)}film" for i in range(1030)], np.zeros(1030, dtype=np.int64))
    assert torch.equal(example_features(rb, rb.encode(task, many)), example_features(lb, lb.encode(task, many)))
    assert rb.feature_requests == 3
    with pytest.raises(ConfigError, match="example_features"):
        rb.word_embeddings  # noqa: B018 - the property raises


def test_features_endpoint_rejects_no_token_and_oversized_requests(served, demo):
    from bbfl.blackbox.remote import task_spec

    url, _ = served
    task, train, _ = demo
    meta = {"task": task_spec(task), "texts": train.texts[:2], "text_pairs": None, "perturb": None}
    resp = httpx.post(f"{url}/v1/bbfl/features", content=pack({}, meta))
    assert resp.status_code == 401 and "bearer token" in resp.json()["error"]["message"]
    meta["texts"] = ["a film"] * 1025
    resp = httpx.post(f"{url}/v1/bbfl/features", content=pack({}, meta), headers=auth())
    assert resp.status_code == 422
    assert resp.json()["error"]["message"] == "texts: 1025 items in one request > limit 1024; split the request"
    resp = httpx.post(f"{url}/v1/bbfl/features", content=b"not safetensors", headers=auth())
    assert resp.status_code == 400


def test_paired_scores_too_big_for_one_request_are_split(served, demo):
    """ZooPFL's per-example prompts grow with B; past the server's 1 MiB limit the client splits the request."""
    from bbfl.data import Split

    url, path = served
    task, train, _ = demo
    lb, rb = LocalBlackBox(str(path)), RemoteBlackBox(url, token=TOKEN)
    big = Split(train.texts * 4, np.tile(train.labels, 4))  # 32 examples
    torch.manual_seed(0)
    before = httpx.get(f"{url}/health").json()["requests"]
    # 3 x 8 prompts of 180 x 64 floats: 1.1 MB, split by candidate; 1 x 32 x 256 x 64: 2.1 MB, split by example
    for split, shape in ((train, (3, 8, 180, 64)), (big, (1, 32, 256, 64))):
        prompts = torch.randn(shape) * 0.02
        got = rb.paired_logits(prompts, rb.encode(task, split))
        # not bit for bit: the server pads each part on its own, the local run the whole batch at once
        torch.testing.assert_close(got, lb.paired_logits(prompts, lb.encode(task, split)))
    assert rb.counter.stats.queries == lb.counter.stats.queries == 4
    assert httpx.get(f"{url}/health").json()["requests"] - before == 2 + 4  # 1 + 2 candidates; 4 x 8 examples
