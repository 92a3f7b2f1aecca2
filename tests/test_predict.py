"""`bbfl predict`: a run's result on new texts equals the run's own evaluation of the same texts.

Runs are made here with tiny budgets on real SST-2 rows (a 24-row test file, so every command scores
the whole file whatever its --test-limit sampling does).
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from bbfl.cli import app
from tests.conftest import shared_task_dir

runner = CliRunner()
TEST_ROWS = 24


def small_sst2(root: Path) -> Path:
    """200 train rows and the first TEST_ROWS test rows of the real SST-2 files."""
    src = shared_task_dir("sst2")
    folder = root / "sst2"
    folder.mkdir()
    for name, rows in (("train.jsonl", 200), ("test.jsonl", TEST_ROWS)):
        lines = (src / name).read_text().splitlines()[:rows]
        (folder / name).write_text("\n".join(lines) + "\n")
    shutil.copy(src / "labels.json", folder / "labels.json")
    return folder


def only_run(parent: Path) -> Path:
    (run_dir,) = [p for p in parent.iterdir() if p.is_dir()]
    return run_dir


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return small_sst2(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def bbt_run(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bbt")
    args = ["bbt", "--task", "sst2", "--data-dir", str(data), "--budget", "40", "--popsize", "10"]
    args += ["--prompt-length", "4", "--intrinsic-dim", "50", "--k-shot", "4", "--eval-every", "20", "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return only_run(out)


def forward_run(data: Path, out: Path, model: Path, peft: str = "lora", extra: tuple[str, ...] = ()) -> Path:
    args = ["fwdllm", "--task", "sst2", "--data-dir", str(data), "--model", str(model), "--rounds", "2"]
    args += ["--clients", "2", "--k-shot", "6", "--peft", peft, "--out", str(out), *extra]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return only_run(out)


@pytest.fixture(scope="module")
def lora_run(data, tiny_models, tmp_path_factory) -> Path:
    return forward_run(data, tmp_path_factory.mktemp("fwdllm"), tiny_models["bert"])


def labels_of(path: Path) -> np.ndarray:
    return np.array([json.loads(line)["label"] for line in path.read_text().splitlines()])


def test_soft_prompt_predictions_equal_the_runs_test_accuracy(bbt_run, data, tmp_path):
    out = tmp_path / "pred.jsonl"
    result = runner.invoke(
        app, ["predict", str(bbt_run), "-i", str(data / "test.jsonl"), "-o", str(out), "--batch-size", "5"]
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == TEST_ROWS and set(rows[0]["probabilities"]) == {"negative", "positive"}
    predicted = np.array([["negative", "positive"].index(r["prediction"]) for r in rows])
    summary = json.loads((bbt_run / "summary.json").read_text())
    bbt_acc = next(r["test_acc"] for r in summary["rows"] if r["method"] == "bbt")
    assert (predicted == labels_of(data / "test.jsonl")).mean() == pytest.approx(bbt_acc, abs=1e-6)
    assert f"{bbt_acc:.4f}" in result.output  # the accuracy line against the file's labels
    for r in rows:  # the prediction is the most probable class, and probabilities sum to one
        probs = r["probabilities"]
        assert r["prediction"] == max(probs, key=probs.get) and sum(probs.values()) == pytest.approx(1, abs=1e-5)


def test_prediction_probabilities_equal_the_black_box_scores(bbt_run, data):
    """Batched prediction (5 at a time) gives the scores of one whole-set call with the saved prompt."""
    import torch

    from bbfl.data import load_task
    from bbfl.io import load_arrays
    from bbfl.predict import Predictor

    predictor = Predictor(bbt_run)
    task = load_task("sst2", data_dir=data)
    _, probs = predictor.predict(task.test.texts, batch_size=5)
    prompt = torch.from_numpy(load_arrays(bbt_run / "prompt.safetensors")[0]["prompt"])
    whole = predictor.blackbox.logits(prompt[None], predictor.blackbox.encode(task, task.test))[0]
    np.testing.assert_allclose(probs, torch.softmax(whole, -1).numpy(), atol=1e-5)
    no_prompt = predictor.blackbox.logits(None, predictor.blackbox.encode(task, task.test))[0]
    assert not np.allclose(probs, torch.softmax(no_prompt, -1).numpy(), atol=1e-3)  # the prompt is used


def test_stdin_to_csv(bbt_run):
    result = runner.invoke(
        app, ["predict", str(bbt_run), "--format", "csv"], input="a gripping film\n\ndull and slow\n"
    )
    assert result.exit_code == 0, result.output
    table = list(csv.DictReader(result.stdout.splitlines()))  # the bar and the summary line go to stderr
    assert [r["text"] for r in table] == ["a gripping film", "dull and slow"]
    assert all(abs(float(r["p_negative"]) + float(r["p_positive"]) - 1) < 1e-5 for r in table)


def test_lora_predictions_equal_the_runs_final_round(lora_run, data, tmp_path):
    from bbfl.io import load_arrays

    arrays, _ = load_arrays(lora_run / "peft.safetensors")
    assert any(k.endswith("lora_B") and np.abs(v).max() > 0 for k, v in arrays.items())  # tuned, not the start
    out = tmp_path / "pred.csv"
    result = runner.invoke(app, ["predict", str(lora_run), "-i", str(data / "test.jsonl"), "-o", str(out)])
    assert result.exit_code == 0, result.output
    table = list(csv.DictReader(out.open()))
    predicted = np.array([["negative", "positive"].index(r["prediction"]) for r in table])
    summary = json.loads((lora_run / "summary.json").read_text())
    assert (predicted == labels_of(data / "test.jsonl")).mean() == pytest.approx(summary["test_accuracy"], abs=1e-6)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["predict", "no-such-run"], "not a run directory"),
        (["predict", "{run}", "--format", "xml"], "unknown output format 'xml'"),
        (["predict", "{run}", "-i", "{data}/test.jsonl", "--text-col", "sentence"], "no 'sentence' column"),
        (["predict", "{run}", "--batch-size", "0"], "--batch-size must be >= 1"),
    ],
)
def test_bad_input_is_one_clear_line(bbt_run, data, args, message):
    args = [a.format(run=bbt_run, data=data) for a in args]
    result = runner.invoke(app, args, input="a film\n")
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_zoopfl_client_predictions_equal_the_runs_personal_accuracy(data, tiny_models, tmp_path):
    """--client c: the client's surgery + re-mapping on its held-out rows; no --client: the global model."""
    from bbfl.experiment import PersonalDataConfig, prepare_personal_data
    from bbfl.predict import Predictor

    args = ["zoopfl", "--task", "sst2", "--data-dir", str(data), "--model", str(tiny_models["bert"]), "--rounds", "2"]
    args += ["--clients", "2", "--k-shot", "8", "--local-steps", "1", "--pretrain-steps", "2", "--out", str(tmp_path)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    run_dir = only_run(tmp_path)
    config, summary = (json.loads((run_dir / f).read_text()) for f in ("config.json", "summary.json"))
    _, _, tests, test = prepare_personal_data(PersonalDataConfig(**config["data"]), config["zoopfl"]["seed"])
    correct = 0
    for client, split in enumerate(tests):
        predicted, _ = Predictor(run_dir, client=client).predict(split.texts, batch_size=3)
        correct += int((predicted == split.labels).sum())
    assert correct / sum(len(s) for s in tests) == pytest.approx(
        summary["personal_accuracy"], abs=1e-6
    )  # stored as float32
    predicted, _ = Predictor(run_dir).predict(test.texts, batch_size=5)
    assert (predicted == test.labels).mean() == pytest.approx(summary["test_accuracy"], abs=1e-6)
    bad = runner.invoke(app, ["predict", str(run_dir), "--client", "7"], input="a film\n")
    assert bad.exit_code == 2 and "--client 7 is not a client of this run (0..1)" in bad.output
