"""Partitioners and the wire format (the building blocks of the federation engine)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from bbfl.exceptions import ConfigError
from bbfl.federation import InvalidUpdate, decode_message, encode_message, partition_labels, validate_update
from bbfl.federation.partition import label_histogram

LABELS = np.repeat(np.arange(4), 100)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "shards"])
def test_partitions_are_disjoint_cover_everything_and_are_seeded(scheme):
    parts = partition_labels(LABELS, 10, scheme=scheme, alpha=0.5, seed=1)
    allidx = np.concatenate(parts)
    assert len(parts) == 10 and len(allidx) == len(set(allidx.tolist())) == len(LABELS)
    again = partition_labels(LABELS, 10, scheme=scheme, alpha=0.5, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))


def test_smaller_alpha_means_more_label_skew():
    def skew(alpha):
        hist = label_histogram(LABELS, partition_labels(LABELS, 10, scheme="dirichlet", alpha=alpha, seed=0), 4)
        shares = hist / hist.sum(1, keepdims=True)
        return float(shares.max(1).mean())  # share of each client's dominant label

    iid = label_histogram(LABELS, partition_labels(LABELS, 10, seed=0), 4)
    assert (iid / iid.sum(1, keepdims=True)).max(1).mean() < 0.45
    assert skew(0.1) > skew(0.5) > skew(100.0)


def test_strong_skew_with_few_classes_tops_up_small_clients():
    """2 classes, 20 clients, Dir(0.1): redraws alone never give every client 2 examples (ZooPFL's setting)."""
    labels = np.repeat([0, 1], 150)
    parts = partition_labels(labels, 20, scheme="dirichlet", alpha=0.1, seed=13, min_size=2)
    sizes = [len(p) for p in parts]
    assert min(sizes) >= 2 and sum(sizes) == 300 and len(set(np.concatenate(parts).tolist())) == 300
    hist = label_histogram(labels, parts, 2)
    assert (hist.max(1) / hist.sum(1)).mean() > 0.8  # still strongly skewed after the top-up
    again = partition_labels(labels, 20, scheme="dirichlet", alpha=0.1, seed=13, min_size=2)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))


def test_shards_give_few_labels_per_client():
    hist = label_histogram(LABELS, partition_labels(LABELS, 8, scheme="shards", shards_per_client=2, seed=0), 4)
    assert ((hist > 0).sum(1) <= 2).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_clients": 0}, "num_clients"),
        ({"num_clients": 500}, "cannot give"),
        ({"scheme": "zipf"}, "zipf"),
        ({"scheme": "dirichlet", "alpha": 0.0}, "alpha"),
    ],
)
def test_partition_errors_name_the_value(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        partition_labels(LABELS, **{"num_clients": 4, **kwargs})


def test_wire_round_trip_size_and_fp16():
    mean = np.random.default_rng(0).standard_normal(500).astype(np.float32)
    blob = encode_message({"mean": mean}, {"fitness": 0.25, "sigmas": [1.0, 0.9]})
    arrays, header = decode_message(blob)
    np.testing.assert_array_equal(arrays["mean"], mean)
    assert header == {"fitness": 0.25, "sigmas": [1.0, 0.9]}
    assert 2000 <= len(blob) <= 2300  # 500 fp32 values + a small header
    half = encode_message({"mean": mean}, dtype="float16")
    assert len(half) < len(blob) * 0.6
    np.testing.assert_allclose(decode_message(half)[0]["mean"], mean, atol=2e-3)


def test_malformed_messages_are_rejected_with_a_reason():
    with pytest.raises(InvalidUpdate, match="undecodable"):
        decode_message(b"\x10\x00\x00\x00\x00\x00\x00\x00not a safetensors header")
    with pytest.raises(InvalidUpdate, match="undecodable"):
        decode_message(pickle.dumps({"mean": np.zeros(3)}))  # a pickle is just bad bytes here
    shapes = {"mean": (4,)}
    with pytest.raises(InvalidUpdate, match="shape"):
        validate_update({"mean": np.zeros(5)}, shapes)
    with pytest.raises(InvalidUpdate, match="NaN"):
        validate_update({"mean": np.array([0, np.nan, 0, 0])}, shapes)
    with pytest.raises(InvalidUpdate, match="norm"):
        validate_update({"mean": np.full(4, 1e6)}, shapes, max_norm=100.0)
    with pytest.raises(InvalidUpdate, match="missing"):
        validate_update({}, shapes)
    validate_update({"mean": np.ones(4)}, shapes, max_norm=100.0)
