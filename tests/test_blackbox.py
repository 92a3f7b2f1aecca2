"""The local black box: population batching, prompt paths, heads, accounting."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bbfl.blackbox import LocalBlackBox, QueryCounter
from bbfl.blackbox.prefix import prefix_attention_mask, prefix_encode
from bbfl.data import Split, Task
from bbfl.exceptions import BudgetExceeded, ConfigError

TEXTS = [
    "a gripping, beautifully acted film",
    "dull",
    "the plot collapses under its own weight and never recovers , which is a shame",
    "fun for the whole family",
    "i want my two hours back",
    "an instant classic",
]


@pytest.fixture(scope="module")
def task() -> Task:
    split = Split(texts=TEXTS, labels=np.array([1, 0, 0, 1, 0, 1]))
    return Task(
        name="toy",
        labels=["negative", "positive"],
        label_words=["bad", "great"],
        label_descriptions=["It was terrible.", "It was great."],
        template="{text} . It was {mask} .",
        encoder_template="{text}",
        loss="ce",
        train=split,
        test=split,
    )


def _prompts(bb: LocalBlackBox, n: int, length: int = 5, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, length, bb.hidden_size, generator=g) * bb.embedding_std


@pytest.mark.parametrize("mode", ["prefix", "full"])
def test_population_batch_equals_one_at_a_time(minilm, task, mode):
    bb = minilm
    before, bb.prompt_attention = bb.prompt_attention, mode
    try:
        data = bb.encode(task, task.train)
        prompts = _prompts(bb, 4)
        batched = bb.logits(prompts, data)
        single = torch.cat([bb.logits(prompts[i : i + 1], data) for i in range(4)])
        assert batched.shape == (4, len(TEXTS), 2)
        torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-4)
    finally:
        bb.prompt_attention = before


def test_chunking_does_not_change_scores(minilm, task):
    data = minilm.encode(task, task.train)
    prompts = _prompts(minilm, 3)
    full = minilm.logits(prompts, data)
    old = minilm.max_tokens
    minilm.max_tokens = 40  # forces one candidate and one or two examples per forward
    try:
        chunked = minilm.logits(prompts, data)
    finally:
        minilm.max_tokens = old
    torch.testing.assert_close(full, chunked, rtol=1e-4, atol=1e-4)


def test_no_prompt_scores_match_plain_sentence_embeddings(minilm, task):
    """Zero-shot through the black box equals mean-pooled sentence embeddings vs. label descriptions."""
    data = minilm.encode(task, task.train)
    scores = minilm.logits(None, data)[0]
    emb = minilm._embed_texts(TEXTS)
    expected = minilm.similarity_scale * emb @ minilm._embed_texts(task.label_descriptions).T
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_prefix_path_equals_hf_forward_with_prefix_mask(tiny_models, arch):
    bb = LocalBlackBox(str(tiny_models[arch]), head="mlm", prompt_attention="prefix")
    enc = bb.tokenizer(TEXTS[:3], padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    prompts = _prompts(bb, 2, length=4)
    ours = prefix_encode(bb.body, prompts, ids, mask, insert_at=1)
    n_prompt = prompts.shape[1]
    for c in range(2):
        words = bb.word_embeddings(ids)
        embeds = torch.cat([words[:, :1], prompts[c][None].expand(3, -1, -1), words[:, 1:]], 1)
        positions = torch.cat([torch.arange(1 + n_prompt), torch.arange(1 + n_prompt, ids.shape[1] + n_prompt)])
        if arch == "roberta":
            positions = positions + bb.body.embeddings.padding_idx + 1
        float_mask = torch.zeros(prefix_attention_mask(mask, n_prompt).shape)
        float_mask[~prefix_attention_mask(mask, n_prompt)] = torch.finfo(torch.float32).min
        with torch.no_grad():
            hidden = bb.body(
                inputs_embeds=embeds, attention_mask=float_mask, position_ids=positions[None].expand(3, -1)
            ).last_hidden_state
        theirs = torch.cat([hidden[:, :1], hidden[:, 1 + n_prompt :]], 1)
        valid = mask.bool()
        torch.testing.assert_close(ours[c][valid], theirs[valid], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("arch", "head"), [("bert", "mlm"), ("roberta", "mlm"), ("gpt2", "causal"), ("llama", "causal")]
)
def test_heads_on_random_architectures(tiny_models, task, arch, head):
    bb = LocalBlackBox(str(tiny_models[arch]), head="auto")
    assert bb.head == head
    data = bb.encode(task, task.train)
    prompts = _prompts(bb, 3, length=4)
    scores = bb.logits(prompts, data)
    assert scores.shape == (3, len(TEXTS), 2) and torch.isfinite(scores).all()
    single = bb.logits(prompts[1:2], data)
    torch.testing.assert_close(scores[1:2], single, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(scores[0], scores[1])  # the prompt matters


def test_query_accounting_and_budget(task, tiny_models):
    bb = LocalBlackBox(str(tiny_models["bert"]), head="mlm")
    bb.counter = QueryCounter(budget=5)
    data = bb.encode(task, task.train)
    bb.logits(_prompts(bb, 3, length=4), data)
    stats = bb.counter.stats
    assert (stats.queries, stats.examples) == (3, 3 * len(TEXTS))
    assert stats.tokens == 3 * (data.n_tokens + 4 * len(TEXTS))
    with pytest.raises(BudgetExceeded, match="budget 5"):
        bb.logits(_prompts(bb, 3, length=4), data)
    assert bb.counter.stats.queries == 3  # the refused call did no work and was not counted


def test_bad_config_is_a_clear_error(tiny_models):
    with pytest.raises(ConfigError, match="dtype"):
        LocalBlackBox(str(tiny_models["bert"]), dtype="float8")
    with pytest.raises(ConfigError, match="prefix"):
        LocalBlackBox(str(tiny_models["gpt2"]), prompt_attention="prefix")
    with pytest.raises(ConfigError, match="cannot load"):
        LocalBlackBox("/nonexistent/model/dir")


def test_perturbed_replaces_ordinary_tokens_only(minilm):
    from bbfl.data import load_task

    demo = load_task("demo")  # ~1,500 ordinary tokens: the replaced share is tight around the rate
    data = minilm.encode(demo, demo.train)
    special = set(minilm.tokenizer.all_special_ids)
    noisy = minilm.perturbed(data, 0.5, seed=3)
    assert [len(x) for x in noisy.input_ids] == [len(x) for x in data.input_ids]
    flat, flat_noisy = torch.cat(data.input_ids), torch.cat(noisy.input_ids)
    is_special = torch.tensor([int(t) in special for t in flat])
    assert torch.equal(flat[is_special], flat_noisy[is_special])  # [CLS], [SEP], [MASK] stay put
    changed = (flat != flat_noisy)[~is_special].float().mean().item()
    assert 0.45 < changed < 0.55, changed
    assert all(torch.equal(a, b) for a, b in zip(noisy.input_ids, minilm.perturbed(data, 0.5, seed=3).input_ids))
    assert all(torch.equal(a, b) for a, b in zip(data.input_ids, minilm.perturbed(data, 0.0, seed=3).input_ids))
    with pytest.raises(ConfigError, match="rate"):
        minilm.perturbed(data, 1.5, seed=0)


def test_paired_prompts_score_each_example_with_its_own_prompt(task):
    bb = LocalBlackBox(prompt_attention="full")
    data = bb.encode(task, task.train)
    shared = _prompts(bb, 2, length=3)
    same = shared[:, None].expand(-1, len(data), -1, -1)
    torch.testing.assert_close(bb.paired_logits(same, data), bb.logits(shared, data), atol=1e-4, rtol=1e-4)
    own = torch.stack([_prompts(bb, len(data), length=3, seed=s) for s in (1, 2)])  # [2, B, 3, H]
    paired = bb.paired_logits(own, data)
    for b in range(len(data)):
        one = bb.encode(task, task.train.subset([b]))
        torch.testing.assert_close(paired[:, b : b + 1], bb.logits(own[:, b], one), atol=1e-4, rtol=1e-4)
    assert bb.counter.stats.queries == 2 + 2 + 2 + 2 * len(data)
    with pytest.raises(ConfigError, match="paired prompts"):
        bb.paired_logits(shared, data)


def test_defaults_are_the_papers_function(tiny_models, minilm):
    """auto = full attention everywhere; the official placement for MLM heads; MiniLM keeps inputs_embeds."""
    from bbfl.experiment import BlackBoxConfig

    assert minilm.prompt_attention == "full" and minilm.prompt_placement == "inputs_embeds"
    for arch in ("bert", "roberta"):
        bb = LocalBlackBox(str(tiny_models[arch]), head="mlm")
        assert (bb.prompt_attention, bb.prompt_placement) == ("full", "after_embeddings")
        assert BlackBoxConfig().record(bb)["prompt_placement"] == "after_embeddings"
    assert LocalBlackBox(str(tiny_models["gpt2"])).prompt_placement == "inputs_embeds"
    with pytest.raises(ConfigError, match="after_embeddings"):
        LocalBlackBox(str(tiny_models["gpt2"]), prompt_placement="after_embeddings")
    with pytest.raises(ConfigError, match="'sideways'"):
        LocalBlackBox(str(tiny_models["bert"]), prompt_placement="sideways")
    # a run directory from before the option existed ran inputs_embeds, and resumes so
    assert BlackBoxConfig.from_saved({"head": "mlm"}).prompt_placement == "inputs_embeds"


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_official_placement_equals_explicit_layernorm_plus_az(tiny_models, task, arch):
    """after_embeddings = LayerNorm(word + position + type embeddings of [CLS], ids 1000.., the text) + A z
    at the prompt positions, then the encoder and the MLM head: written out here example by example."""
    bb = LocalBlackBox(str(tiny_models[arch]), head="mlm", prompt_attention="full")
    data = bb.encode(task, task.train)
    az = _prompts(bb, 2, length=4)
    scores = bb.logits(az, data)
    emb, n_prompt = bb.body.embeddings, 4
    offset = emb.padding_idx + 1 if arch == "roberta" else 0
    label_ids = [
        bb.tokenizer(("" if arch == "bert" else " ") + w, add_special_tokens=False)["input_ids"][0]
        for w in ("bad", "great")
    ]
    with torch.no_grad():
        for j, ids in enumerate(data.input_ids):
            full = torch.cat([ids[:1], torch.arange(1000, 1000 + n_prompt), ids[1:]])
            positions = torch.arange(len(full)) + offset
            layer_in = emb.LayerNorm(
                emb.word_embeddings(full) + emb.position_embeddings(positions) + emb.token_type_embeddings.weight[0]
            )
            for c in range(2):
                x = layer_in.clone()
                x[1 : 1 + n_prompt] += az[c]
                hidden = bb.body.encoder(x[None]).last_hidden_state[0]
                mask_at = int(data.read_at[j]) + n_prompt
                logits = bb.model.get_output_embeddings()(
                    (bb.model.cls.predictions.transform if arch == "bert" else _roberta_transform(bb.model))(
                        hidden[mask_at]
                    )
                )
                torch.testing.assert_close(scores[c, int(data.order[j])], logits[label_ids], rtol=1e-4, atol=1e-5)
    # and it is a different function from feeding A z as word embeddings
    other = LocalBlackBox(str(tiny_models[arch]), head="mlm", prompt_attention="full", prompt_placement="inputs_embeds")
    # (a random tiny model moves its logits little: the gap is ~10x the tolerance above)
    assert float((other.logits(az, other.encode(task, task.train)) - scores).abs().max()) > 1e-4


def _roberta_transform(model):
    head = model.lm_head
    return lambda h: head.layer_norm(torch.nn.functional.gelu(head.dense(h)))


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_prefix_path_with_official_placement_equals_hf_forward(tiny_models, arch):
    """prefix_encode(prompt_ids=...) = the HF forward with the prefix mask and A z added after the embeddings."""
    bb = LocalBlackBox(str(tiny_models[arch]), head="mlm", prompt_attention="prefix")
    enc = bb.tokenizer(TEXTS[:3], padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    az, n_prompt = _prompts(bb, 2, length=4), 4
    prompt_ids = torch.arange(1000, 1000 + n_prompt)
    ours = prefix_encode(bb.body, az, ids, mask, insert_at=1, prompt_ids=prompt_ids)
    full_ids = torch.cat([ids[:, :1], prompt_ids.expand(3, -1), ids[:, 1:]], 1)
    positions = torch.arange(full_ids.shape[1]) + (bb.body.embeddings.padding_idx + 1 if arch == "roberta" else 0)
    float_mask = torch.zeros(prefix_attention_mask(mask, n_prompt).shape)
    float_mask[~prefix_attention_mask(mask, n_prompt)] = torch.finfo(torch.float32).min
    for c in range(2):

        def add_az(_module, _args, output, c=c):
            output = output.clone()
            output[:, 1 : 1 + n_prompt] += az[c]
            return output

        handle = bb.body.embeddings.register_forward_hook(add_az)
        try:
            with torch.no_grad():
                hidden = bb.body(
                    input_ids=full_ids, attention_mask=float_mask, position_ids=positions[None].expand(3, -1)
                ).last_hidden_state
        finally:
            handle.remove()
        theirs = torch.cat([hidden[:, :1], hidden[:, 1 + n_prompt :]], 1)
        torch.testing.assert_close(ours[c][mask.bool()], theirs[mask.bool()], rtol=1e-4, atol=1e-4)


def test_chunks_cover_every_example_within_the_token_cap_and_end_at_padding_waste():
    """Sorted lengths are split into (candidate, example) chunks under ``max_tokens``, each example once
    per candidate; a chunk that already holds MIN_CHUNK_TOKENS cells ends where padding would pass
    MAX_PADDING_RATIO, so mixed lengths are not padded to the longest (one chunk, before)."""
    import random

    from bbfl.blackbox.chunking import MAX_PADDING_RATIO, chunks

    rng = random.Random(0)
    lengths = sorted(rng.randint(8, 128) for _ in range(500))
    for n_cand, max_tokens in ((1, 32768), (20, 32768), (3, 700)):
        seen = [[] for _ in range(n_cand)]
        for cand, ex in chunks(n_cand, lengths, max_tokens, min_tokens=2048):
            width, count = cand.stop - cand.start, ex.stop - ex.start
            assert count == 1 or width * count * lengths[ex.stop - 1] <= max_tokens
            padded, real = width * count * lengths[ex.stop - 1], width * sum(lengths[ex])
            assert padded <= MAX_PADDING_RATIO * real or width * (count - 1) * lengths[ex.stop - 2] < 2048
            for c in range(cand.start, cand.stop):
                seen[c].extend(range(ex.start, ex.stop))
        assert all(s == list(range(len(lengths))) for s in seen)
    one = list(chunks(1, lengths, 32768, min_tokens=2048))
    padded = sum((ex.stop - ex.start) * lengths[ex.stop - 1] for _, ex in one)
    assert padded <= 1.1 * sum(lengths)  # the old rule padded ~1.3x here (two chunks up to 32768 cells)
