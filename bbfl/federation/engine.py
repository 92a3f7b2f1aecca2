"""The in-process federation engine: rounds, client sampling, drop-outs, stragglers, bytes, checkpoints.

A :class:`FederatedMethod` supplies the server state, the downlink message, the client update,
the aggregation and the evaluation; the engine owns everything else. Every message really is
serialised with :mod:`bbfl.federation.wire` and parsed back, so the byte counts are those of the
actual messages and no Python object crosses between "client" and "server".

Randomness: client sampling and drop-outs come from ``(seed, round)``; each client's own stream
from ``(seed, round, client)`` - every client its own RNG (the official FedBPT code gives all
clients the same seed). Nothing is carried in an RNG object, so a checkpoint needs none.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bbfl.exceptions import CheckpointError, ConfigError
from bbfl.federation.contract import Arrays, FederatedMethod
from bbfl.federation.headers import validate_header
from bbfl.federation.privacy import new_server_secret
from bbfl.federation.wire import InvalidUpdate, decode_message, encode_message, validate_update
from bbfl.io import atomic_write_json, load_arrays, save_arrays

log = logging.getLogger("bbfl.federation")


@dataclass
class EngineConfig:
    """Args:
    rounds: communication rounds.
    clients_per_round: clients sampled per round (``None`` = all).
    dropout: probability that a sampled client drops out of a round (simulated failure).
    deadline: seconds a round waits for a client; slower updates are dropped and logged.
    transport_dtype: ``float32`` or ``float16`` for arrays on the wire.
    max_update_norm: updates whose arrays exceed this L2 norm are rejected (``None`` = no limit).
    eval_every: evaluate the global model on the test split every this many rounds; round 0 and the
        last round always are. Scoring a real LM's test set can cost more than a round's training
        on a CPU, and it never changes what is trained, so a larger value only thins the curve.
    seed: seeds sampling, drop-outs and every client's stream.
    """

    rounds: int = field(default=50, metadata={"help": "communication rounds"})
    clients_per_round: int | None = field(default=None, metadata={"help": "clients per round (None = all)"})
    dropout: float = field(default=0.0, metadata={"help": "probability a sampled client drops out"})
    deadline: float | None = field(default=None, metadata={"help": "seconds before an update is late"})
    transport_dtype: str = field(default="float32", metadata={"help": "float32 or float16 on the wire"})
    max_update_norm: float | None = field(default=1e4, metadata={"help": "reject updates above this norm"})
    eval_every: int = field(default=1, metadata={"help": "test every this many rounds (and the last)"})
    seed: int = field(default=0, metadata={"help": "random seed"})

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ConfigError(f"`rounds` should be >= 1, got {self.rounds}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"`dropout` should be in [0, 1), got {self.dropout}.")
        if self.clients_per_round is not None and self.clients_per_round < 1:
            raise ConfigError(f"`clients_per_round` should be >= 1, got {self.clients_per_round}.")
        if self.eval_every < 1:
            raise ConfigError(f"`eval_every` should be >= 1, got {self.eval_every}.")
        if self.transport_dtype not in ("float32", "float16"):
            raise ConfigError(f"`transport_dtype` should be float32 or float16, got {self.transport_dtype!r}.")


def round_seed(seed: int, *keys: int) -> int:
    """A 32-bit seed derived from ``seed`` and keys (round, client, ...) - the same on any machine."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1)[0])


def sample_clients(num_clients: int, per_round: int | None, dropout: float, seed: int, round_: int):
    """(sampled, dropped) client ids for a round: pure function of its arguments."""
    rng = np.random.default_rng(round_seed(seed, round_, 0xC11E))
    k = num_clients if per_round is None else min(per_round, num_clients)
    sampled = np.sort(rng.choice(num_clients, size=k, replace=False))
    dropped = sampled[rng.random(k) < dropout]
    return sampled.tolist(), dropped.tolist()


@dataclass
class ClientReply:
    """What came back from one client this round: its decoded update (or the error), timing and size."""

    client: int
    arrays: Arrays | None
    header: dict
    seconds: float
    bytes_up: int
    error: str | None = None


# (method, config, round, clients, downlink arrays, downlink header) -> (bytes down per client, replies)
ClientRunner = Callable[[FederatedMethod, EngineConfig, int, list[int], Arrays, dict], tuple[int, list[ClientReply]]]


def run_clients_in_process(
    method: FederatedMethod, config: EngineConfig, round_: int, clients: list[int], arrays: Arrays, header: dict
) -> tuple[int, list[ClientReply]]:
    """The simulation: every message really is serialised and parsed back, so sizes are the real ones."""
    down_blob = encode_message(arrays, header, config.transport_dtype)
    replies = []
    for client in clients:
        received, received_header = decode_message(down_blob)  # what the client really receives
        began = time.perf_counter()
        up_arrays, up_header = method.client_update(
            client, round_, received, received_header, round_seed(config.seed, round_, client)
        )
        elapsed = time.perf_counter() - began
        blob = encode_message(up_arrays, up_header, config.transport_dtype)
        try:
            up, up_head = decode_message(blob)
            replies.append(ClientReply(client, up, up_head, elapsed, len(blob)))
        except InvalidUpdate as exc:
            replies.append(ClientReply(client, None, {}, elapsed, len(blob), exc.reason))
    return len(down_blob), replies


def run_federation(
    method: FederatedMethod,
    config: EngineConfig,
    run_dir: str | Path,
    on_round: Callable[[dict], None] | None = None,
    stop_after: int | None = None,
    runner: ClientRunner = run_clients_in_process,
) -> list[dict]:
    """Run (or resume) the rounds; checkpoint atomically after each. Returns the per-round records.

    ``stop_after`` ends the call after that many rounds of this call (for tests and time slicing).
    ``runner`` delivers the downlink to the round's clients and brings their replies back: in this
    process by default; :mod:`bbfl.flower.app` sends them to Flower SuperNodes instead.
    """
    run_dir = Path(run_dir)
    ckpt = run_dir / "server_state.safetensors"
    start, records = 1, []
    # server-only randomness (the DP noise): never in config.json or a message, kept in the checkpoint
    method.server_secret = new_server_secret()
    if ckpt.is_file():
        arrays, meta = load_arrays(ckpt)
        info, method_header = _checkpoint_headers(ckpt, meta)
        _refuse_non_finite(arrays, method_header, f"{ckpt} holds")  # garbled bytes must not become a state
        if info["num_clients"] != method.num_clients:
            raise CheckpointError(f"{ckpt} was written for {info['num_clients']} clients, not {method.num_clients}")
        if "server_secret" in info:
            method.server_secret = int(info["server_secret"], 16)
        else:
            log.warning("%s predates the server secret: DP noise of its replayed rounds will differ", ckpt)
        try:
            method.load_state(arrays, method_header)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:  # a garbled method header
            raise CheckpointError(f"{ckpt} does not hold this method's state ({type(exc).__name__}: {exc})") from exc
        _load_client_states(method, run_dir, info["round"])
        start, records = info["round"] + 1, info["records"]
        log.info("resuming at round %d from %s", start, ckpt)
    if start == 1:  # round 0: the starting point (z = 0, i.e. the zero-shot prompt), for curves and baselines
        records.append(_initial_record(method))
        if on_round is not None:
            on_round(records[0])
    done_here = 0
    for round_ in range(start, config.rounds + 1):
        record = _run_round(method, config, round_, runner)
        records.append(record)
        # client states first, then the server checkpoint that declares the round done (see below)
        ran = sorted(set(record["sampled"]) - set(record["dropped"]))
        _save_client_states(method, run_dir, round_, ran)
        arrays, header = method.state()
        _refuse_non_finite(arrays, header, f"round {round_} left")
        engine_meta = {"round": round_, "records": records, "num_clients": method.num_clients}
        engine_meta["server_secret"] = format(method.server_secret, "x")
        save_arrays(ckpt, arrays, {"engine": json.dumps(engine_meta), "method": json.dumps(header)})
        _prune_client_states(run_dir, ran, keep=round_)
        if on_round is not None:
            on_round(record)
        done_here += 1
        if stop_after is not None and done_here >= stop_after:
            break
    atomic_write_json(run_dir / "rounds.json", records)
    return records


def _checkpoint_headers(ckpt: Path, meta: dict[str, str]) -> tuple[dict, dict]:
    """The engine's and the method's JSON headers of a checkpoint; garbage is a CheckpointError naming it."""
    try:
        info, method_header = json.loads(meta["engine"]), json.loads(meta["method"])
        for key, kind in (("round", int), ("records", list), ("num_clients", int)):
            if not isinstance(info[key], kind):
                raise TypeError(f"engine field {key!r} should be {kind.__name__}")
        int(info.get("server_secret", "0"), 16)
    except (KeyError, TypeError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{ckpt} has a garbled header ({type(exc).__name__}: {str(exc)[:120]})") from exc
    return info, method_header


def _refuse_non_finite(arrays: Arrays, header: dict, what: str) -> None:
    """Never checkpoint or load NaN/Inf: a poisoned state would be replayed by every resume."""
    for name, value in arrays.items():
        value = np.asarray(value)
        if value.dtype.kind in "fc" and not np.all(np.isfinite(value)):
            raise CheckpointError(f"{what} NaN or Inf in the server state (array {name!r})")
    try:
        json.dumps(header, allow_nan=False)
    except ValueError as exc:
        raise CheckpointError(f"{what} NaN or Inf in the server state's header") from exc


# Private client states live in clients/<client>.r<round>.safetensors. A round's files are written
# before the server checkpoint that marks the round done; a resume from round R loads each client's
# newest file from a round <= R and deletes files of the unfinished round, so a crash anywhere leaves
# a consistent pair (server state, client states).
def _client_files(run_dir: Path, client: int) -> dict[int, Path]:
    return {int(p.suffixes[0][2:]): p for p in (run_dir / "clients").glob(f"{client}.r*.safetensors")}


def _save_client_states(method: FederatedMethod, run_dir: Path, round_: int, clients: list[int]) -> None:
    for client in clients:
        arrays = method.client_state(client)
        if arrays is not None:
            save_arrays(run_dir / "clients" / f"{client}.r{round_}.safetensors", arrays)


def _prune_client_states(run_dir: Path, clients: list[int], keep: int) -> None:
    for client in clients:
        for r, path in _client_files(run_dir, client).items():
            if r < keep:
                path.unlink()


def _load_client_states(method: FederatedMethod, run_dir: Path, done_round: int) -> None:
    for client in range(method.num_clients):
        files = _client_files(run_dir, client)
        for r in [r for r in files if r > done_round]:  # written by a round that never finished
            files.pop(r).unlink()
        if files:
            arrays, _ = load_arrays(files[max(files)])
            method.load_client_state(client, arrays)


def _initial_record(method: FederatedMethod) -> dict:
    start = time.perf_counter()
    metrics = method.evaluate(0)
    empty = {"sampled": [], "dropped": [], "late": [], "rejected": [], "aggregated": []}
    zero_bytes = {"bytes_down_per_client": 0, "bytes_up_per_client": 0.0, "bytes_total": 0}
    return {"round": 0, **empty, **zero_bytes, "seconds": time.perf_counter() - start, **metrics}


def _run_round(
    method: FederatedMethod, config: EngineConfig, round_: int, runner: ClientRunner = run_clients_in_process
) -> dict:
    start = time.perf_counter()
    sampled, dropped = sample_clients(method.num_clients, config.clients_per_round, config.dropout, config.seed, round_)
    down_arrays, down_header = method.downlink(round_)
    running = [c for c in sampled if c not in dropped]
    bytes_down, replies = runner(method, config, round_, running, down_arrays, down_header)
    updates, rejected, late = [], [], []
    header_spec = getattr(method, "header_spec", None)  # every federated method declares one
    for reply in replies:
        if config.deadline is not None and reply.seconds > config.deadline:
            late.append(reply.client)
            log.warning("round %d: client %d late (%.2fs), update dropped", round_, reply.client, reply.seconds)
            continue
        try:
            if reply.error is not None:
                raise InvalidUpdate(reply.error)
            if reply.client not in running:
                raise InvalidUpdate(f"client {reply.client} was not asked for an update this round")
            if reply.client in {c for c, _, _ in updates}:
                raise InvalidUpdate(f"second reply from client {reply.client} this round")
            validate_update(reply.arrays, method.update_shapes(), config.max_update_norm)
            if header_spec is not None:
                validate_header(reply.header, header_spec(reply.client))
            method.check_update(reply.client, reply.arrays, reply.header)
        except InvalidUpdate as exc:
            rejected.append({"client": reply.client, "reason": exc.reason})
            log.warning("round %d: client %d update rejected: %s", round_, reply.client, exc.reason)
            continue
        updates.append((reply.client, reply.arrays, reply.header))
    metrics = method.aggregate(round_, updates) if updates else {"skipped": "no valid update"}
    if round_ % config.eval_every == 0 or round_ == config.rounds:
        metrics.update(method.evaluate(round_))
    bytes_up = [r.bytes_up for r in replies]
    return {
        "round": round_,
        "sampled": sampled,
        "dropped": dropped,
        "late": late,
        "rejected": rejected,
        "aggregated": [c for c, _, _ in updates],
        "bytes_down_per_client": bytes_down,
        "bytes_up_per_client": float(np.mean(bytes_up)) if bytes_up else 0.0,
        "bytes_total": bytes_down * len(running) + int(sum(bytes_up)),
        "seconds": time.perf_counter() - start,
        **metrics,
    }
