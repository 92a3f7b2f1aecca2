"""Fuzz `bbfl serve`'s request parsing: seeded random mutations of valid requests, for every endpoint.

Property: every answer is a 2xx, or a 4xx whose JSON body holds a message; never a 500, never a hang
(each request must answer within ``TIMEOUT_S``); every 200 from /v1/bbfl/scores holds finite scores.
The app runs in process (httpx's ASGI transport) on the tiny BERT-MLM and, for ``echo``, the tiny GPT-2.
``BBFL_FUZZ_EXAMPLES`` sets the requests per endpoint (default 150: 7-15 s on 2 shared, busy cores).
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import random
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import torch

from bbfl.blackbox import LocalBlackBox
from bbfl.blackbox.remote import pack, task_spec, unpack
from bbfl.data import load_task
from bbfl.serve import create_app

EXAMPLES = int(os.environ.get("BBFL_FUZZ_EXAMPLES", "150"))
SEED = int(os.environ.get("BBFL_FUZZ_SEED", "0"))
TIMEOUT_S = 30.0  # a request still unanswered after this is a hang

HOSTILE_VALUES: list[Any] = [
    None, True, False, 0, -1, 1, 3, 2**70, -(2**70), 1.5, float("nan"), float("inf"), -float("inf"),
    "", "x", "\ud800", "a\udfffb", "[MASK]", "{mask}", "a" * 2000, [], [1], ["x"], [None], [[]], {}, {"x": 1},
    {"rate": 0.5, "seed": 1}, ["x"] * 300,
]  # fmt: skip
PROMPT_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.float8_e4m3fn,
                 torch.complex64, torch.int64, torch.uint8, torch.bool]  # fmt: skip


def demo_meta() -> dict:
    return {"task": task_spec(load_task("demo")), "texts": ["a fine film", "dull"], "text_pairs": None, "perturb": None}


# endpoint -> (app key, path, valid request); a request is a JSON object or (tensors, metadata) for safetensors
ENDPOINTS: dict[str, tuple[str, str, Callable[[], Any]]] = {
    "scores": ("bert", "/v1/bbfl/scores", lambda: ({"prompts": torch.zeros(2, 3, 64)}, demo_meta())),
    "features": ("bert", "/v1/bbfl/features", lambda: ({"x": torch.zeros(1)}, demo_meta())),
    "token_embeddings": ("bert", "/v1/bbfl/token_embeddings", lambda: {"text": "great", "length": 3}),
    "embeddings": ("bert", "/v1/embeddings", lambda: {"input": ["a", "b"], "encoding_format": "float", "model": "m"}),
    "completions": ("bert", "/v1/completions", lambda: {"prompt": ["a [MASK] film"], "logprobs": 3, "max_tokens": 1}),
    "echo": (
        "gpt2",
        "/v1/completions",
        lambda: {"prompt": "a fine film", "echo": True, "max_tokens": 0, "logprobs": 2},
    ),
    "chat": (
        "bert",
        "/v1/chat/completions",
        lambda: {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 2, "n": 1},
    ),
}


# ---------------------------------------------------------------------- mutations
def paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every place in a JSON tree (the root included) a mutation can hit."""
    out = [prefix]
    if isinstance(value, dict):
        for key, child in value.items():
            out += paths(child, (*prefix, key))
    elif isinstance(value, list):
        for i, child in enumerate(value[:5]):
            out += paths(child, (*prefix, i))
    return out


def mutate_json(rng: random.Random, value: Any) -> Any:
    """One structural change: replace, delete, add a key, wrap in a list or repeat a list item."""
    value = copy.deepcopy(value)
    path = rng.choice(paths(value))
    op = rng.choice(["replace", "replace", "replace", "delete", "add", "wrap", "repeat"])
    if not path:
        return rng.choice(HOSTILE_VALUES) if op == "replace" else [value]
    parent = value
    for step in path[:-1]:
        parent = parent[step]
    last = path[-1]
    if op == "delete" and isinstance(parent, dict):
        del parent[last]
    elif op == "add" and isinstance(parent, dict):
        parent[rng.choice(["extra", "seed", "rate", "model", "labels"])] = rng.choice(HOSTILE_VALUES)
    elif op == "wrap":
        parent[last] = [parent[last]]
    elif op == "repeat" and isinstance(parent[last], list) and parent[last]:
        parent[last] = parent[last] * rng.choice([0, 2, 50, 130])
    else:
        parent[last] = copy.deepcopy(rng.choice(HOSTILE_VALUES))
    return value


def mutate_tensors(rng: random.Random, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    name = next(iter(tensors))
    op = rng.choice(["dtype", "shape", "nonfinite", "rename", "extra"])
    out = dict(tensors)
    if op == "dtype":
        out[name] = torch.zeros(out[name].shape).to(rng.choice(PROMPT_DTYPES))
    elif op == "shape":
        dims = rng.choice([(2, 3), (2, 0, 64), (0, 3, 64), (2, 3, 63), (1, 3, 2, 3, 64), (300, 0, 64), (1, 300, 64),
                           (2, 2, 3, 64), (2, 5, 3, 64), (1,), ()])  # fmt: skip
        out[name] = torch.zeros(dims)
    elif op == "nonfinite":
        out[name] = torch.full(out[name].shape, rng.choice([float("nan"), float("inf")]))
    elif op == "rename":
        out["other"] = out.pop(name)
    else:
        out["extra"] = torch.ones(3, dtype=torch.int8)
    return out


def mutate_bytes(rng: random.Random, body: bytes) -> bytes:
    op = rng.choice(["truncate", "flip", "insert", "deep", "empty"])
    if op == "truncate":
        return body[: rng.randrange(len(body) + 1)]
    if op == "flip":
        data = bytearray(body)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        return bytes(data)
    if op == "insert":
        at = rng.randrange(len(body) + 1)
        return body[:at] + rng.choice([b"\xff\xfe", b"\\ud800", b"[" * 5000, b"\x00", b'"', b"}"]) + body[at:]
    if op == "deep":
        return b"[" * 100_000 + body
    return b""


def hostile_request(rng: random.Random, valid: Any) -> bytes:
    """A valid request with 1 to 3 mutations, encoded as the endpoint's wire format."""
    safetensors = isinstance(valid, tuple)
    tensors, payload = valid if safetensors else ({}, valid)
    for _ in range(rng.randint(1, 3)):
        kind = rng.random()
        if safetensors and kind < 0.25:
            tensors = mutate_tensors(rng, tensors)
        elif kind < 0.85:
            payload = mutate_json(rng, payload)
    body = pack(tensors, payload) if safetensors else json.dumps(payload).encode()
    return mutate_bytes(rng, body) if rng.random() < 0.15 else body


# ---------------------------------------------------------------------- the property
@pytest.fixture(scope="module")
def apps(tiny_models) -> dict[str, Any]:
    return {name: create_app(LocalBlackBox(str(tiny_models[name])), token=None) for name in ("bert", "gpt2")}


def check_answer(endpoint: str, resp: httpx.Response) -> None:
    assert resp.status_code < 500, (endpoint, resp.status_code, resp.text[:500])
    if resp.status_code >= 400:
        message = resp.json()["error"]["message"]
        assert isinstance(message, str) and message, (endpoint, resp.text[:500])
    elif endpoint == "scores":
        scores = unpack(resp.content)[0]["scores"]
        assert torch.isfinite(scores).all(), endpoint


async def fuzz(apps: dict[str, Any], rng: random.Random, examples: int) -> dict[str, Counter]:
    clients = {
        name: httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") for name, app in apps.items()
    }
    counts: dict[str, Counter] = {name: Counter() for name in ENDPOINTS}
    try:
        for _ in range(examples):
            for endpoint, (app, path, valid) in ENDPOINTS.items():
                body = hostile_request(rng, valid())
                try:
                    resp = await asyncio.wait_for(clients[app].post(path, content=body), TIMEOUT_S)
                except asyncio.TimeoutError:
                    pytest.fail(f"{endpoint}: no answer in {TIMEOUT_S} s to {body[:300]!r}")
                try:
                    check_answer(endpoint, resp)
                except AssertionError as exc:
                    raise AssertionError(f"{exc}\nrequest body: {body[:2000]!r}") from exc
                counts[endpoint][resp.status_code] += 1
    finally:
        for client in clients.values():
            await client.aclose()
    return counts


def test_fuzzed_requests_get_2xx_or_a_4xx_with_a_message(apps):
    start = time.monotonic()
    counts = asyncio.run(fuzz(apps, random.Random(SEED), EXAMPLES))
    seconds = time.monotonic() - start
    print(f"\nserve fuzz: {EXAMPLES} requests per endpoint in {seconds:.1f} s (seed {SEED})")
    for endpoint, by_status in counts.items():
        print(f"  {endpoint:17s} " + " ".join(f"{status}:{n}" for status, n in sorted(by_status.items())))
    for endpoint, by_status in counts.items():  # both paths exercised: the fuzzer is neither all-valid nor all-noise
        assert sum(n for s, n in by_status.items() if s < 300) > 0, (endpoint, by_status)
        assert sum(n for s, n in by_status.items() if s >= 400) > 0, (endpoint, by_status)
