"""Real users' data without silent mistakes (issue #16): each test fails on the code before the fix.

TREC, CR and MPQA come from ../shared/data; CSV copies (as a user would export them) go to tmp_path.
"""

from __future__ import annotations

import csv
import json
import logging
import re

import numpy as np
import pytest

from bbfl.data import few_shot, load_task
from bbfl.exceptions import DataError
from tests.conftest import shared_task_dir

TREC_WORDS = {
    "ABBR": "abbreviation",
    "DESC": "description",
    "ENTY": "entity",
    "HUM": "person",
    "LOC": "location",
    "NUM": "number",
}


def _trec_as_csv(folder, limit: int | None = None) -> None:
    """TREC with class names as labels and no labels.json: what a user's CSV export looks like."""
    src = shared_task_dir("trec")
    names = json.loads((src / "labels.json").read_text())
    for part in ("train", "test"):
        rows = [json.loads(line) for line in (src / f"{part}.jsonl").read_text().splitlines()][:limit]
        with open(folder / f"{part}.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            writer.writerows([r["text"], names[r["label"]]] for r in rows)


# --------------------------------------------------------------------- labels paired by name, not position
def test_word_lists_with_inferred_labels_are_refused_naming_the_fix(tmp_path):
    _trec_as_csv(tmp_path)
    spec = tmp_path / "trec.toml"
    # in labels.json's order (DESC, ENTY, ABBR, ...): the inferred order is alphabetical (ABBR, DESC, ...)
    words = [TREC_WORDS[k] for k in ("DESC", "ENTY", "ABBR", "HUM", "LOC", "NUM")]
    spec.write_text(f'label_words = {json.dumps(words)}\ntemplate = "{{mask}} question: {{text}}"\n')
    with pytest.raises(DataError, match=r"no `labels` were given.*alphabetical.*Add `labels = \[...\]`"):
        load_task("trec-csv", data_dir=tmp_path, spec_file=spec)


def test_cli_names_the_fix_in_one_line_with_the_table_syntax_intact(tmp_path):
    from typer.testing import CliRunner

    from bbfl.cli import app

    _trec_as_csv(tmp_path)
    spec = tmp_path / "trec.toml"
    spec.write_text('label_descriptions = ["a", "b", "c", "d", "e", "f"]\n')
    args = ["bbt", "--task", "trec-csv", "--data-dir", str(tmp_path), "--spec", str(spec), "--budget", "20"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "400"})
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert '(`[label_descriptions]` then `ABBR = "..."`)' in result.output


def test_word_and_description_tables_pair_with_classes_by_name(tmp_path):
    _trec_as_csv(tmp_path)
    spec = tmp_path / "trec.toml"
    lines = ["[label_words]"] + [f'{k} = "{v}"' for k, v in reversed(TREC_WORDS.items())]
    lines += ["[label_descriptions]"] + [f'{k} = "A question about a {v}."' for k, v in TREC_WORDS.items()]
    spec.write_text("\n".join(lines) + "\n")
    task = load_task("trec-csv", data_dir=tmp_path, spec_file=spec)
    assert task.labels == sorted(TREC_WORDS)  # inferred, alphabetical
    for label, word, desc in zip(task.labels, task.label_words, task.label_descriptions):
        assert word == TREC_WORDS[label] and desc == f"A question about a {TREC_WORDS[label]}."
    # a test row labelled ABBR maps to the class whose word is "abbreviation"
    k = task.test.labels[0]
    assert task.label_words[k] == TREC_WORDS[_trec_test_names()[0]]


def _trec_test_names() -> list[str]:
    src = shared_task_dir("trec")
    names = json.loads((src / "labels.json").read_text())
    return [names[json.loads(line)["label"]] for line in (src / "test.jsonl").read_text().splitlines()]


def test_a_table_naming_unknown_or_missing_classes_is_refused(tmp_path):
    _trec_as_csv(tmp_path)
    with pytest.raises(DataError, match=r"missing \['NUM'\], unknown \['NUMBER'\]"):
        words = {**{k: v for k, v in TREC_WORDS.items() if k != "NUM"}, "NUMBER": "number"}
        load_task("trec-csv", data_dir=tmp_path, label_words=words)


# --------------------------------------------------------------------- --test-limit: seeded, stratified, recorded
@pytest.mark.parametrize("name", ["cr", "mpqa"])
def test_test_limit_draws_every_class_of_a_label_sorted_file(name):
    from bbfl.experiment import (
        DataConfig,
        FederatedDataConfig,
        PersonalDataConfig,
        prepare_data,
        prepare_federated_data,
        prepare_personal_data,
    )

    folder = str(shared_task_dir(name))
    full = load_task(name, data_dir=folder).test
    _, _, _, test = prepare_data(DataConfig(task=name, data_dir=folder, k_shot=4, test_limit=300), seed=1)
    assert len(test) == 300 and test.rows is not None
    share = np.bincount(test.labels) / len(test)
    assert np.allclose(share, np.bincount(full.labels) / len(full), atol=0.01)  # the file's class mix
    assert [full.texts[i] for i in test.rows] == test.texts and not np.array_equal(test.rows, np.arange(300))
    # the same rows in every command (federated, personal; eval uses the same function)
    fed = dict(task=name, data_dir=folder, k_shot=4, num_clients=2, test_limit=300)
    assert np.array_equal(prepare_federated_data(FederatedDataConfig(**fed), seed=7)[2].rows, test.rows)
    assert np.array_equal(prepare_personal_data(PersonalDataConfig(**fed), seed=3)[3].rows, test.rows)


def test_stratified_rows_quotas_and_bad_limits():
    from bbfl.data import stratified_rows

    labels = np.array([0] * 900 + [1] * 90 + [2] * 10)
    rows = stratified_rows(labels, 100)
    assert np.bincount(labels[rows]).tolist() == [90, 9, 1] and len(set(rows.tolist())) == 100
    assert np.array_equal(rows, stratified_rows(labels, 100))  # seeded
    assert np.bincount(labels[stratified_rows(labels, 3)]).tolist() == [1, 1, 1]  # each class when n allows
    assert np.array_equal(stratified_rows(labels, 5000), np.arange(1000))
    with pytest.raises(DataError, match="--test-limit should be >= 1, got 0"):
        stratified_rows(labels, 0)


def test_a_scored_set_of_one_class_is_warned_about(tmp_path, caplog):
    from bbfl.experiment import DataConfig, prepare_data

    rows = [{"text": f"good {i}", "label": 1} for i in range(40)]
    rows += [{"text": f"bad {i}", "label": 0} for i in range(40)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:10]))
    (tmp_path / "labels.json").write_text('["negative", "positive"]')
    with caplog.at_level(logging.WARNING, logger="bbfl.data"):
        prepare_data(DataConfig(task="one", data_dir=str(tmp_path), k_shot=4, test_limit=5), seed=0)
    assert "the 5 test examples scored all have class 'positive'" in caplog.text


def test_few_shot_train_and_dev_are_random_rows_not_the_first(tmp_path):
    cr = load_task("cr", data_dir=shared_task_dir("cr"))  # train sorted by label: 0s first
    train, dev = few_shot(cr.train, 16, seed=13)
    index = {t: i for i, t in enumerate(cr.train.texts)}
    for split in (train, dev):
        picked = np.array([index[t] for t in split.texts])
        for c in (0, 1):
            members = np.flatnonzero(cr.train.labels == c)
            chosen = picked[split.labels == c]
            assert len(chosen) == 16 and chosen.max() > members[len(members) // 2]  # reaches the class's 2nd half


# --------------------------------------------------------------------- whitespace-only rows
def test_cr_whitespace_rows_are_skipped_with_a_warning_and_strict_refuses(caplog):
    folder = shared_task_dir("cr")
    with caplog.at_level(logging.WARNING, logger="bbfl.data"):
        task = load_task("cr", data_dir=folder)
    assert "train.jsonl: skipped 3 row(s) with an empty 'text' (rows 368, 1691, 1775)" in caplog.text
    assert "test.jsonl: skipped 1 row(s) with an empty 'text' (rows 769)" in caplog.text
    assert len(task.train) == 1775 - 3 and len(task.test) == 2000 - 1
    with pytest.raises(DataError, match=r"train.jsonl: row 368 has an empty 'text'"):
        load_task("cr", data_dir=folder, strict=True)


# --------------------------------------------------------------------- encodings
@pytest.mark.parametrize(
    ("name", "body"),
    [
        ("train.csv", "text,label\ncaf\xe9 ok,0\nfine,1\n"),
        ("train.jsonl", '{"text": "ok", "label": 0}\n{"text": "caf\xe9", "label": 1}\n'),
        ("train.json", '[{"text": "caf\xe9", "label": 0}]'),
    ],
)
def test_non_utf8_files_name_the_file_encoding_and_offset(tmp_path, name, body):
    (tmp_path / name).write_bytes(body.encode("latin-1"))
    (tmp_path / "labels.json").write_text('["a", "b"]')
    offset = body.encode("latin-1").index(b"\xe9")
    with pytest.raises(DataError, match=rf"{name}: not UTF-8 text: byte b'\\xe9' at byte offset {offset}.*UTF-8"):
        load_task("latin", data_dir=tmp_path)


def test_excel_csv_with_a_bom_loads(tmp_path):
    src = shared_task_dir("mpqa")
    rows = [json.loads(line) for line in (src / "train.jsonl").read_text().splitlines()][:50]
    body = "label,text\n" + "".join(f'{r["label"]},"{r["text"]}"\n' for r in rows)
    (tmp_path / "train.csv").write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8"))
    (tmp_path / "labels.json").write_bytes(b"\xef\xbb\xbf" + b'["negative", "positive"]')
    task = load_task("excel", data_dir=tmp_path)
    assert task.train.texts == [r["text"] for r in rows] and task.train.labels.tolist() == [r["label"] for r in rows]


# --------------------------------------------------------------------- no spec: warn, show what is used
def test_no_spec_warns_and_describes_the_defaults(caplog):
    with caplog.at_level(logging.WARNING, logger="bbfl.data"):
        task = load_task("trec", data_dir=shared_task_dir("trec"))
    assert "no template / label_words / label_descriptions given" in caplog.text
    assert "template = '{text} . {mask} .'" in caplog.text
    text = task.describe()
    assert "template '{text} . {mask} .' (default: no spec gave it)" in text
    assert "  ABBR -> 'ABBR' | 'ABBR'" in text


# --------------------------------------------------------------------- config.json: the resolved task, re-scorable
def test_run_records_resolved_task_and_rows_and_rescores_without_its_spec(tmp_path):
    from typer.testing import CliRunner

    from bbfl.cli import app
    from bbfl.experiment import BlackBoxConfig, DataConfig
    from bbfl.methods.bbt import BBTConfig
    from bbfl.methods.bbt.experiment import run_bbt_experiment

    data = tmp_path / "data"
    data.mkdir()
    _trec_as_csv(data)
    spec = tmp_path / "trec.toml"
    spec.write_text(
        'template = "{mask} question: {text}"\n[label_words]\n'
        + "".join(f'{k} = "{v}"\n' for k, v in TREC_WORDS.items())
        + "[label_descriptions]\n"
        + "".join(f'{k} = "A question about a {v}."\n' for k, v in TREC_WORDS.items())
    )
    data_cfg = DataConfig(task="trec-csv", data_dir=str(data), spec_file=str(spec), k_shot=2, test_limit=12)
    bbt_cfg = BBTConfig(intrinsic_dim=8, prompt_length=2, popsize=4, budget=8, eval_every=8, seed=3)
    run, rows = run_bbt_experiment(data_cfg, bbt_cfg, BlackBoxConfig(max_length=32), tmp_path / "runs")
    config = json.loads((run.path / "config.json").read_text())
    recorded = config["resolved_task"]
    assert recorded["labels"] == sorted(TREC_WORDS) and recorded["template"] == "{mask} question: {text}"
    assert recorded["label_words"] == [TREC_WORDS[k] for k in sorted(TREC_WORDS)]
    assert recorded["label_descriptions"][0] == "A question about a abbreviation."
    assert len(config["test_rows"]) == 12 and config["test_rows"] == sorted(config["test_rows"])

    spec.unlink()  # the spec file is gone: the run still re-scores, on the same rows, with the same task
    result = CliRunner().invoke(app, ["eval", str(run.path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    bbt_acc = next(r["test_acc"] for r in rows if r["method"] == "bbt")
    assert re.search(rf"│ trec-csv │ +{bbt_acc:.4f} │ +[0-9.]+ │ +12 │", result.output), result.output
    assert "using the task recorded in the run's config.json" in result.output
    assert "template '{mask} question: {text}'" in result.output  # the task in use, printed by the CLI
    assert "ABBR -> 'abbreviation' | 'A question about a abbreviation.'" in result.output
