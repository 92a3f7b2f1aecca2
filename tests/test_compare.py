"""`bbfl compare` on real (tiny) runs: seeds grouped, numbers as the runs recorded them, plots and HTML."""

from __future__ import annotations

import json
import shutil
import statistics

import pytest
from typer.testing import CliRunner

from bbfl.cli import app
from bbfl.compare import compare_runs, find_runs, read_run
from bbfl.exceptions import ConfigError

runner = CliRunner()
TINY_BBT = ["--budget", "20", "--popsize", "5", "--prompt-length", "3", "--intrinsic-dim", "10", "--k-shot", "4"]
TINY_BBT += ["--eval-every", "10", "--test-limit", "24"]
TINY_FEDBPT = ["--clients", "2", "--rounds", "2", "--k-shot", "4", "--prompt-length", "3", "--intrinsic-dim", "10"]
TINY_FEDBPT += ["--test-limit", "24"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two BBT seeds of one configuration, one BBT run with another budget, one FedBPT run (demo task)."""
    root = tmp_path_factory.mktemp("runs")
    for args in (
        ["bbt", *TINY_BBT, "--seed", "13"],
        ["bbt", *TINY_BBT, "--seed", "42"],
        ["bbt", *TINY_BBT[2:], "--budget", "10", "--seed", "13"],
        ["fedbpt", *TINY_FEDBPT, "--seed", "13"],
    ):
        result = runner.invoke(app, [*args, "--out", str(root)])
        assert result.exit_code == 0, result.output
    return root


def _summary(path):
    return json.loads((path / "summary.json").read_text())


def test_groups_seeds_and_reports_what_the_runs_recorded(runs, tmp_path):
    rows, title, written = compare_runs([runs], tmp_path / "out")
    report = json.loads(written["json"].read_text())["groups"]
    assert len(report) == 3  # bbt budget 20 (2 seeds), bbt budget 10, fedbpt
    two_seeds = next(g for g in report if g["runs"] == 2)
    assert two_seeds["seeds"] == "13,42" and "budget=20" in two_seeds["group"]
    recorded = []
    for run in map(type(runs), two_seeds["run_dirs"]):
        recorded.append(next(r["test_acc"] for r in _summary(run)["rows"] if r["method"] == "bbt"))
    assert two_seeds["accuracy_mean"] == pytest.approx(statistics.fmean(recorded), abs=1e-12)
    assert two_seeds["accuracy_std"] == pytest.approx(statistics.stdev(recorded), abs=1e-12)
    assert two_seeds["queries"] == 20

    fed = next(g for g in report if g["method"] == "fedbpt")
    fed_summary = _summary(type(runs)(fed["run_dirs"][0]))
    assert fed["accuracy_mean"] == pytest.approx(fed_summary["test_accuracy"])
    assert fed["bytes_up_per_client_round"] == fed_summary["bytes_up_per_client_round"] > 0
    assert fed["queries"] == fed_summary["train_queries"] > 0
    assert fed["zero_shot_mean"] == pytest.approx(fed_summary["zero_shot_test_accuracy"])  # not round 0's start
    assert "task demo" in title
    assert "all-MiniLM-L6-v2" in title  # the embedded model (recorded as None + its name), not "?"

    for name in ("accuracy_vs_queries", "accuracy_vs_bytes"):
        assert written[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = written["html"].read_text()
    assert page.count("data:image/png;base64,") == 2 and 'src="http' not in page  # self-contained
    assert f"{100 * two_seeds['accuracy_mean']:.2f}" in page


def test_unfinished_run_reports_its_last_round(runs, tmp_path):
    fed = next(p for p in find_runs([runs]) if p.name.startswith("fedbpt"))
    copy = tmp_path / fed.name
    shutil.copytree(fed, copy)
    (copy / "summary.json").unlink()
    result = read_run(copy)
    last = [json.loads(line) for line in (copy / "metrics.jsonl").read_text().splitlines()][-1]
    assert not result.finished and result.accuracy == pytest.approx(last["test_accuracy"])


def test_cli_prints_the_table(runs, tmp_path):
    result = runner.invoke(app, ["compare", str(runs), "--out", str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    assert "13,42" in result.output and "fedbpt" in result.output
    assert (tmp_path / "cli" / "compare.html").is_file()


def test_not_a_run_directory_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="neither a run directory"):
        find_runs([tmp_path])
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read"):
        read_run(tmp_path / "broken")
    result = runner.invoke(app, ["compare", str(tmp_path / "missing")])
    said = " ".join(result.output.split())  # rich wraps long paths
    assert result.exit_code == 2 and "does not exist" in said and "Traceback" not in said
