"""benchmarks/fwdllm_accuracy.py: scoring a ``--dev-k`` sweep's chosen run on test equals training it again.

The README's slow-model rows (FedKSeed on SmolLM2's AG News) rest on this shortcut, so it is checked
for real here: the embedded MiniLM, real SST-2 sentences, FedKSeed through the engine.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest

from tests.conftest import shared_task_dir

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "fwdllm_accuracy.py"


def _benchmark():
    spec = importlib.util.spec_from_file_location("fwdllm_accuracy", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _args(**overrides) -> argparse.Namespace:
    args = dict(
        task="sst2",
        data_dir=str(shared_task_dir("sst2")),
        k_shot=4,
        test_limit=60,
        clients=2,
        model=None,
        max_length=64,
        peft="lora",
        batch_size=16,
        rounds=2,
        eval_every=2,
        dev_k=4,
        runs_dir=None,
        sweep_lrs=None,
        lr=None,
    )
    return argparse.Namespace(**{**args, **overrides})


def test_chosen_sweep_run_scored_on_test_equals_a_fresh_test_run(tmp_path):
    bench = _benchmark()
    lr = 0.05  # large enough that two rounds change the predictions, so the check sees the trained weights
    reused = bench.run_setting(_args(sweep_lrs=[lr], runs_dir=str(tmp_path)), 13, "fedkseed")
    fresh = bench.run_setting(_args(lr=lr), 13, "fedkseed")
    assert reused["trained_in_sweep"] and not fresh["trained_in_sweep"]
    assert reused["zero_shot_acc"] == fresh["zero_shot_acc"]
    assert fresh["test_acc"] != fresh["zero_shot_acc"], "the check needs training that moves test accuracy"
    assert reused["test_acc"] == fresh["test_acc"]
    assert reused["queries"] == fresh["queries"] > 0
    assert reused["bytes_up_per_client_round"] == fresh["bytes_up_per_client_round"]
    # the run kept under --runs-dir is read back, not retrained: the same dev score, no new rounds
    run_dir = tmp_path / f"sst2-fedkseed-seed13-lr{lr:g}"
    stamp = (run_dir / "server_state.safetensors").stat().st_mtime_ns
    again = bench.run_setting(_args(sweep_lrs=[lr], runs_dir=str(tmp_path)), 13, "fedkseed")
    assert again["dev_acc_by_lr"] == reused["dev_acc_by_lr"]
    assert (run_dir / "server_state.safetensors").stat().st_mtime_ns == stamp
    # a kept run made with other settings is refused, not read back as this one
    with pytest.raises(SystemExit, match="made with other settings.*k_shot"):
        bench.run_setting(_args(sweep_lrs=[lr], runs_dir=str(tmp_path), k_shot=5), 13, "fedkseed")
