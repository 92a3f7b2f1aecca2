"""Kill a BBT or FedBPT run for real (SIGKILL), resume it, and get the uninterrupted result."""

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


def _rounds_done(run_dir: Path) -> list[int]:
    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.is_file() else []
    return [r["round"] for r in map(json.loads, lines) if r.get("phase") == "round"]


def test_killed_fedbpt_run_resumes_to_the_same_result(tmp_path, tiny_models):
    args = ["--model", str(tiny_models["bert"]), "--rounds", "12", "--clients", "4", "--k-shot", "8"]
    args += ["--local-iter", "4", "--local-popsize", "4", "--intrinsic-dim", "30", "--prompt-length", "3"]
    args += ["--test-limit", "40", "--dropout", "0.2", "--seed", "5"]
    straight = _bbfl(*args, "--out", str(tmp_path / "straight"), command="fedbpt")
    killed = _bbfl(*args, "--out", str(tmp_path / "killed"), command="fedbpt")
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
    assert 2 <= before[-1] < 12, before
    assert not (run_dir / "summary.json").exists()

    straight_dir = _resume_and_compare_prompts(run_dir, straight, tmp_path / "straight", "fedbpt")
    rounds = [json.loads((d / "rounds.json").read_text()) for d in (straight_dir, run_dir)]
    assert [r["test_accuracy"] for r in rounds[0]] == [r["test_accuracy"] for r in rounds[1]]
    assert [r["dropped"] for r in rounds[0]] == [r["dropped"] for r in rounds[1]]
    assert _rounds_done(run_dir) == list(range(13))  # no round lost or logged twice
