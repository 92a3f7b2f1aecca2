"""BDPL's official update pinned on hand-computed numbers, its PMI candidates, and the CI no-skip rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bbfl.methods.bdpl import BDPLConfig, candidate_vocab, pmi_ngrams, policy_gradient
from bbfl.methods.bdpl.method import AdamW, PromptPolicy, clip_norm

PROBS = np.array(
    [
        [0.1, 0.2, 0.3, 0.4],
        [0.25, 0.25, 0.25, 0.25],
        [0.5, 0.2, 0.2, 0.1],
    ]
)
INDICES = np.array([[0, 1, 2], [3, 1, 0]])  # two sampled prompts, one token per position
LOSSES = np.array([1.0, 3.0])  # centred: -1, +1; divided by I - 1 = 1


def test_bdpl_gradient_on_a_3x4_example_by_hand():
    # d_k = -1/p everywhere, +1/p on the token prompt k chose; g = sum_k (L_k - mean) d_k / (I - 1)
    # row 0: prompt 0 chose 0, prompt 1 chose 3 -> [-(1/.1) - 1/.1, -(-1/.2) - 1/.2, .., -(-1/.4) + 1/.4]
    expected = np.array(
        [
            [-20.0, 0.0, 0.0, 5.0],
            [0.0, 0.0, 0.0, 0.0],  # both prompts chose token 1: the +1 and -1 cancel
            [4.0, 0.0, -10.0, 0.0],
        ]
    )
    np.testing.assert_allclose(policy_gradient(PROBS, INDICES, LOSSES), expected, atol=1e-12)


def test_a_zero_probability_adds_no_term_and_nothing_non_finite():
    probs = PROBS.copy()
    probs[0] = [0.0, 0.2, 0.4, 0.4]  # token 0 can no longer be drawn
    grad = policy_gradient(probs, np.array([[1, 1, 2], [3, 1, 0]]), LOSSES)
    assert np.isfinite(grad).all() and grad[0, 0] == 0.0


def test_clip_and_adamw_match_torch():
    grad = policy_gradient(PROBS, INDICES, LOSSES)
    clipped = clip_norm(grad, 3.0)
    param = torch.tensor(PROBS, requires_grad=True)
    param.grad = torch.tensor(grad)
    torch.nn.utils.clip_grad_norm_(param, 3.0)
    np.testing.assert_allclose(clipped, param.grad.numpy(), rtol=1e-12)
    assert np.linalg.norm(grad) > 3 and abs(np.linalg.norm(clipped) - 3.0) < 1e-5

    ours, p = AdamW(PROBS.shape, lr=1e-2, weight_decay=0.1), PROBS.copy()
    opt = torch.optim.AdamW([param], lr=1e-2, weight_decay=0.1)
    for k in range(3):  # three steps: the moments and the bias correction must match too
        g = clipped * (k + 1)
        p = ours.step(p, g)
        param.grad = torch.tensor(g)
        opt.step()
    np.testing.assert_allclose(p, param.detach().numpy(), rtol=1e-10)


def test_one_step_from_uniform_moves_probabilities_a_little_not_to_a_collapse():
    # bbfl's earlier rule (plain SGD, no clip, lr 0.25 here = 0.5 on half the gradient) made one row's top
    # probability jump; BDPL's clipped AdamW step at lr 1e-4 moves each entry by at most ~lr
    rng = np.random.default_rng(0)
    uniform = PromptPolicy.uniform(10, 50)
    indices = uniform.sample(rng, 20)
    losses = rng.normal(size=20)
    official = PromptPolicy.uniform(10, 50)
    cfg = BDPLConfig(prompt_length=10, num_candidates=50)
    official.step(indices, losses, cfg, AdamW(official.probs.shape, cfg.lr, cfg.weight_decay))
    assert np.abs(official.probs - 1 / 50).max() < 3e-4
    sgd = PromptPolicy.uniform(10, 50)
    sgd.step(indices, losses, BDPLConfig(optimizer="sgd", grad_clip=0.0, lr=0.25), None)
    assert sgd.probs.max() > 0.2  # the collapse the official rule avoids


def test_pmi_ngrams_join_high_pmi_pairs_and_rank_by_frequency():
    texts = ["new york is big", "i love new york", "new york new york", "the cat is here", "the dog is here"] * 3
    # 45 adjacent pairs; c(new) = c(york) = 12, c(is) = 9. PMI(new, york) = log(45 * 12 / 144) = 1.32 >= 1:
    # joined; PMI(york, new) = log(45 * 3 / 144) < 1 and PMI(york, is) = log(45 * 3 / 108) = 0.22: split.
    # Segments: "new york" x9, "i love new york", "is big", "the cat is here", "the dog is here" x3 each;
    # then each kept n-gram is counted wherever it occurs: "new york" 12 times (3 inside "i love new york").
    ranked = pmi_ngrams(texts, min_count=1, min_pmi=1.0, freq_threshold=1)
    assert ranked == [
        ("new york", 12),
        ("i love new york", 3),
        ("is big", 3),
        ("the cat is here", 3),
        ("the dog is here", 3),
    ]
    assert pmi_ngrams(texts, min_count=1, min_pmi=1.0, freq_threshold=3) == [("new york", 12)]
    # with the official thresholds (counts > 5) only three n-grams survive; the other 4 candidates are the
    # most frequent words (new 12, york 12, is 9, here 6), never a repeat
    assert pmi_ngrams(texts) == [("new york", 12), ("is here", 6), ("the", 6)]
    assert candidate_vocab(texts, 7) == ["new york", "is here", "the", "new", "york", "is", "here"]


def test_candidate_vocab_rejects_unknown_method():
    from bbfl.exceptions import ConfigError

    with pytest.raises(ConfigError, match="'tfidf'"):
        candidate_vocab(["a b c"], 2, method="tfidf")


@pytest.mark.parametrize("ci", ["true", ""])
def test_missing_data_or_extra_fails_under_ci_and_skips_otherwise(monkeypatch, ci):
    from tests.conftest import require_module, shared_task_dir

    monkeypatch.setenv("CI", ci)
    expected = pytest.fail.Exception if ci else pytest.skip.Exception
    with pytest.raises(expected, match="no-such-task"):
        shared_task_dir("no-such-task")
    with pytest.raises(expected, match="no_such_extra"):
        require_module("no_such_extra")


def test_fedone_train_queries_match_the_black_box_counter(tmp_path):
    from bbfl.federation.engine import EngineConfig, run_federation
    from bbfl.methods.bdpl import FedOne
    from tests.test_openai_blackbox import VOCAB, KeywordBox, keyword_data

    box = KeywordBox()
    cfg = BDPLConfig(prompt_length=2, num_candidates=len(VOCAB), samples=3, local_steps=2, seed=0)
    method = FedOne(cfg, box, [keyword_data(4, i) for i in range(3)], keyword_data(6), VOCAB, "ce")
    records = run_federation(method, EngineConfig(rounds=3, clients_per_round=1, seed=0), tmp_path)
    evaluations = len(records)  # round 0 and every round score the global prompt once
    assert records[-1]["train_queries"] == box.counter.stats.queries - evaluations > 0


def test_bdpl_learns_the_helpful_word_with_the_official_update():
    from bbfl.methods.bdpl import run_bdpl
    from tests.test_openai_blackbox import VOCAB, KeywordBox, keyword_data

    cfg = BDPLConfig(prompt_length=2, num_candidates=len(VOCAB), samples=6, lr=0.02, budget=600, eval_every=60)
    result = run_bdpl(cfg, KeywordBox(), keyword_data(8), keyword_data(6, 1), VOCAB)
    magic = VOCAB.index("magic")
    assert (result.probs[:, magic] > 1 / len(VOCAB)).all()  # both positions moved towards it
    assert "magic" in result.prompt.split() and result.dev_accuracy == 1.0
