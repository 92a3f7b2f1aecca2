"""Fuzz: wire decoding + array validation, and run-directory loading, end in bbfl's own errors.

Seeded random mutation (reproducible); ``BBFL_FUZZ_EXAMPLES`` sets the inputs per target (default
20,000 messages; a fortieth of that for run directories, which are resumed for real). Property: every
input is accepted with finite float32 arrays of the expected shapes, or refused with a bbfl
exception that has a message; nothing else escapes, and the stated size limits are checked before
the big part of a message is read.
"""

from __future__ import annotations

import json
import os
import random
import struct
import time

import numpy as np
import pytest
import torch
from safetensors.numpy import save

from bbfl.exceptions import BBFLError, CheckpointError, ConfigError
from bbfl.federation.engine import EngineConfig, run_federation
from bbfl.federation.wire import (
    MAX_HEADER_BYTES,
    MAX_TENSORS,
    InvalidUpdate,
    decode_message,
    encode_message,
    validate_update,
)
from bbfl.io import load_arrays, load_json
from tests.fedone_keyword import small_fedone

FUZZ_EXAMPLES = int(os.environ.get("BBFL_FUZZ_EXAMPLES", "20000"))
SHAPES = {"mean": (16,), "scalars": (4,)}


def _honest_blob() -> bytes:
    rng = np.random.default_rng(0)
    arrays = {"mean": rng.standard_normal(16), "scalars": rng.standard_normal(4)}
    return encode_message(arrays, {"fitness": 0.5, "sigmas": [1.0, 0.9], "local_mu": 2, "examples": 8})


def _mutate(blob: bytes, rng: random.Random) -> bytes:
    data = bytearray(blob)
    size = int.from_bytes(blob[:8], "little")
    kind = rng.randrange(7)
    if kind == 0:  # flip bytes anywhere
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif kind == 1:  # truncate
        data = data[: rng.randrange(len(data))]
    elif kind == 2:  # a different declared header length
        data[:8] = struct.pack("<Q", rng.choice([0, 1, size - 1, size + 1, 2**40, 2**64 - 1, MAX_HEADER_BYTES + 1]))
    elif kind == 3:  # edit the JSON header text: dtypes, shapes, offsets, metadata
        text = bytes(data[8 : 8 + size]).decode("utf-8", "replace")
        swaps = [
            ('"F32"', rng.choice(['"I32"', '"BOOL"', '"F64"', '"BF16"', '"C64"', '"F8_E4M3"', '"U8"', "7"])),
            ("[16]", rng.choice(["[1099511627776]", "[-1]", "[4,4]", "[]", '"x"'])),
            ('"fitness": 0.5', rng.choice(['"fitness": NaN', '"fitness": Infinity', '"fitness": 1e999'])),
            ('"bbfl"', '"other"'),
            ("data_offsets", "offsets"),
            ('{"bbfl"', '{"bbfl": "' + "[" * 3000 + '", "x"'),
        ]
        old, new = rng.choice(swaps)
        header = text.replace(old, new, 1).encode()
        data = bytearray(struct.pack("<Q", len(header)) + header + bytes(data[8 + size :]))
    elif kind == 4:  # junk appended or prepended
        data = data + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    elif kind == 5:  # random bytes
        data = bytearray(rng.randrange(256) for _ in range(rng.randint(0, 200)))
    else:  # the body's floats replaced by NaN/Inf/huge
        value = rng.choice([np.nan, np.inf, -np.inf, 3e38])
        start = 8 + size + 4 * rng.randrange(16)
        data[start : start + 4] = np.float32(value).tobytes()
    return bytes(data)


def test_fuzz_wire_decoding_and_array_validation(capsys):
    rng, blob = random.Random("wire"), _honest_blob()
    rejected = accepted = 0
    slowest = 0.0
    for _ in range(FUZZ_EXAMPLES):
        mutant = _mutate(blob, rng)
        began = time.perf_counter()
        try:
            arrays, header = decode_message(mutant)
            validate_update(arrays, SHAPES, max_norm=1e4)
        except InvalidUpdate as exc:
            assert exc.reason
            rejected += 1
        else:
            accepted += 1
            assert isinstance(header, dict)
            assert all(a.dtype == np.float32 and np.all(np.isfinite(a)) for a in arrays.values())
            json.dumps(header, allow_nan=False)  # no NaN/Inf came through the header either
        slowest = max(slowest, time.perf_counter() - began)
    with capsys.disabled():
        print(f"\nwire fuzz: {FUZZ_EXAMPLES} inputs, {rejected} rejected, {accepted} accepted, 0 crashes")
    assert rejected > FUZZ_EXAMPLES // 2 and slowest < 10.0  # no hang (~0.1 ms each; a loaded machine)


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.bool_, np.float64, np.uint8])
def test_non_float_arrays_are_refused_not_cast(dtype):
    blob = save({"mean": np.ones(16, dtype=dtype)}, metadata={"bbfl": "{}"})
    with pytest.raises(InvalidUpdate, match="dtype"):
        decode_message(blob)


def test_limits_are_checked_before_the_big_part_is_parsed(monkeypatch):
    import safetensors.numpy

    def never(blob):  # the limits must refuse these before safetensors parses anything
        pytest.fail("safetensors reached past a limit")

    monkeypatch.setattr(safetensors.numpy, "load", never)
    header = json.dumps(
        {f"t{i}": {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]} for i in range(5000)}
    )
    many = struct.pack("<Q", len(header)) + header.encode() + bytes(4 * 5000)
    with pytest.raises(InvalidUpdate, match=f"5,000 arrays, more than the limit of {MAX_TENSORS:,}"):
        decode_message(many)
    huge_header = struct.pack("<Q", 20 * 2**20) + b"{" + b" " * 100
    with pytest.raises(InvalidUpdate, match="header of 20,971,520 bytes exceeds"):
        decode_message(huge_header)  # declared, not sent: refused from the first 8 bytes
    with pytest.raises(InvalidUpdate, match="exceeds the limit of 1,000"):
        decode_message(_honest_blob() + bytes(1000), max_bytes=1000)


# ---------------------------------------------------------------- run directories


def test_fuzz_run_directory_loading(tmp_path, capsys):
    """Truncated or garbled checkpoints and JSON files: a resume either works on a finite state or raises a
    CheckpointError naming the file."""
    engine = EngineConfig(rounds=1, seed=0)
    run_federation(small_fedone(num_clients=2, local_steps=1), engine, tmp_path / "good")
    ckpt_bytes = (tmp_path / "good" / "server_state.safetensors").read_bytes()
    rounds_text = (tmp_path / "good" / "rounds.json").read_text()
    rng, n = random.Random("run-dir"), max(20, FUZZ_EXAMPLES // 40)
    refused = 0
    for i in range(n):
        data = bytearray(ckpt_bytes)
        if rng.random() < 0.5:
            data = data[: rng.randrange(len(data))]
        else:
            for _ in range(rng.randint(1, 6)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        run_dir = tmp_path / f"r{i}"
        run_dir.mkdir()
        (run_dir / "server_state.safetensors").write_bytes(bytes(data))
        method = small_fedone(num_clients=2, local_steps=1)
        try:
            run_federation(method, EngineConfig(rounds=2, seed=0), run_dir)
        except CheckpointError as exc:
            assert "server_state.safetensors" in str(exc) or "round" in str(exc)
            refused += 1
        else:
            assert np.all(np.isfinite(method.policy.probs))
        garbled = rounds_text[: rng.randrange(len(rounds_text))]
        (run_dir / "rounds.json").write_text(garbled)
        try:
            load_json(run_dir / "rounds.json")
        except CheckpointError as exc:
            assert "rounds.json" in str(exc)
            refused += 1
    with capsys.disabled():
        print(f"\nrun-directory fuzz: {2 * n} inputs, {refused} refused with CheckpointError, 0 crashes")
    assert refused >= n


def test_load_arrays_widens_bf16_and_f8_and_names_a_bad_file(tmp_path):
    from safetensors.torch import save_file

    save_file(
        {"b": torch.ones(3, dtype=torch.bfloat16), "f8": torch.ones(2, dtype=torch.float8_e4m3fn)}, tmp_path / "x"
    )
    arrays, _ = load_arrays(tmp_path / "x")
    assert arrays["b"].dtype == np.float32 and arrays["f8"].tolist() == [1.0, 1.0]
    (tmp_path / "bad").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(CheckpointError, match="bad is not a readable safetensors file"):
        load_arrays(tmp_path / "bad")
    with pytest.raises(ConfigError, match="no such file"):
        load_arrays(tmp_path / "missing")
    assert issubclass(CheckpointError, BBFLError)


def test_run_files_follow_the_umask(tmp_path):
    from bbfl.io import atomic_write_json

    old = os.umask(0o027)
    try:
        atomic_write_json(tmp_path / "a.json", {"x": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o640  # mkstemp alone gives 0600
    os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "b.json", {"x": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "b.json").stat().st_mode & 0o777 == 0o644
