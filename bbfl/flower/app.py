"""bbfl methods on Flower's Deployment Engine: one ServerApp + ClientApp pair for every FederatedMethod.

The server side is the in-process engine itself (:func:`bbfl.federation.engine.run_federation`:
sampling, drop-outs, deadlines, validation, checkpoints, resume) with a different delivery: a
:class:`FlowerRunner` sends the round's downlink to the SuperNodes holding the sampled partitions and
brings their replies back. Payloads are Flower ``ArrayRecord``s (numpy arrays, no pickle) plus a JSON
header in a ``ConfigRecord``; a client's private state (e.g. ZooPFL's) lives in its ``Context``.

Both sides build the same method from the run config key ``bbfl-config`` (the JSON of a bbfl run's
``config.json``: data, method, engine and black-box settings), so a run is reproducible from it and
the SuperNodes need no other setup than ``--node-config "partition-id=<i>"``. With the same seed the
result equals the in-process engine's (``tests/test_flower.py`` checks this on real processes).

Try it on one machine::

    bbfl flower-local --clients 3 --rounds 3   # SuperLink + 3 SuperNodes + `flwr run`, then stops them
"""

from __future__ import annotations

import io
import json
import math
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from bbfl.exceptions import ConfigError
from bbfl.federation.contract import Arrays, FederatedMethod
from bbfl.federation.engine import ClientReply, EngineConfig, round_seed, run_federation
from bbfl.federation.wire import MAX_HEADER_BYTES, MAX_TENSORS, WIRE_DTYPES, InvalidUpdate, parse_header_json

APP_DIR = Path(__file__).with_name("flower_app")  # the Flower App (pyproject.toml) `flwr run` ships
_BUILT: dict[str, tuple[FederatedMethod, EngineConfig]] = {}  # per process: build a method once


def build_method(config_json: str) -> tuple[FederatedMethod, EngineConfig]:
    """The method and engine settings a bbfl run config describes (cached per process)."""
    if config_json not in _BUILT:
        from bbfl.methods.registry import build_federated_method

        _BUILT[config_json] = build_federated_method(json.loads(config_json))
    return _BUILT[config_json]


def _to_record(arrays: Arrays, dtype: str) -> ArrayRecord:
    cast = {k: Array(np.ascontiguousarray(v, dtype=WIRE_DTYPES[dtype])) for k, v in arrays.items()}
    return ArrayRecord(array_dict=cast)


def _from_record(record: ArrayRecord) -> Arrays:
    return {k: v.numpy().astype(np.float32) for k, v in record.items()}


UNKNOWN_SENDER = -1  # the client id of a rejected reply from a node that holds no partition of this run


def parse_reply(reply: Message, client_of: dict[int, int], shapes: dict[str, tuple[int, ...]]) -> ClientReply:
    """One SuperNode reply as a :class:`ClientReply`; anything malformed is a rejected reply with the reason.

    Nothing is trusted: the sender must be a node of this run, ``up`` an ArrayRecord holding exactly the
    expected float arrays, ``meta`` a header (JSON object, at most ``MAX_HEADER_BYTES``) and finite
    ``seconds``. Array sizes are checked against the expected shapes before any array is read.
    """
    node = reply.metadata.src_node_id
    client = client_of.get(node, UNKNOWN_SENDER)
    try:
        if client == UNKNOWN_SENDER:
            raise InvalidUpdate(f"reply from node {node}, which holds no partition of this run")
        if reply.has_error():
            raise InvalidUpdate(f"client error: {reply.error.reason}")
        content = reply.content
        up, meta = _typed(content, "up", ArrayRecord, "reply"), _typed(content, "meta", ConfigRecord, "reply")
        header_text, seconds = (
            _typed(meta, "header", str, "reply meta"),
            _typed(meta, "seconds", (int, float), "reply meta"),
        )
        if len(header_text) > MAX_HEADER_BYTES:
            raise InvalidUpdate(f"reply header of {len(header_text):,} characters exceeds {MAX_HEADER_BYTES:,}")
        if isinstance(seconds, bool) or not math.isfinite(seconds) or seconds < 0:
            raise InvalidUpdate(f"reply 'seconds' is {seconds!r}, expected a finite number >= 0")
        header = _json_object(header_text)
        arrays = arrays_from_record(up, shapes)
        return ClientReply(client, arrays, header, float(seconds), up.count_bytes() + len(header_text))
    except InvalidUpdate as exc:
        return ClientReply(client, None, {}, 0.0, 0, exc.reason)
    except Exception as exc:  # a trust boundary: whatever else a malformed reply trips is a rejection too
        return ClientReply(client, None, {}, 0.0, 0, f"malformed reply ({type(exc).__name__}: {str(exc)[:120]})")


def _typed(mapping, key: str, kind, where: str):
    """``mapping[key]`` if present and of ``kind``; else InvalidUpdate naming ``where`` and ``key``."""
    if key not in mapping:
        raise InvalidUpdate(f"{where} lacks {key!r}")
    value = mapping[key]
    if not isinstance(value, kind):
        raise InvalidUpdate(f"{where} {key!r} is a {type(value).__name__}, not the expected type")
    return value


def _json_object(text: str) -> dict:
    try:
        header = parse_header_json(text)
    except (ValueError, RecursionError) as exc:
        raise InvalidUpdate(f"reply header is not strict JSON ({type(exc).__name__}: {str(exc)[:80]})") from exc
    if not isinstance(header, dict):
        raise InvalidUpdate(f"reply header should be a JSON object, got {type(header).__name__}")
    return header


def arrays_from_record(record: ArrayRecord, shapes: dict[str, tuple[int, ...]]) -> Arrays:
    """The expected float arrays of an uplink record, as float32; InvalidUpdate for anything else.

    Names, dtypes and shapes (the Array's and the .npy header's) are checked before a byte is copied,
    so a record declaring 2^40 elements allocates nothing; object, complex, int and bool arrays are
    refused, never cast.
    """
    if len(record) > MAX_TENSORS:
        raise InvalidUpdate(f"reply holds {len(record):,} arrays, more than the limit of {MAX_TENSORS:,}")
    names = set(record.keys())
    if names != set(shapes):
        missing, extra = sorted(set(shapes) - names), sorted(names - set(shapes))[:5]
        raise InvalidUpdate(f"reply arrays differ from the expected ones (missing {missing}, unexpected {extra})")
    return {name: _array(name, record[name], tuple(shapes[name])) for name in shapes}


def _array(name: str, array: Array, shape: tuple[int, ...]) -> np.ndarray:
    if not isinstance(array, Array) or array.stype != "numpy.ndarray":
        raise InvalidUpdate(f"array {name!r} is not a numpy-serialised Array")
    if array.dtype not in WIRE_DTYPES or tuple(array.shape) != shape:
        raise InvalidUpdate(f"array {name!r} is {array.dtype} {tuple(array.shape)}, expected float32/float16 {shape}")
    buffer = io.BytesIO(array.data)
    try:  # the .npy header (numpy caps it at 10 kB and parses it without eval)
        version = np.lib.format.read_magic(buffer)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in read_header:
            raise ValueError(f".npy version {version} is not 1.0 or 2.0")
        declared, fortran, dtype = read_header[version](buffer)
    except (ValueError, SyntaxError, TypeError) as exc:
        raise InvalidUpdate(f"array {name!r} has a malformed .npy header ({str(exc)[:120]})") from exc
    if dtype not in (np.dtype("<f4"), np.dtype("<f2")) or tuple(declared) != shape or fortran:
        raise InvalidUpdate(f"array {name!r} holds {dtype} {tuple(declared)}, expected float32/float16 {shape}")
    count, offset = math.prod(shape), buffer.tell()
    if len(array.data) - offset != count * dtype.itemsize:
        raise InvalidUpdate(f"array {name!r} holds {len(array.data) - offset} bytes, expected {count * dtype.itemsize}")
    return np.frombuffer(array.data, dtype, count, offset).reshape(shape).astype(np.float32)


class FlowerRunner:
    """Deliver a round to SuperNodes (partition id -> node id) and collect their replies."""

    def __init__(self, grid: Grid, node_of: dict[int, int], timeout: float | None = None) -> None:
        self.grid, self.node_of, self.timeout = grid, node_of, timeout

    def __call__(self, method, config: EngineConfig, round_: int, clients: list[int], arrays: Arrays, header: dict):
        messages, down = [], None
        for client in clients:
            down = _to_record(
                arrays, config.transport_dtype
            )  # one record per message: Flower pushes objects per message
            meta = {"header": json.dumps(header), "round": round_, "seed": round_seed(config.seed, round_, client)}
            content = RecordDict({"down": down, "meta": ConfigRecord(meta)})
            messages.append(Message(content=content, dst_node_id=self.node_of[client], message_type="train"))
        client_of = {node: client for client, node in self.node_of.items()}
        shapes = method.update_shapes()
        replies = [
            parse_reply(r, client_of, shapes) for r in self.grid.send_and_receive(messages, timeout=self.timeout)
        ]
        bytes_down = (down.count_bytes() if down is not None else 0) + len(json.dumps(header))
        return bytes_down, sorted(replies, key=lambda r: r.client)


def discover_partitions(grid: Grid, num_clients: int, wait: float = 120.0) -> dict[int, int]:
    """Ask every connected SuperNode for its ``partition-id`` until all ``num_clients`` answered."""
    deadline = time.monotonic() + wait
    node_of: dict[int, int] = {}
    while len(node_of) < num_clients:
        if time.monotonic() > deadline:
            raise ConfigError(f"only partitions {sorted(node_of)} of {num_clients} connected within {wait:.0f}s")
        asked = [n for n in grid.get_node_ids() if n not in node_of.values()]
        messages = [Message(content=RecordDict(), dst_node_id=n, message_type="query") for n in asked]
        for reply in grid.send_and_receive(messages, timeout=30) if messages else []:
            if not reply.has_error():
                node_of[int(reply.content["meta"]["partition-id"])] = reply.metadata.src_node_id
        time.sleep(0.5 if len(node_of) < num_clients else 0)
    return node_of


server_app = ServerApp()
client_app = ClientApp()


@server_app.main()
def server_main(grid: Grid, context: Context) -> None:
    """Run the method's rounds over the SuperNodes; the run directory is ``run-dir`` on the SuperLink's host."""
    config_json = str(context.run_config["bbfl-config"])
    method, engine_cfg = build_method(config_json)
    run_dir = Path(str(context.run_config["run-dir"]))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(config_json)
    node_of = discover_partitions(grid, method.num_clients)
    run_federation(method, engine_cfg, run_dir, runner=FlowerRunner(grid, node_of, engine_cfg.deadline))


@client_app.query()
def client_query(msg: Message, context: Context) -> Message:
    """Tell the server which data partition this SuperNode holds."""
    meta = ConfigRecord({"partition-id": int(context.node_config["partition-id"])})
    return Message(content=RecordDict({"meta": meta}), reply_to=msg)


@client_app.train()
def client_train(msg: Message, context: Context) -> Message:
    """One client update of the configured method on this node's partition."""
    method, engine_cfg = build_method(str(context.run_config["bbfl-config"]))
    client = int(context.node_config["partition-id"])
    if "bbfl-state" in context.state:  # private client state kept across rounds by the SuperNode
        method.load_client_state(client, _from_record(context.state["bbfl-state"]))
    meta = msg.content["meta"]
    began = time.perf_counter()
    arrays, header = method.client_update(
        client, int(meta["round"]), _from_record(msg.content["down"]), json.loads(meta["header"]), int(meta["seed"])
    )
    seconds = time.perf_counter() - began
    private = method.client_state(client)
    if private is not None:
        context.state["bbfl-state"] = _to_record(private, "float32")
    reply = {"up": _to_record(arrays, engine_cfg.transport_dtype)}
    reply["meta"] = ConfigRecord({"header": json.dumps(header), "seconds": seconds})
    return Message(content=RecordDict(reply), reply_to=msg)
