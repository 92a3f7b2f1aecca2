"""The command line, end to end on the bundled demo (tiny budget) and its error messages."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from bbfl.cli import app

runner = CliRunner()


def test_help_lists_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("bbt", "tasks", "eval"):
        assert command in result.output


def test_tasks_lists_registry():
    result = runner.invoke(app, ["tasks"])
    assert result.exit_code == 0 and "agnews" in result.output and "sst2" in result.output
    assert "Review:" in result.output and "[ Category:" in result.output  # causal column; brackets survive rich


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["bbt", "--task", "nope"], "unknown task 'nope'"),
        (["bbt", "--popsize", "1"], "popsize"),
        (["bbt", "--dtype", "int3"], "dtype"),
        (["eval", "/no/such/run"], "not a run directory"),
    ],
)
def test_bad_input_is_one_clear_line(args, message):
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output


def test_bbt_demo_run_then_eval(tmp_path):
    args = [
        "bbt",
        "--budget",
        "40",
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
        "--out",
        str(tmp_path),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    (run_dir,) = tmp_path.iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    bbt_row = next(r for r in summary["rows"] if r["method"] == "bbt")
    assert bbt_row["train_queries"] == 40
    assert "bbt" in result.output and "zero-shot" in result.output
    evaluated = runner.invoke(app, ["eval", str(run_dir)])
    assert evaluated.exit_code == 0, evaluated.output
    assert f"{bbt_row['test_acc']:.4f}" in evaluated.output  # the saved prompt re-scores identically


@pytest.mark.parametrize(("flag", "expected"), [(None, "after_embeddings"), ("inputs_embeds", "inputs_embeds")])
def test_prompt_placement_flag_reaches_the_black_box(tmp_path, tiny_models, flag, expected):
    """An MLM head on BERT defaults to the official placement; --prompt-placement picks ours instead."""
    args = ["bbt", "--model", str(tiny_models["bert"]), "--head", "mlm", "--budget", "10", "--popsize", "5"]
    args += ["--prompt-length", "4", "--intrinsic-dim", "20", "--k-shot", "2", "--test-limit", "8"]
    args += ["--out", str(tmp_path)] + (["--prompt-placement", flag] if flag else [])
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    (run_dir,) = tmp_path.glob("bbt-demo-*")
    assert json.loads((run_dir / "config.json").read_text())["blackbox"]["prompt_placement"] == expected
