"""Label log-likelihoods through the legacy completions endpoint (``echo=True, max_tokens=0``): a real
`bbfl serve` on a tiny causal LM (and one on a tiny MLM), driven by the real `openai` client, checked
against log-softmax computed locally with transformers on the same model directory. No mocks."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import openai
import pytest
import torch

from bbfl.blackbox.openai import OpenAIBlackBox
from bbfl.data import few_shot, load_task
from bbfl.exceptions import BudgetExceeded, ConfigError
from bbfl.serve import spawn_server

TOKEN = "test-echo-token-3b8e1a"
MODELS = ("gpt2", "bert")
TEXTS = ["the film was great . It was", "a dull , slow and far too long movie . It was"]  # two lengths: padding


@pytest.fixture(scope="module")
def servers(tiny_models):
    """`bbfl serve` on the tiny GPT-2 (causal) and the tiny BERT (MLM), started side by side: their /v1 URLs."""
    with ThreadPoolExecutor(2) as pool:  # two model loads at once: half the wait
        futures = [pool.submit(spawn_server, ["--model", str(tiny_models[name])], token=TOKEN) for name in MODELS]
    started = [f.result() for f in futures if f.exception() is None]
    try:
        if len(started) < len(MODELS):  # one failed to start: stop the other, then report why
            next(f.result() for f in futures if f.exception() is not None)
        yield {name: f"{url}/v1" for name, (_, url) in zip(MODELS, started)}
    finally:
        for proc, _ in started:
            proc.terminate()
            proc.wait(timeout=30)


@pytest.fixture(scope="module")
def causal(tiny_models):
    """The tiny GPT-2 and its tokenizer, loaded here with transformers: the reference for the server's numbers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_models["gpt2"]
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def demo():
    task = load_task("demo")
    _, dev = few_shot(task.train, 4, seed=0)
    return task, dev


def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(api_key=TOKEN, base_url=base_url, max_retries=0)


def model_ids(tok, text: str) -> list[int]:
    """What a causal LM reads for ``text``: the tokenizer's ids without the trailing [SEP] it appends."""
    ids = tok(text)["input_ids"]
    return ids[:-1] if ids[-1] == tok.sep_token_id else ids


def token_logprobs(model, ids: list[int]) -> list[float]:
    """log p(ids[t] | ids[:t]) for t >= 1, one unpadded forward."""
    with torch.no_grad():
        logp = model(torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)
    return logp.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()


def label_loglik(model, tok, prefix: str, word: str) -> float:
    """log p(word | prefix), built from the two tokenizations rather than from text offsets."""
    head, tail = model_ids(tok, prefix), tok(word, add_special_tokens=False)["input_ids"]
    assert model_ids(tok, f"{prefix} {word}") == head + tail  # the joined text tokenizes as the two parts
    return sum(token_logprobs(model, head + tail)[len(head) - 1 :])


def test_echo_returns_the_models_token_logprobs(servers, causal):
    model, tok = causal
    resp = client(servers["gpt2"]).completions.create(model="tiny", prompt=TEXTS, echo=True, max_tokens=0, logprobs=3)
    assert [c.text for c in resp.choices] == TEXTS and resp.usage.completion_tokens == 0
    assert resp.usage.prompt_tokens == sum(len(model_ids(tok, t)) for t in TEXTS)
    for text, choice in zip(TEXTS, resp.choices):
        lp, ids = choice.logprobs, model_ids(tok, text)
        assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        torch.testing.assert_close(
            torch.tensor(lp.token_logprobs[1:]), torch.tensor(token_logprobs(model, ids)), atol=1e-4, rtol=0
        )
        assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
        assert text[lp.text_offset[-1] :] == "was"  # the last token is the text's last word, no [SEP] after it
        for value, table in zip(lp.token_logprobs[1:], lp.top_logprobs[1:]):
            assert len(table) == 3 and max(table.values()) >= value - 1e-5
    bare = client(servers["gpt2"]).completions.create(model="tiny", prompt=TEXTS[0], echo=True, max_tokens=0)
    assert bare.choices[0].logprobs is None and bare.choices[0].text == TEXTS[0]


def test_echo_refuses_what_it_cannot_do_with_clear_4xx(servers):
    with pytest.raises(openai.UnprocessableEntityError, match="only with max_tokens=0"):
        client(servers["gpt2"]).completions.create(model="tiny", prompt="a b", echo=True, max_tokens=1, logprobs=0)
    with pytest.raises(openai.BadRequestError, match="echo needs a causal LM") as err:
        client(servers["bert"]).completions.create(model="tiny", prompt="a b", echo=True, max_tokens=0, logprobs=0)
    assert err.value.status_code == 400
    # without echo the MLM server still answers the next-token distribution, as before
    plain = client(servers["bert"]).completions.create(model="tiny", prompt="a [MASK] b", max_tokens=1, logprobs=2)
    assert len(plain.choices[0].logprobs.top_logprobs[0]) == 2


def test_completions_scoring_gives_label_word_log_likelihoods(servers, causal, demo):
    model, tok = causal
    task, dev = demo
    bb = OpenAIBlackBox(
        "tiny", base_url=servers["gpt2"], api_key=TOKEN, scoring="completions", echo_batch=4, verify=False
    )
    data = bb.encode(task, dev.head(3))
    # a completions endpoint reads the task as a causal LM: the registry's causal template, cut at {mask}
    assert data.texts[0].startswith("Review: ") and data.texts[0].endswith("\nSentiment:")
    assert data.label_words == ["negative", "positive"]
    data.label_words = ["bad", "great", "not bad at all"]  # a multi-token word: its tokens' log-probs are summed
    prompts = ["", "Review: "]
    scores = bb.logits(prompts, data)
    assert scores.shape == (2, 3, 3)
    want = [[[label_loglik(model, tok, p + t, w) for w in data.label_words] for t in data.texts] for p in prompts]
    torch.testing.assert_close(scores, torch.tensor(want), atol=1e-4, rtol=0)
    assert scores[..., 2].max() < scores[..., :2].min()  # four random-model tokens are far less likely than one
    assert bb.cost()["requests"] == 5  # 18 texts, 4 per request; verify=False: no build-time probe
    assert bb.counter.stats.queries == 2 and bb.counter.stats.tokens == bb.cost()["prompt_tokens"] > 0


def test_completions_budget_is_never_exceeded_and_cache_is_per_text(servers, demo):
    task, dev = demo
    base = servers["gpt2"]
    bb = OpenAIBlackBox(
        "tiny", base_url=base, api_key=TOKEN, scoring="completions", budget=3, echo_batch=32, verify=False
    )
    data = bb.encode(task, dev.head(4))
    first = bb.logits(["Review: ", "Opinion: "], data)
    sent = bb.cost()["requests"]
    assert sent == 1  # 2 prompts x 4 examples x 2 labels = 16 texts: one request
    again = bb.logits(["Opinion: "], data)  # every text seen: from the cache, nothing sent
    torch.testing.assert_close(again[0], first[1])
    assert bb.cost()["requests"] == sent and bb.cost()["cache_hits"] == 8
    health = f"{base.removesuffix('/v1')}/health"
    before = httpx.get(health).json()["requests"]
    with pytest.raises(BudgetExceeded):
        bb.logits(["Fresh text: "], data)  # a 4th query: refused before any request
    assert httpx.get(health).json()["requests"] == before and bb.counter.stats.queries == 3
    assert bb.counter.stats.queries <= bb.counter.budget
    # a template with nothing before {mask} and no prompt: a clear error, before the budget is touched
    free = OpenAIBlackBox("tiny", base_url=base, api_key=TOKEN, scoring="completions", budget=1, verify=False)
    # agnews' shape: the label word first (and no causal phrasing to read instead)
    agnews = dataclasses.replace(task, template="{mask} News: {text}", causal_template="")
    with pytest.raises(ConfigError, match="no text before the label word"):
        free.logits(None, free.encode(agnews, dev.head(1)))
    assert free.counter.stats.queries == 0 and free.cost()["requests"] == 0


def test_capabilities_and_auto_order(servers, demo):
    task, dev = demo
    causal_bb = OpenAIBlackBox("tiny", base_url=servers["gpt2"], api_key=TOKEN)
    assert causal_bb.capabilities()["completions_echo"] is True
    assert causal_bb.scoring == "chat"  # chat logprobs come first when the endpoint has them
    mlm_found = OpenAIBlackBox("tiny", base_url=servers["bert"], api_key=TOKEN).capabilities()
    assert mlm_found["completions_echo"] is False and mlm_found["chat"] is True
    with pytest.raises(ConfigError, match="does not serve legacy completions with echo"):
        mlm = OpenAIBlackBox("tiny", base_url=servers["bert"], api_key=TOKEN, scoring="completions")
        mlm.logits(None, mlm.encode(task, dev.head(1)))
    with chatless_proxy(servers["gpt2"]) as proxied:  # the same model, chat route gone: completions is next
        auto = OpenAIBlackBox("tiny", base_url=proxied, api_key=TOKEN)
        assert auto.scoring == "completions"
        direct = OpenAIBlackBox("tiny", base_url=servers["gpt2"], api_key=TOKEN, scoring="completions")
        torch.testing.assert_close(
            auto.logits(None, auto.encode(task, dev.head(2))), direct.logits(None, direct.encode(task, dev.head(2)))
        )
    # a server that ignores echo answers one generated token after the prompt: refused, never summed as a label
    with chatless_proxy(servers["gpt2"], drop_echo=True) as proxied:
        assert OpenAIBlackBox("tiny", base_url=proxied, api_key=TOKEN).scoring == "embeddings"
        with pytest.raises(ConfigError, match="without echoing the prompt"):  # refused when built
            OpenAIBlackBox("tiny", base_url=proxied, api_key=TOKEN, scoring="completions")
        deaf = OpenAIBlackBox("tiny", base_url=proxied, api_key=TOKEN, scoring="completions", verify=False)
        with pytest.raises(ConfigError, match="without echoing the prompt"):
            deaf.logits(None, deaf.encode(task, dev.head(1)))


@contextlib.contextmanager
def chatless_proxy(base_url: str, drop_echo: bool = False) -> Iterator[str]:
    """A real HTTP proxy in front of ``base_url`` that answers 404 on /chat/completions (an endpoint with
    legacy completions but no chat, as a vLLM base-model deployment). ``drop_echo``: it also strips ``echo``
    from completion requests, so the server answers a plain completion (what llama.cpp's llama-server does)."""
    upstream = base_url.removesuffix("/v1")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            if self.path.endswith("/chat/completions"):
                status, data = 404, json.dumps({"error": {"message": "no chat here", "code": 404}}).encode()
            else:
                if drop_echo:
                    body = json.dumps({k: v for k, v in json.loads(body).items() if k != "echo"}).encode()
                headers = {"authorization": self.headers.get("authorization", ""), "content-type": "application/json"}
                resp = httpx.post(f"{upstream}{self.path}", content=body, headers=headers, timeout=30)
                status, data = resp.status_code, resp.content
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()
