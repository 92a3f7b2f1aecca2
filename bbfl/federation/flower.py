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

import json
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from bbfl.exceptions import ConfigError
from bbfl.federation.engine import ClientReply, EngineConfig, round_seed, run_federation
from bbfl.federation.wire import WIRE_DTYPES
from bbfl.methods.base import Arrays, FederatedMethod

APP_DIR = Path(__file__).with_name("flower_app")  # the Flower App (pyproject.toml) `flwr run` ships
_BUILT: dict[str, tuple[FederatedMethod, EngineConfig]] = {}  # per process: build a method once


def build_method(config_json: str) -> tuple[FederatedMethod, EngineConfig]:
    """The method and engine settings a bbfl run config describes (cached per process)."""
    if config_json not in _BUILT:
        from bbfl.pipeline import build_federated_method

        _BUILT[config_json] = build_federated_method(json.loads(config_json))
    return _BUILT[config_json]


def _to_record(arrays: Arrays, dtype: str) -> ArrayRecord:
    cast = {k: Array(np.ascontiguousarray(v, dtype=WIRE_DTYPES[dtype])) for k, v in arrays.items()}
    return ArrayRecord(array_dict=cast)


def _from_record(record: ArrayRecord) -> Arrays:
    return {k: v.numpy().astype(np.float32) for k, v in record.items()}


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
        replies = []
        client_of = {node: client for client, node in self.node_of.items()}
        for reply in self.grid.send_and_receive(messages, timeout=self.timeout):
            client = client_of[reply.metadata.src_node_id]
            if reply.has_error():
                replies.append(ClientReply(client, None, {}, 0.0, 0, f"client error: {reply.error.reason}"))
                continue
            up = reply.content["up"]
            meta = reply.content["meta"]
            size = up.count_bytes() + len(meta["header"])
            replies.append(ClientReply(client, _from_record(up), json.loads(meta["header"]), meta["seconds"], size))
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
