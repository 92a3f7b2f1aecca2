"""Tasks, loaders and the few-shot sampler, on the real shared data and on bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bbfl.data import Split, few_shot, load_task, read_records
from bbfl.exceptions import DataError
from tests.conftest import shared_task_dir


def _split(labels):
    return Split([f"text {i}" for i in range(len(labels))], np.array(labels))


def test_few_shot_k_per_class_disjoint_and_seeded():
    pool = _split([0] * 50 + [1] * 40 + [2] * 33)
    train, dev = few_shot(pool, 16, seed=3)
    assert np.bincount(train.labels).tolist() == [16, 16, 16]
    assert np.bincount(dev.labels).tolist() == [16, 16, 16]
    assert not set(train.texts) & set(dev.texts)
    again, _ = few_shot(pool, 16, seed=3)
    other, _ = few_shot(pool, 16, seed=4)
    assert again.texts == train.texts and other.texts != train.texts


def test_few_shot_too_small_class_names_it():
    with pytest.raises(DataError, match="class 1 has 5 examples"):
        few_shot(_split([0] * 40 + [1] * 5), 4, seed=0)


@pytest.mark.parametrize("name", ["sst2", "agnews", "mrpc", "rte", "snli", "dbpedia"])
def test_real_tasks_load_with_their_label_sets(name):
    folder = shared_task_dir(name)
    task = load_task(name, data_dir=folder)
    labels = json.loads((folder / "labels.json").read_text())
    assert task.labels == labels
    assert len(task.label_words) == len(labels) == len(task.label_descriptions)
    assert task.train.labels.min() == 0 and task.train.labels.max() == len(labels) - 1
    assert task.test is not None and len(task.test) > 0
    if name in ("mrpc", "rte", "snli"):
        assert task.train.text_pairs is not None and task.loss == "hinge"
        assert "{text_pair}" not in task.format(task.train.head(1), "<mask>")[0]


def test_templates_fill_text_and_mask():
    task = load_task("demo")
    split = task.train.head(2)
    assert task.format(split, "[MASK]")[0] == f"{split.texts[0]} . It was [MASK] ."
    assert task.format_for_encoder(split) == split.texts[:2]
    assert len(task.train) + len(task.test) >= 200 and set(task.train.labels) == {0, 1}


def test_custom_csv_tsv_jsonl_with_string_labels_and_toml_spec(tmp_path):
    (tmp_path / "train.csv").write_text("sentence,sentiment\ngood stuff,pos\nbad stuff,neg\nfine,pos\n")
    (tmp_path / "test.tsv").write_text("sentence\tsentiment\nawful\tneg\n")
    spec = tmp_path / "spec.toml"
    spec.write_text(
        'labels = ["neg", "pos"]\nlabel_words = ["bad", "good"]\ntemplate = "{text} It is {mask}."\n'
        'text_col = "sentence"\nlabel_col = "sentiment"\n'
    )
    task = load_task("reviews", data_dir=tmp_path, spec_file=spec)
    assert task.train.labels.tolist() == [1, 0, 1] and task.test.labels.tolist() == [0]
    assert task.label_descriptions == ["neg", "pos"]  # defaults to the class names
    assert task.format(task.test, "<m>") == ["awful It is <m>."]


@pytest.mark.parametrize(
    ("filename", "content", "message"),
    [
        ("train.jsonl", '{"text": "ok", "label": 0}\n{not json}\n', "line 2 is not valid JSON"),
        ("train.jsonl", '{"sentence": "ok", "label": 0}\n', "missing column"),
        ("train.jsonl", "", "no rows"),
        ("train.jsonl", '{"text": "ok", "label": 7}\n', "unknown label 7"),
        ("train.jsonl", '{"text": "", "label": 0}\n', "empty"),
        ("train.xml", "<a/>", "no train file"),
    ],
)
def test_bad_files_give_errors_naming_file_and_value(tmp_path, filename, content, message):
    (tmp_path / filename).write_text(content)
    (tmp_path / "labels.json").write_text('["a", "b"]')
    with pytest.raises(DataError, match=message) as info:
        load_task("custom", data_dir=tmp_path)
    assert str(tmp_path) in str(info.value)


def test_bad_spec_values_are_named(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"text": "x", "label": 0}\n{"text": "y", "label": 1}\n')
    with pytest.raises(DataError, match="label_words has 1 entries"):
        load_task("c", data_dir=tmp_path, labels=["a", "b"], label_words=["only"])
    with pytest.raises(DataError, match="must contain"):
        load_task("c", data_dir=tmp_path, template="no placeholders")
    with pytest.raises(DataError, match="unknown task option"):
        load_task("c", data_dir=tmp_path, colour="blue")
    with pytest.raises(DataError, match="unknown task 'nope'"):
        load_task("nope")


def test_read_records_unknown_suffix(tmp_path):
    path = tmp_path / "data.parquet"
    path.write_text("x")
    with pytest.raises(DataError, match="unknown file type '.parquet'"):
        read_records(path)


def test_causal_heads_read_the_registry_causal_phrasing_unless_the_user_phrased_the_task(tmp_path):
    """sst2/demo carry a causal template (SmolLM2 reads "Review: ...\\nSentiment:" far better than BBT's cloze);
    masked-LM and encoder heads keep BBT's; a user's template or label words win for every head."""
    task = load_task("sst2", data_dir=shared_task_dir("sst2"))
    causal = task.for_head("causal")
    assert causal.template == "Review: {text}\nSentiment: {mask}" and causal.label_words == ["negative", "positive"]
    assert task.for_head("mlm") is task and task.for_head("encoder") is task
    assert task.template == "{text} . It was {mask} ." and task.label_words == ["bad", "great"]
    assert causal.format_before_mask(task.train.head(1)) == [f"Review: {task.train.texts[0]}\nSentiment:"]
    assert "causal LMs read" in task.describe()
    agnews = load_task("agnews", data_dir=shared_task_dir("agnews")).for_head("causal")
    assert agnews.template == "{text}\nThis news article is about {mask}" and agnews.label_words[3] == "technology"
    # the user's phrasing: no registry causal phrasing left behind
    mine = load_task("demo", template="Text: {text} Mood: {mask}")
    assert mine.for_head("causal").template == "Text: {text} Mood: {mask}" and not mine.causal_template
    words = load_task("demo", label_words=["awful", "fine"])
    assert words.for_head("causal").label_words == ["awful", "fine"]
    # a spec can give both phrasings; causal words as a table by class; the run record rebuilds the task
    spec = tmp_path / "spec.toml"
    spec.write_text(
        'template = "{text} It was {mask}."\ncausal_template = "Q: {text}\\nA: {mask}"\n'
        '[causal_label_words]\npositive = "yes"\nnegative = "no"\n'
    )
    both = load_task("demo", spec_file=spec)
    assert both.for_head("causal").template == "Q: {text}\nA: {mask}"
    assert both.for_head("causal").label_words == ["no", "yes"] and both.for_head("mlm").label_words == ["bad", "great"]
    rebuilt = load_task("demo", **both.spec_record())
    assert rebuilt.for_head("causal").spec_record() == both.for_head("causal").spec_record()


@pytest.mark.parametrize(
    "spec, message",
    [
        ('causal_template = "Q: {text}"', "must contain {text} and {mask}"),
        ('causal_template = "Q: {text} A: {mask}"\ncausal_label_words = ["no"]', "causal_label_words should be 2"),
        ('template = "{text} {mask}"\ncausal_label_words = ["no", "yes"]', "without a causal_template"),
    ],
)
def test_bad_causal_phrasing_is_named(tmp_path, spec, message):
    path = tmp_path / "spec.toml"
    path.write_text(spec)
    with pytest.raises(DataError, match=message):
        load_task("demo", spec_file=path)


def test_a_run_recorded_before_causal_phrasings_resumes_with_the_phrasing_it_ran():
    """An old config.json (resolved task without causal keys) of a causal-LM run keeps BBT's cloze template."""
    from bbfl.experiment import data_config_from_run, load_data_task

    old = {"data": {"task": "demo", "k_shot": 8}, "resolved_task": load_task("demo").spec_record()}
    for key in ("causal_template", "causal_label_words"):
        old["resolved_task"].pop(key)
    task = load_data_task(data_config_from_run(old))
    assert task.for_head("causal").template == "{text} . It was {mask} ." and not task.causal_template
    new = {"data": {"task": "demo", "k_shot": 8}, "resolved_task": load_task("demo").spec_record()}
    assert load_data_task(data_config_from_run(new)).for_head("causal").template.startswith("Review: ")
