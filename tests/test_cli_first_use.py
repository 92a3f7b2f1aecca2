"""What a new user meets first: conventions (--version, -h, python -m bbfl, completion), errors that name
flags and survive square brackets, checks before the model load, piped progress, plots, and run
directories that work from anywhere (issue #16, "First use")."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import typer
from rich.console import Console
from typer.testing import CliRunner

from bbfl.cli import app
from bbfl.exceptions import ConfigError
from tests.conftest import shared_task_dir

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


def test_version_short_help_and_completion():
    import bbfl

    assert runner.invoke(app, ["--version"]).output.strip() == f"bbfl {bbfl.__version__}"
    short = runner.invoke(app, ["-h"])
    assert short.exit_code == 0 and "fedbpt" in short.output and "--install-completion" in short.output
    sub = runner.invoke(app, ["bbt", "-h"])
    assert sub.exit_code == 0 and "--budget" in sub.output


def test_python_dash_m_bbfl_is_the_command():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "bbfl", "--version"], capture_output=True, text=True, env=env)
    assert done.returncode == 0 and done.stdout.startswith("bbfl "), done.stderr


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["bbt", "--budget", "0"], "--budget should be >= 1"),
        (["fedbpt", "--clients", "0"], "--clients must be >= 1"),
        (["fedbpt", "--alpha", "-1"], "--alpha"),
        (["zoopfl", "--alpha", "0"], "--alpha"),
        (["fedbpt", "--rounds", "0"], "--rounds should be >= 1"),
    ],
)
def test_errors_name_the_flag_not_the_field(args, flag):
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert flag in result.output and "`" not in result.output and "Traceback" not in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["bbt", "--device", "cuda:7"], "--device 'cuda:7'"),
        (["bbt", "--head", "foo"], "unknown --head 'foo'"),
        (["bbt", "--dtype", "int8"], "unknown --dtype 'int8'"),
        (["fedbpt", "--head", "foo"], "unknown --head 'foo'"),
        (["fwdllm", "--dtype", "int8"], "unknown --dtype 'int8'"),
        (["bbt", "--prompt-placement", "middle"], "unknown --prompt-placement 'middle'"),
        (["fedbpt", "--prompt-position", "end"], "unknown --prompt-position 'end'"),
    ],
)
def test_blackbox_flags_are_checked_before_the_model_loads(monkeypatch, args, message):
    import bbfl.blackbox.local as local
    import bbfl.data.loaders as loaders

    def never(*_a, **_k):
        raise AssertionError("loaded data or a model before checking the flags")

    monkeypatch.setattr(local.LocalBlackBox, "__init__", never)
    monkeypatch.setattr(loaders, "load_task", never)
    monkeypatch.setattr("bbfl.experiment.load_task", never)
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_square_brackets_in_messages_are_printed_not_parsed(tmp_path, monkeypatch):
    result = runner.invoke(app, ["bbt", "--task", "x", "--data-dir", str(tmp_path / "runs[/old]")])
    assert result.exit_code == 2 and "runs[/old]" in result.output and "Traceback" not in result.output
    from bbfl.cli import _app

    buffer = io.StringIO()
    monkeypatch.setattr(_app, "console", Console(file=buffer, width=200))
    with pytest.raises(typer.Exit):
        _app.fail(ConfigError("the hub needs `pip install 'bbfl[hub]'` (also [serve], [api], [flower])"))
    assert "pip install 'bbfl[hub]'" in buffer.getvalue() and "[serve], [api], [flower]" in buffer.getvalue()


def test_a_default_model_run_that_gains_nothing_points_to_a_prompt_sensitive_model(monkeypatch):
    from bbfl.cli import _app, bbt

    buffer = io.StringIO()
    monkeypatch.setattr(_app, "console", Console(file=buffer, width=400))
    bbt.suggest_prompt_sensitive_model([{"method": "zero-shot", "test_acc": 0.8}, {"method": "bbt", "test_acc": 0.9}])
    assert buffer.getvalue() == ""
    bbt.suggest_prompt_sensitive_model([{"method": "zero-shot", "test_acc": 0.8}, {"method": "bbt", "test_acc": 0.8}])
    assert "bbfl bbt --model smollm2 --prompt-position after_input" in buffer.getvalue()
    assert "bbfl download smollm2" in buffer.getvalue()


def test_progress_lines_break_between_fields_never_inside_one(monkeypatch):
    from bbfl.cli import _app

    buffer = io.StringIO()
    monkeypatch.setattr(_app, "console", Console(file=buffer, width=80))
    fields = ["round 12", "test acc 0.8125", "queries 123,456", "up 2,048 B", "down 123,456 B", "clients 10"]
    fields += ["rejected 3", "peak RSS 1,234 MB"]
    _app.progress_line(*fields)
    lines = buffer.getvalue().splitlines()
    assert len(lines) == 2 and all(len(line) <= 80 for line in lines)
    assert [f.strip() for line in lines for f in line.split("  ") if f.strip()] == fields


def test_plots_have_axis_labels_a_zero_shot_line_and_no_round_zero_bytes(tmp_path):
    from bbfl.experiment import plot_federated
    from bbfl.report import RunDir

    run = RunDir.create(tmp_path, "p", {})
    for r in range(4):
        record = {"round": r, "train_queries": 40 * r, "test_accuracy": 0.5 + r / 10, "bytes_total": 0 if r else 0}
        run.log({"phase": "round", **record, "bytes_total": 0 if r == 0 else 4096})
    fig = run.figure("round", ["test_accuracy"], ylabel="test accuracy", references={"zero-shot": 0.55})
    ax = fig.axes[0]
    assert ax.get_ylabel() == "test accuracy" and ax.get_xlabel() == "round"
    assert any(line.get_label().startswith("zero-shot 0.550") for line in ax.get_lines())
    bytes_fig = run.figure("round", ["bytes_total"], where="round", ylabel="bytes", x_from=1)
    (curve,) = bytes_fig.axes[0].get_lines()
    assert list(curve.get_xdata()) == [1, 2, 3] and min(curve.get_ydata()) == 4096
    assert bytes_fig.axes[0].get_ylabel() == "bytes"
    plot_federated(run, "t", {"zero-shot": 0.55})
    assert {"accuracy_vs_round.png", "accuracy_vs_queries.png", "bytes_per_round.png"} <= {
        p.name for p in run.path.iterdir()
    }


BBT_TINY = ["--budget", "40", "--popsize", "10", "--prompt-length", "4", "--intrinsic-dim", "50"]
BBT_TINY += ["--k-shot", "4", "--eval-every", "20", "--test-limit", "24"]


def test_bbt_run_dir_works_from_elsewhere_and_piped_output_shows_progress(tmp_path, monkeypatch):
    """A relative --data-dir and the embedded model are recorded so that `bbfl eval` works from another
    directory; piped output has a line per dev check and never `nan`."""
    from bbfl.blackbox import default_model_path

    shared_task_dir("sst2")
    monkeypatch.chdir(REPO)
    rel = os.path.relpath(REPO / ".." / "shared" / "data" / "sst2")
    result = runner.invoke(app, ["bbt", "--task", "sst2", "--data-dir", rel, *BBT_TINY, "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    (run_dir,) = tmp_path.iterdir()
    assert result.output.count("best dev") == 2 and "nan" not in result.output  # 2 dev checks in 40 queries
    config = json.loads((run_dir / "config.json").read_text())
    assert config["data"]["data_dir"] == str((REPO / rel).resolve())
    assert config["blackbox"]["model"] is None and "site-packages" not in json.dumps(config)
    assert "all-MiniLM-L6-v2" in config["blackbox"]["model_name"]
    acc = next(r for r in json.loads((run_dir / "summary.json").read_text())["rows"] if r["method"] == "bbt")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    evaluated = runner.invoke(app, ["eval", str(run_dir)])
    assert evaluated.exit_code == 0, evaluated.output
    assert f"{acc['test_acc']:.4f}" in evaluated.output
    on_model = runner.invoke(app, ["eval", str(run_dir), "--model", default_model_path()])
    assert on_model.exit_code == 0 and f"{acc['test_acc']:.4f}" in on_model.output, on_model.output


FEDBPT_TINY = ["--rounds", "6", "--clients", "3", "--k-shot", "8", "--local-iter", "4", "--local-popsize", "4"]
FEDBPT_TINY += ["--intrinsic-dim", "30", "--prompt-length", "3", "--test-limit", "40", "--seed", "3"]


def _files(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_fedbpt_ctrl_c_says_how_to_resume_resume_says_what_it_runs_and_a_finished_run_stays(tmp_path, tiny_models):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = str(REPO)
    # 40 rounds, not 6: on a loaded machine a 6-round tiny run could finish before the signal arrived
    args = [sys.executable, "-m", "bbfl", "fedbpt", "--model", str(tiny_models["bert"]), *FEDBPT_TINY, "--rounds", "40"]
    proc = subprocess.Popen([*args, "--out", str(tmp_path)], env=env, stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while time.time() < deadline and not list(tmp_path.glob("*/server_state.safetensors")):
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    (run_dir,) = tmp_path.iterdir()
    assert proc.returncode == 130, out
    assert f"the run is in {run_dir}" in out and f"bbfl fedbpt --resume {run_dir}" in out

    resumed = runner.invoke(app, ["fedbpt", "--resume", str(run_dir)])
    assert resumed.exit_code == 0, resumed.output
    assert f"resuming {run_dir}" in resumed.output and "3 clients, iid" in resumed.output
    assert "10 clients" not in resumed.output
    summary = json.loads((run_dir / "summary.json").read_text())
    # the true zero-shot (no prompt) and round 0 (the start prompt p0) are both reported, by their names
    assert "zero-shot accuracy (no prompt)" in resumed.output and "round 0, z = 0" in resumed.output
    rounds = json.loads((run_dir / "rounds.json").read_text())
    assert summary["start_test_accuracy"] == rounds[0]["test_accuracy"] and 0 <= summary["zero_shot_test_accuracy"] <= 1

    evaluated = runner.invoke(app, ["eval", str(run_dir)])  # a fedbpt run's data record has alpha, num_clients...
    assert evaluated.exit_code == 0, evaluated.output
    assert f"{summary['test_accuracy']:.4f}" in evaluated.output

    before = _files(run_dir)
    again = runner.invoke(app, ["fedbpt", "--resume", str(run_dir)])
    assert again.exit_code == 0 and "already finished" in again.output, again.output
    assert _files(run_dir) == before


def test_flag_names_rewrite_only_real_flags():
    from bbfl.cli._app import flag_names

    message = "`num_clients` must be >= 1; `transport_dtype` bad; `flwr` not found; `pip install 'bbfl[hub]'`"
    assert flag_names(message) == "--clients must be >= 1; --transport bad; `flwr` not found; `pip install 'bbfl[hub]'`"
