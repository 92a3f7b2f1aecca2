"""Malformed Flower replies become rejected client replies with a reason; the round goes on.

A stand-in grid (no network) answers the real :class:`FlowerRunner` with real Flower ``Message``s: the
honest ones computed by the method's own ``client_update`` on the downlink it was sent, the hostile
ones built by hand (no ``up``, no ``seconds``, a header that is not JSON, an unknown node, an object
array, an array declaring 2^40 elements, ...).
"""

from __future__ import annotations

import io
import json
import os
import random
import resource
import subprocess

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from bbfl.federation.engine import EngineConfig, run_federation
from bbfl.flower.app import UNKNOWN_SENDER, FlowerRunner, _from_record, _to_record, parse_reply
from tests.fedone_keyword import small_fedone

FUZZ_EXAMPLES = int(os.environ.get("BBFL_FUZZ_EXAMPLES", "3000"))
SHAPES = {"probs": (2, 4)}


@pytest.fixture(autouse=True)
def server_identity():
    """Messages are built inside a ServerApp's process, which Flower identifies; this test is one."""
    saved = TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def _npy(array: np.ndarray, header: dict | None = None) -> bytes:
    """.npy bytes of ``array``, or a hand-made .npy header followed by ``array``'s bytes."""
    buffer = io.BytesIO()
    if header is None:
        np.save(buffer, array, allow_pickle=True)
    else:
        np.lib.format.write_array_header_1_0(buffer, header)
        buffer.write(array.tobytes())
    return buffer.getvalue()


def _reply(message: Message, up=None, meta=None, node: int | None = None) -> Message:
    content = {}
    if up is not None:
        content["up"] = up
    if meta is not None:
        content["meta"] = meta
    if node is not None:  # a reply's sender is the node the message was sent to
        message = Message(content=RecordDict(), dst_node_id=node, message_type="train")
    return Message(content=RecordDict(content), reply_to=message)


def _meta(header: str = '{"examples": 4, "loss": 0.5}', seconds=0.1) -> ConfigRecord:
    return ConfigRecord({"header": header, "seconds": seconds})


def _good_up() -> ArrayRecord:
    return _to_record({"probs": np.full((2, 4), 0.25, np.float32)}, "float32")


def _array(dtype: str, shape: tuple, data: bytes) -> ArrayRecord:
    return ArrayRecord(array_dict={"probs": Array(dtype=dtype, shape=shape, stype="numpy.ndarray", data=data)})


HOSTILE = {
    "no up": lambda m: _reply(m, meta=_meta()),
    "no meta": lambda m: _reply(m, up=_good_up()),
    "no seconds": lambda m: _reply(m, up=_good_up(), meta=ConfigRecord({"header": "{}"})),
    "NaN seconds": lambda m: _reply(m, up=_good_up(), meta=_meta(seconds=float("nan"))),
    "header not JSON": lambda m: _reply(m, up=_good_up(), meta=_meta(header="{'examples': 4")),
    "header a list": lambda m: _reply(m, up=_good_up(), meta=_meta(header="[1, 2]")),
    "deep header": lambda m: _reply(m, up=_good_up(), meta=_meta(header="[" * 100_000)),
    "up is a ConfigRecord": lambda m: _reply(m, up=ConfigRecord({"probs": 1}), meta=_meta()),
    "unknown node": lambda m: _reply(m, up=_good_up(), meta=_meta(), node=987654),
    "object array": lambda m: _reply(
        m, up=_array("float32", (2, 4), _npy(np.array([{"x": 1}] * 8, dtype=object).reshape(2, 4))), meta=_meta()
    ),
    "2^40 elements": lambda m: _reply(
        m,
        up=_array(
            "float32",
            (2**40,),
            _npy(np.zeros(4, np.float32), {"descr": "<f4", "fortran_order": False, "shape": (2**40,)}),
        ),
        meta=_meta(),
    ),
    "npy header says 2^40": lambda m: _reply(
        m,
        up=_array(
            "float32",
            (2, 4),
            _npy(np.zeros(4, np.float32), {"descr": "<f4", "fortran_order": False, "shape": (2**40,)}),
        ),
        meta=_meta(),
    ),
    "complex array": lambda m: _reply(
        m, up=_array("float32", (2, 4), _npy(np.zeros((2, 4), np.complex64))), meta=_meta()
    ),
    "int array": lambda m: _reply(m, up=_array("float32", (2, 4), _npy(np.zeros((2, 4), np.int32))), meta=_meta()),
    "short data": lambda m: _reply(
        m, up=_array("float32", (2, 4), _npy(np.zeros((2, 4), np.float32))[:-4]), meta=_meta()
    ),
    "wrong name": lambda m: _reply(m, up=_to_record({"mean": np.zeros((2, 4))}, "float32"), meta=_meta()),
    "NaN header value": lambda m: _reply(m, up=_good_up(), meta=_meta(header='{"examples": 4, "loss": NaN}')),
    "client error": lambda m: Message(Error(code=1, reason="client crashed"), reply_to=m),
}


class StandInGrid:
    """Answers like SuperNodes: node 100 + i holds partition i; ``hostile`` maps a partition to its reply."""

    def __init__(self, method, hostile: dict) -> None:
        self.method, self.hostile, self.sent = method, hostile, []

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for message in messages:
            self.sent.append(message)
            client = message.metadata.dst_node_id - 100
            if client in self.hostile:
                replies.append(self.hostile[client](message))
                continue
            meta = message.content["meta"]
            down = _from_record(message.content["down"])
            arrays, header = self.method.client_update(
                client, int(meta["round"]), down, json.loads(meta["header"]), int(meta["seed"])
            )
            replies.append(_reply(message, up=_to_record(arrays, "float32"), meta=_meta(json.dumps(header))))
        return replies


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_each_hostile_reply_is_a_rejection_with_a_reason(case):
    message = Message(content=RecordDict(), dst_node_id=100, message_type="train")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    reply = parse_reply(HOSTILE[case](message), {100: 0}, SHAPES)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert reply.arrays is None and reply.error, case
    assert reply.client == (UNKNOWN_SENDER if case == "unknown node" else 0)
    assert grown_mib < 64, f"{case}: peak memory grew {grown_mib:.0f} MiB"  # nothing allocated for 2^40


def test_an_honest_reply_parses_to_the_sent_arrays():
    message = Message(content=RecordDict(), dst_node_id=100, message_type="train")
    probs = np.random.default_rng(0).random((2, 4)).astype(np.float32)
    for dtype in ("float32", "float16"):
        up = _to_record({"probs": probs}, dtype)
        reply = parse_reply(_reply(message, up=up, meta=_meta()), {100: 0}, SHAPES)
        assert reply.error is None and reply.header == {"examples": 4, "loss": 0.5} and reply.seconds == 0.1
        np.testing.assert_allclose(reply.arrays["probs"], probs, atol=1e-3)
        assert reply.arrays["probs"].dtype == np.float32


def test_a_round_with_hostile_replies_goes_on(tmp_path):
    """Four partitions: two answer honestly, two with broken replies; every round aggregates the honest two."""
    method = small_fedone(num_clients=4)
    grid = StandInGrid(method, {1: HOSTILE["2^40 elements"], 3: HOSTILE["header not JSON"]})
    runner = FlowerRunner(grid, {i: 100 + i for i in range(4)})
    records = run_federation(method, EngineConfig(rounds=2, seed=0), tmp_path, runner=runner)
    for record in records[1:]:
        assert record["aggregated"] == [0, 2]
        assert {r["client"] for r in record["rejected"]} == {1, 3}
        assert all(r["reason"] for r in record["rejected"])
    assert len(grid.sent) == 8


def test_fuzz_flower_replies(capsys):
    """Seeded random mutations of an honest reply's parts: every one parses or is rejected with a reason."""
    rng = random.Random("flower-replies")
    message = Message(content=RecordDict(), dst_node_id=100, message_type="train")
    good = _npy(np.full((2, 4), 0.25, np.float32))
    rejected = 0
    for _ in range(FUZZ_EXAMPLES):
        data, dtype, shape = bytearray(good), "float32", (2, 4)
        header, seconds = '{"examples": 4, "loss": 0.5}', 0.1
        part = rng.choice(["none", "data", "data", "dtype", "shape", "header", "seconds"])
        if part == "data":  # flipped bytes (in the .npy header or the floats) or a truncation
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            if rng.random() < 0.3:
                data = data[: rng.randrange(len(data))]
        elif part == "dtype":
            dtype = rng.choice(["float16", "float64", "object", "int8", "bool", "complex64", ""])
        elif part == "shape":
            shape = rng.choice([(8,), (2**40,), (), (2, 4, 1), (-1,), (4, 2)])
        elif part == "header":
            header = rng.choice(["", "nul\x00", "[" * 5000, '{"a": 1e999}', '{"a": NaN}', "7", '{"a": [1, 2]}'])
        elif part == "seconds":
            seconds = rng.choice([-1.0, float("inf"), float("nan"), 3, 10**30])
        up = _array(dtype, shape, bytes(data))
        reply = parse_reply(_reply(message, up=up, meta=_meta(header, seconds)), {100: 0}, SHAPES)
        if reply.error is not None:
            rejected += 1
        else:
            assert reply.arrays["probs"].shape == (2, 4) and isinstance(reply.header, dict)
            json.dumps(reply.header, allow_nan=False)  # no NaN/Inf/1e999 came through
    with capsys.disabled():
        print(f"\nflower reply fuzz: {FUZZ_EXAMPLES} inputs, {rejected} rejected, 0 crashes")
    assert rejected > FUZZ_EXAMPLES // 2


def test_local_federation_never_installs_at_runtime_and_a_failed_run_says_why(tmp_path, monkeypatch):
    """Flower 1.41 runs `uv sync` per run unless told not to (no package index here); a failed run raises
    with the SuperLink's error line instead of returning a status that prints an empty table."""
    from bbfl.exceptions import BBFLError
    from bbfl.flower.local import LocalFederation

    fed = LocalFederation(2, workdir=tmp_path)
    spawned = []
    monkeypatch.setattr(fed, "_spawn", lambda name, args: spawned.append(args))
    monkeypatch.setattr(fed, "_wait_for_port", lambda port, wait: None)
    fed.start()
    assert "--disable-runtime-dependency-installation" in spawned[0] and spawned[0][0] == "flower-superlink"
    assert fed.env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"  # the SuperNodes read it

    (tmp_path / "superlink.log").write_text("INFO: starting\nERROR: ServerApp failed with exception: boom\n")
    monkeypatch.setattr(fed, "status", lambda run_id: {"status": "finished:failed", "status-details": "x"})
    monkeypatch.setattr(
        subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, stdout='{"run-id": 7}', stderr="")
    )
    with pytest.raises(BBFLError, match="Flower run 7 ended finished:failed x: ERROR: ServerApp failed.*boom"):
        fed.run("{}", tmp_path / "run", timeout=30)
