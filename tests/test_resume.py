"""Kill a BBT, FedBPT, ZooPFL or FwdLLM run for real (SIGKILL), resume it, and get the uninterrupted result:
the same arrays, the same per-round numbers, the same totals in summary.json; resuming it once more
changes nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bbfl.methods.bbt import checkpoint_history
from bbfl.report import load_arrays

ARGS = [
    "--budget",
    "200",
    "--popsize",
    "10",
    "--prompt-length",
    "4",
    "--intrinsic-dim",
    "50",
    "--k-shot",
    "4",
    "--eval-every",
    "20",
    "--test-limit",
    "24",
    "--seed",
    "7",
]


def _bbfl(*args: str, command: str = "bbt") -> subprocess.Popen:
    # one thread each: the two runs share the machine without oversubscribing its cores
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "bbfl.cli", command, *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _resume_and_compare_prompts(run_dir: Path, straight: subprocess.Popen, straight_root: Path, command: str) -> Path:
    """Resume the killed run, let both finish, check they saved the same z; returns the straight run dir."""
    resumed = _bbfl("--resume", str(run_dir), command=command)
    out_resumed, _ = resumed.communicate(timeout=300)
    out_straight, _ = straight.communicate(timeout=300)
    assert resumed.returncode == 0, out_resumed
    assert straight.returncode == 0, out_straight
    straight_dir = _only_run(straight_root)
    a, _ = load_arrays(straight_dir / "prompt.safetensors")
    b, _ = load_arrays(run_dir / "prompt.safetensors")
    np.testing.assert_array_equal(a["z"], b["z"])
    return straight_dir


def _only_run(root: Path) -> Path:
    (run,) = [p for p in root.iterdir() if p.is_dir()]
    return run


def test_killed_run_resumes_to_the_same_result(tmp_path):
    straight = _bbfl(*ARGS, "--out", str(tmp_path / "straight"))
    killed = _bbfl(*ARGS, "--out", str(tmp_path / "killed"))
    # wait until the second run has checkpointed a few generations, then SIGKILL it mid-run
    deadline = time.time() + 240
    generations = 0
    while time.time() < deadline and generations < 3:
        time.sleep(0.05)
        runs = list((tmp_path / "killed").glob("*/checkpoint.safetensors"))
        if runs:
            generations = len(checkpoint_history(runs[0]))
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    run_dir = _only_run(tmp_path / "killed")
    done_before_kill = len(checkpoint_history(run_dir / "checkpoint.safetensors"))
    assert 3 <= done_before_kill < 20, done_before_kill  # 20 generations = the whole budget
    assert not (run_dir / "summary.json").exists()

    straight_dir = _resume_and_compare_prompts(run_dir, straight, tmp_path / "straight", "bbt")
    rows = [json.loads((d / "summary.json").read_text())["rows"] for d in (straight_dir, run_dir)]
    assert rows[0][2]["test_acc"] == rows[1][2]["test_acc"] and rows[0][2]["dev_acc"] == rows[1][2]["dev_acc"]
    gens = [
        r["generation"]
        for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
        if r.get("phase") == "bbt"
    ]
    assert gens == list(range(1, 21))  # no generation lost or logged twice
    # the whole run's black-box totals, not the resumed process's (issue #13.6)
    totals = [json.loads((d / "summary.json").read_text())["queries"] for d in (straight_dir, run_dir)]
    for key in ("queries", "examples", "tokens"):
        assert totals[0][key] == totals[1][key], (key, totals)
    _resuming_a_finished_run_changes_nothing(run_dir, "bbt")


def _files(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def _resuming_a_finished_run_changes_nothing(run_dir: Path, command: str) -> None:
    from typer.testing import CliRunner

    from bbfl.cli import app

    before = _files(run_dir)
    again = CliRunner().invoke(app, [command, "--resume", str(run_dir)])
    assert again.exit_code == 0 and "already finished" in again.output, again.output
    assert _files(run_dir) == before  # no re-evaluation, no second final line, totals kept (issue #13.9)


def _rounds_done(run_dir: Path) -> list[int]:
    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.is_file() else []
    return [r["round"] for r in map(json.loads, lines) if r.get("phase") == "round"]


def _kill_after_two_rounds(args: list[str], tmp_path: Path, command: str, rounds: int):
    """Start a straight and a to-be-killed run; SIGKILL the second after round 2. Returns (straight, killed dir)."""
    straight = _bbfl(*args, "--out", str(tmp_path / "straight"), command=command)
    killed = _bbfl(*args, "--out", str(tmp_path / "killed"), command=command)
    deadline, done = time.time() + 240, []
    while time.time() < deadline and len(done) < 3:  # round 0 (the start) + two trained rounds
        time.sleep(0.02)
        assert killed.poll() is None, killed.communicate()[0]  # it must still be running to be killed
        runs = list((tmp_path / "killed").glob("*/metrics.jsonl"))
        done = _rounds_done(runs[0].parent) if runs else []
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    run_dir = _only_run(tmp_path / "killed")
    before = _rounds_done(run_dir)
    assert 2 <= before[-1] < rounds, before
    assert not (run_dir / "summary.json").exists()
    return straight, run_dir


def _same_federated_ending(straight_dir: Path, run_dir: Path, rounds: int, metrics: tuple[str, ...]) -> None:
    """Same per-round numbers, same summary (times aside), each round logged once."""
    records = [json.loads((d / "rounds.json").read_text()) for d in (straight_dir, run_dir)]
    for key in (*metrics, "aggregated", "train_queries", "bytes_total"):
        assert [r.get(key) for r in records[0]] == [r.get(key) for r in records[1]], key
    summaries = [json.loads((d / "summary.json").read_text()) for d in (straight_dir, run_dir)]
    assert summaries[0] == summaries[1]  # totals are the whole run's (issue #13.6)
    assert _rounds_done(run_dir) == list(range(rounds + 1))  # no round lost or logged twice


def _same_arrays(a: Path, b: Path) -> None:
    x, _ = load_arrays(a)
    y, _ = load_arrays(b)
    assert x.keys() == y.keys() and x
    for key in x:
        np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_killed_fedbpt_run_resumes_to_the_same_result(tmp_path, tiny_models):
    args = ["--model", str(tiny_models["bert"]), "--rounds", "12", "--clients", "4", "--k-shot", "8"]
    args += ["--local-iter", "4", "--local-popsize", "4", "--intrinsic-dim", "30", "--prompt-length", "3"]
    args += ["--test-limit", "40", "--dropout", "0.2", "--seed", "5"]
    straight, run_dir = _kill_after_two_rounds(args, tmp_path, "fedbpt", 12)

    straight_dir = _resume_and_compare_prompts(run_dir, straight, tmp_path / "straight", "fedbpt")
    rounds = [json.loads((d / "rounds.json").read_text()) for d in (straight_dir, run_dir)]
    assert [r["test_accuracy"] for r in rounds[0]] == [r["test_accuracy"] for r in rounds[1]]
    assert [r["dropped"] for r in rounds[0]] == [r["dropped"] for r in rounds[1]]
    _same_federated_ending(straight_dir, run_dir, 12, ("test_accuracy", "dropped"))
    _resuming_a_finished_run_changes_nothing(run_dir, "fedbpt")


def test_killed_zoopfl_run_resumes_to_the_same_result(tmp_path, tiny_models):
    args = ["--model", str(tiny_models["bert"]), "--rounds", "8", "--clients", "3", "--k-shot", "8"]
    args += ["--zo-queries", "2", "--local-steps", "2", "--pretrain-steps", "4", "--test-limit", "30", "--seed", "4"]
    straight, run_dir = _kill_after_two_rounds(args, tmp_path, "zoopfl", 8)
    resumed = _bbfl("--resume", str(run_dir), command="zoopfl")
    out_resumed, _ = resumed.communicate(timeout=300)
    out_straight, _ = straight.communicate(timeout=300)
    assert resumed.returncode == 0 and straight.returncode == 0, (out_resumed, out_straight)
    straight_dir = _only_run(tmp_path / "straight")
    _same_federated_ending(straight_dir, run_dir, 8, ("test_accuracy", "personal_accuracy"))
    _same_arrays(straight_dir / "server_state.safetensors", run_dir / "server_state.safetensors")
    clients = sorted(p.name for p in (straight_dir / "clients").iterdir())
    assert clients == sorted(p.name for p in (run_dir / "clients").iterdir()) and clients
    for name in clients:  # each client's private surgery embedding and re-mapping
        _same_arrays(straight_dir / "clients" / name, run_dir / "clients" / name)
    _resuming_a_finished_run_changes_nothing(run_dir, "zoopfl")


def test_killed_fwdllm_run_resumes_to_the_same_result(tmp_path, tiny_models):
    args = ["--model", str(tiny_models["bert"]), "--rounds", "8", "--clients", "3", "--k-shot", "6"]
    args += ["--peft", "bitfit", "--batch-size", "4", "--test-limit", "20", "--seed", "6"]
    straight, run_dir = _kill_after_two_rounds(args, tmp_path, "fwdllm", 8)
    resumed = _bbfl("--resume", str(run_dir), command="fwdllm")
    out_resumed, _ = resumed.communicate(timeout=300)
    out_straight, _ = straight.communicate(timeout=300)
    assert resumed.returncode == 0 and straight.returncode == 0, (out_resumed, out_straight)
    straight_dir = _only_run(tmp_path / "straight")
    summaries = [json.loads((d / "summary.json").read_text()) for d in (straight_dir, run_dir)]
    for s in summaries:  # the process's own peak memory differs between a run and its resume
        s.pop("cpu_peak_rss_mb")
    assert summaries[0] == summaries[1]
    records = [json.loads((d / "rounds.json").read_text()) for d in (straight_dir, run_dir)]
    assert [r["test_accuracy"] for r in records[0]] == [r["test_accuracy"] for r in records[1]]
    assert [r["train_queries"] for r in records[0]] == [r["train_queries"] for r in records[1]]
    assert _rounds_done(run_dir) == list(range(9))
    _same_arrays(straight_dir / "peft.safetensors", run_dir / "peft.safetensors")
    _resuming_a_finished_run_changes_nothing(run_dir, "fwdllm")
