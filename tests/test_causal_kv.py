"""KV-shared causal scoring (bbfl.blackbox.causal) equals the plain forward, on a tiny random LLaMA.

The SmolLM2 version of the same check, through LocalBlackBox, is in tests/test_smollm2.py.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bbfl.blackbox.causal import ids_keeping_tail, scores_after_input, split_off_tail, template_tail
from bbfl.exceptions import ConfigError

TOL = dict(rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=120,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, as SmolLM2
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def batch():
    gen = torch.Generator().manual_seed(1)
    inputs = [torch.randint(3, 120, (n,), generator=gen) for n in (5, 11, 2, 8, 13)]  # ragged: padding matters
    tail = torch.randint(3, 120, (3,), generator=gen)
    labels = torch.tensor([7, 19, 42])
    return inputs, tail, labels


def unpadded_reference(model, prompts, inputs, tail, labels) -> torch.Tensor:
    """One sequence at a time, no padding, no cache: the definition of the scores."""
    embed = model.get_input_embeddings()
    out = torch.empty(prompts.shape[0], len(inputs), len(labels))
    for p in range(prompts.shape[0]):
        for b, ids in enumerate(inputs):
            prompt = prompts[p, b] if prompts.dim() == 4 else prompts[p]
            seq = torch.cat([embed(ids), prompt, embed(tail)])[None]
            out[p, b] = model(inputs_embeds=seq).logits[0, -1, labels]
    return out


@torch.inference_mode()
def test_shared_kv_equals_full_forward_and_unpadded_reference(tiny_llama, batch):
    inputs, tail, labels = batch
    prompts = torch.randn(6, 4, 32, generator=torch.Generator().manual_seed(2)) * 0.1
    shared = scores_after_input(tiny_llama, prompts, inputs, tail, labels, pad_id=0, share=True)
    full = scores_after_input(tiny_llama, prompts, inputs, tail, labels, pad_id=0, share=False)
    reference = unpadded_reference(tiny_llama, prompts, inputs, tail, labels)
    assert shared.shape == (6, 5, 3)
    torch.testing.assert_close(shared, full, **TOL)
    torch.testing.assert_close(shared, reference, **TOL)
    # the prompt matters: different candidates give different scores (a shared path that ignored it would not)
    assert (shared[0] - shared[1]).abs().max() > 1e-3


@torch.inference_mode()
def test_shared_kv_per_example_prompts_and_empty_tail(tiny_llama, batch):
    inputs, tail, labels = batch
    paired = torch.randn(3, len(inputs), 4, 32, generator=torch.Generator().manual_seed(3)) * 0.1
    torch.testing.assert_close(
        scores_after_input(tiny_llama, paired, inputs, tail, labels, pad_id=0),
        unpadded_reference(tiny_llama, paired, inputs, tail, labels),
        **TOL,
    )
    prompts = paired[:, 0]
    no_tail = tail[:0]
    torch.testing.assert_close(
        scores_after_input(tiny_llama, prompts, inputs, no_tail, labels, pad_id=0),
        unpadded_reference(tiny_llama, prompts, inputs, no_tail, labels),
        **TOL,
    )
    no_prompt = prompts[:, :0]  # zero-shot: no prompt and no tail -> the plain forward reads the input
    torch.testing.assert_close(
        scores_after_input(tiny_llama, no_prompt[:1], inputs, no_tail, labels, pad_id=0),
        unpadded_reference(tiny_llama, no_prompt[:1], inputs, no_tail, labels),
        **TOL,
    )


def test_shared_kv_is_differentiable_in_the_prompt(tiny_llama, batch):
    """White-box prompt tuning backprops through the same scoring path."""
    inputs, tail, labels = batch
    prompts = (torch.randn(2, 4, 32, generator=torch.Generator().manual_seed(4)) * 0.1).requires_grad_()
    scores_after_input(tiny_llama, prompts, inputs, tail, labels, pad_id=0).sum().backward()
    assert prompts.grad is not None and prompts.grad.abs().sum() > 0


def test_template_tail_and_split():
    assert template_tail("Review: {text}\nSentiment: {mask}") == "\nSentiment:"
    assert template_tail("{text} ? {mask} , {text_pair}") == " ?"
    assert template_tail("Premise: {text} Hypothesis: {text_pair} Answer: {mask}") == " Answer:"
    assert split_off_tail(["Review: fine\nSentiment:"], "\nSentiment:") == ["Review: fine"]
    with pytest.raises(ConfigError, match=r"\{mask\} News: \{text\}"):
        template_tail("{mask} News: {text}")  # the label word comes before the input: no input to share


def test_local_blackbox_after_input_scores_the_prompt_after_the_input(tiny_models):
    """Through LocalBlackBox (chunking, length sort, original order): each score is the unpadded
    forward of [input][prompt][template tail] read at the label words."""
    from bbfl.blackbox import LocalBlackBox
    from bbfl.data import load_task

    bb = LocalBlackBox(str(tiny_models["llama"]), prompt_position="after_input", max_tokens=300)
    task = load_task("demo").for_head("causal")  # what a causal head reads (encode picks it itself)
    split = task.train.head(7)
    data = bb.encode(task, split)
    prompts = torch.randn(5, 3, bb.hidden_size, generator=torch.Generator().manual_seed(5)) * 0.1
    scores = bb.logits(prompts, data)  # max_tokens=300 forces several example chunks
    tail = bb.tokenizer(template_tail(task.template), add_special_tokens=False)["input_ids"]
    heads = split_off_tail(task.format_before_mask(split), template_tail(task.template))
    inputs = [torch.tensor(ids) for ids in bb.tokenizer(heads)["input_ids"]]
    with torch.inference_mode():
        reference = unpadded_reference(bb.model, prompts, inputs, torch.tensor(tail), bb.label_ids)
    torch.testing.assert_close(scores, reference, **TOL)
    assert bb.counter.stats.queries == 5


def test_after_input_needs_a_causal_head_and_an_input_before_the_mask(tiny_models):
    from bbfl.blackbox import LocalBlackBox
    from bbfl.data import load_task

    with pytest.raises(ConfigError, match="after_input"):
        LocalBlackBox(str(tiny_models["bert"]), head="mlm", prompt_position="after_input")
    with pytest.raises(ConfigError, match="'middle'"):
        LocalBlackBox(str(tiny_models["llama"]), prompt_position="middle")
    bb = LocalBlackBox(str(tiny_models["llama"]), prompt_position="after_input")
    task = load_task("demo", template="{mask} News: {text}")
    with pytest.raises(ConfigError, match="needs a template with"):
        bb.encode(task, task.train.head(2))


def test_prompt_position_is_recorded_in_the_blackbox_record(tiny_models):
    from bbfl.experiment import BlackBoxConfig

    cfg = BlackBoxConfig(model=str(tiny_models["llama"]), prompt_position="after_input")
    record = cfg.record(cfg.build())
    assert record["prompt_position"] == "after_input"
    assert BlackBoxConfig.from_saved(record).build().prompt_position == "after_input"


def test_truncation_cuts_the_input_and_keeps_the_template_tail(tiny_models):
    """A causal context over max_length loses the end of its input, not the tail the label word follows
    (plain right truncation read AG News articles' label word after "...the shares of", not after
    "This news article is about"); contexts that fit are tokenized as before."""
    from bbfl.blackbox import LocalBlackBox
    from bbfl.data import Split, load_task

    bb = LocalBlackBox(str(tiny_models["llama"]), max_length=16)
    task = load_task("demo").for_head("causal")
    tail = template_tail(task.template)
    tail_ids = bb.tokenizer(tail, add_special_tokens=False)["input_ids"]
    short, long = "fine", " ".join(["a wonderfully long and winding review"] * 6)
    split = Split([long, short], [0, 1])
    data = bb.encode(task, split)
    ids = [data.input_ids[int(k)].tolist() for k in torch.argsort(data.order)]  # back to the split's order
    contexts = task.format_before_mask(split)
    full = bb.tokenizer(contexts[0])["input_ids"]  # [CLS] ... [SEP] with this test tokenizer (BERT's)
    assert len(full) > 16  # would be cut
    prefix, suffix = full[:1], full[-1:]
    head = bb.tokenizer(split_off_tail(contexts[:1], tail)[0], add_special_tokens=False)["input_ids"]
    room = 16 - len(tail_ids) - 2
    assert ids[0] == prefix + head[:room] + tail_ids + suffix  # the input's end is cut, the tail kept
    assert ids[1] == bb.tokenizer(contexts[1])["input_ids"]  # fits: its own tokenization, unchanged
    wordy = "{text}" + " so all in all the review says" * 2 + " {mask}"  # a tail longer than max_length
    with pytest.raises(ConfigError, match="no room"):
        ids_keeping_tail(bb.tokenizer, [long + template_tail(wordy)], wordy, max_length=8)
