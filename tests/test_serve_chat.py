"""`bbfl serve` chat completions on a causal LM read the messages through the model's chat template, ending
with the assistant's turn, as vLLM and llama.cpp do; models without one read the texts joined."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from bbfl.blackbox import LocalBlackBox
from bbfl.serve import create_app

TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a fine film"}]


def top_logprobs(client: TestClient, path: str, body: dict) -> dict[str, float]:
    resp = client.post(path, json=body)
    assert resp.status_code == 200, resp.text
    choice = resp.json()["choices"][0]
    if path.endswith("chat/completions"):
        return {e["token"]: e["logprob"] for e in choice["logprobs"]["content"][0]["top_logprobs"]}
    return choice["logprobs"]["top_logprobs"][0]


@pytest.fixture(scope="module")
def llama(tiny_models) -> LocalBlackBox:
    return LocalBlackBox(str(tiny_models["llama"]))


def test_chat_reads_the_messages_through_the_chat_template(llama, monkeypatch):
    monkeypatch.setattr(llama.tokenizer, "chat_template", TEMPLATE)
    rendered = "<system> be brief\n<user> a fine film\n<assistant>"
    with TestClient(create_app(llama, token=None)) as client:
        chat = top_logprobs(client, "/v1/chat/completions", {"messages": MESSAGES, "logprobs": True, "top_logprobs": 5})
        same = top_logprobs(client, "/v1/completions", {"prompt": rendered, "logprobs": 5})
        joined = top_logprobs(client, "/v1/completions", {"prompt": "be brief\na fine film", "logprobs": 5})
    assert chat.keys() == same.keys()
    assert all(chat[t] == pytest.approx(same[t], abs=1e-5) for t in chat)
    assert chat != joined  # the template changed what the model reads


def test_chat_without_a_template_joins_the_texts(llama, monkeypatch):
    monkeypatch.setattr(llama.tokenizer, "chat_template", None)
    with TestClient(create_app(llama, token=None)) as client:
        chat = top_logprobs(client, "/v1/chat/completions", {"messages": MESSAGES, "logprobs": True, "top_logprobs": 5})
        joined = top_logprobs(client, "/v1/completions", {"prompt": "be brief\na fine film", "logprobs": 5})
    assert all(chat[t] == pytest.approx(joined[t], abs=1e-5) for t in chat)


@pytest.mark.parametrize(("role", "status"), [("wizard", 422), (None, 422), (["user"], 422)])
def test_a_bad_role_is_a_422_naming_it(llama, monkeypatch, role, status):
    monkeypatch.setattr(llama.tokenizer, "chat_template", TEMPLATE)
    with TestClient(create_app(llama, token=None), raise_server_exceptions=False) as client:
        resp = client.post("/v1/chat/completions", json={"messages": [{"role": role, "content": "hi"}]})
    assert resp.status_code == status and "messages[0].role" in resp.text, resp.text


def test_a_prompt_over_the_context_is_a_422_not_a_cut_off_answer(llama, monkeypatch):
    """The next token follows the prompt's end: truncating it would answer with the distribution after some
    middle word (the assistant's turn cut away) and still say 200."""
    monkeypatch.setattr(llama.tokenizer, "chat_template", TEMPLATE)
    long = " ".join(["a wonderfully long and winding review"] * 40)  # ~240 tokens > max_length 128
    with TestClient(create_app(llama, token=None), raise_server_exceptions=False) as client:
        chat = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": long}]})
        completion = client.post("/v1/completions", json={"prompt": ["fine", long], "logprobs": 2})
        fits = client.post("/v1/completions", json={"prompt": ["fine"], "logprobs": 2})
    assert chat.status_code == 422 and "tokens > limit 128" in chat.text, chat.text
    assert completion.status_code == 422 and "prompt 1:" in completion.text, completion.text
    assert fits.status_code == 200


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
def test_next_token_logprobs_equal_the_models_own_forward(tiny_models, name):
    """Prompts of different lengths in one request run sorted and split into length groups (a budget of 24
    padded tokens forces several), read only at their read-out position: each must equal the model's own
    forward of that prompt alone - causal LMs after the last token, MLMs at the mask."""
    import torch

    from bbfl.blackbox.loading import mlm_head
    from bbfl.serve import ServeLimits

    bb = LocalBlackBox(str(tiny_models[name]))
    words = "a fine film with a long and winding plot that goes nowhere".split()
    prompts = [" ".join(words[:n]) for n in (12, 2, 7, 3, 10)]
    if bb.head == "mlm":
        prompts = [f"{p} {bb.tokenizer.mask_token} ." for p in prompts]
    limits = ServeLimits(next_token_group_tokens=24)
    with TestClient(create_app(bb, token=None, limits=limits)) as client:
        resp = client.post("/v1/completions", json={"prompt": prompts, "logprobs": 5})
    assert resp.status_code == 200, resp.text
    served = [c["logprobs"]["top_logprobs"][0] for c in resp.json()["choices"]]
    for prompt, table in zip(prompts, served):
        ids = bb.tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            if bb.head == "mlm":
                hidden = bb.body(input_ids=ids).last_hidden_state[0]
                logits = mlm_head(bb.model)(hidden[ids[0] == bb.tokenizer.mask_token_id][0])
            else:
                logits = bb.model(input_ids=ids).logits[0, -1]
        own = torch.log_softmax(logits.float(), -1)
        top = torch.topk(own, 5)
        expected = {bb.tokenizer.decode([int(j)]): float(v) for v, j in zip(top.values, top.indices)}
        assert table.keys() == expected.keys(), (prompt, table, expected)
        assert all(table[t] == pytest.approx(expected[t], abs=1e-4) for t in table)
