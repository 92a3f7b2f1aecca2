"""The data layer: Split/Task, registry, loaders (real shared data, custom files, hub), sampler, errors."""

from __future__ import annotations

import json
import sys
import types
from functools import cache
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

from bbfl.data import (
    TASKS,
    Split,
    Task,
    few_shot,
    get_spec,
    list_tasks,
    load_task,
    read_records,
    records_to_split,
    split_train_test,
)
from bbfl.exceptions import DataError

SHARED = (Path(__file__).parents[1] / ".." / "shared" / "data").resolve()
REAL = [name for name in TASKS if name != "demo"]
PAIR_TASKS = {"mrpc", "rte", "snli"}


@pytest.fixture(autouse=True)
def _no_env_data_dir(monkeypatch):
    # A developer's own $BBFL_DATA_DIR must not change what these tests load.
    monkeypatch.delenv("BBFL_DATA_DIR", raising=False)


@cache
def _real_task(name: str) -> Task:
    """Each shared task is parsed once per test session (SST-2's pool alone is 67k rows)."""
    return load_task(name, data_dir=SHARED / name)


def _shared_dir(name: str) -> Path:
    if not (SHARED / name / "train.jsonl").is_file():
        pytest.skip(f"shared data for {name} not found under {SHARED}")
    return SHARED / name


def _split(labels: list[int]) -> Split:
    return Split([f"text {i}" for i in range(len(labels))], np.array(labels))


def _write(folder: Path, name: str, content: str) -> Path:
    path = folder / name
    path.write_text(content, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- Split and Task


def test_split_subset_head_and_masks():
    split = Split(["a", "b", "c"], [0, 1, 0], ["x", "y", "z"])
    assert split.labels.dtype == np.int64 and len(split) == 3
    sub = split.subset([2, 0])
    assert sub.texts == ["c", "a"] and sub.text_pairs == ["z", "x"] and sub.labels.tolist() == [0, 0]
    assert split.subset(np.array([False, True, True])).texts == ["b", "c"]
    assert split.head(2).texts == ["a", "b"] and len(split.head(10)) == 3
    assert len(split.subset([])) == 0


def test_split_rejects_mismatched_lengths():
    with pytest.raises(DataError, match="3 texts but 2 labels"):
        Split(["a", "b", "c"], [0, 1])
    with pytest.raises(DataError, match="2 texts but 1 text pairs"):
        Split(["a", "b"], [0, 1], ["x"])


def test_task_rejects_verbalizer_of_wrong_size():
    with pytest.raises(DataError, match=r"label_words has 1 entries \['bad'\]"):
        Task("t", ["neg", "pos"], ["bad"], ["a", "b"], "{text} {mask}", "{text}", "ce", _split([0, 1]))


# --------------------------------------------------------------------------- registry


def test_registry_has_bbt_tasks_with_paper_templates_and_verbalizers():
    assert {"demo", "sst2", "yelp_polarity", "agnews", "dbpedia", "mrpc", "rte", "snli"} <= set(TASKS)
    assert [s.name for s in list_tasks()] == list(TASKS)
    assert TASKS["sst2"].template == TASKS["yelp_polarity"].template == "{text} . It was {mask} ."
    assert TASKS["sst2"].label_words == ("bad", "great") == TASKS["demo"].label_words
    assert TASKS["agnews"].template == "{mask} News: {text}"
    assert TASKS["agnews"].label_words == ("World", "Sports", "Business", "Tech")
    assert TASKS["dbpedia"].template == "[ Category: {mask} ] {text}"
    assert TASKS["dbpedia"].label_words[:3] == ("Company", "Education", "Artist")
    assert TASKS["dbpedia"].label_words[-1] == "Written" and len(TASKS["dbpedia"].label_words) == 14
    assert TASKS["mrpc"].label_words == ("No", "Yes")
    assert TASKS["rte"].label_words == ("Yes", "No")
    assert TASKS["snli"].label_words == ("Yes", "Maybe", "No")
    for spec in list_tasks():
        assert len(spec.labels) == len(spec.label_words) == len(spec.label_descriptions)
        assert spec.loss == ("hinge" if spec.name in PAIR_TASKS else "ce")
        assert spec.is_pair == (spec.name in PAIR_TASKS)
        if spec.is_pair:
            assert spec.template == "{text} ? {mask} , {text_pair}"
            assert spec.encoder_template == "{text} {text_pair}"
        if spec.name != "demo":
            assert spec.hub_name and spec.hub_text_col and spec.hub_label_col


def test_get_spec_unknown_name_lists_known_ones():
    assert get_spec("agnews").labels[3] == "Sci/Tech"
    with pytest.raises(DataError, match=r"unknown task 'nope'.*sst2.*snli"):
        get_spec("nope")
    with pytest.raises(DataError, match="unknown task 'nope'"):
        load_task("nope")


# --------------------------------------------------------------------------- templates


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("sst2", "A fine film . It was <mask> ."),
        ("yelp_polarity", "A fine film . It was <mask> ."),
        ("agnews", "<mask> News: A fine film"),
        ("dbpedia", "[ Category: <mask> ] A fine film"),
        ("mrpc", "A fine film ? <mask> , Second one"),
        ("snli", "A fine film ? <mask> , Second one"),
    ],
)
def test_registered_templates_fill_text_pair_and_mask(name, expected):
    spec = TASKS[name]
    pairs = ["Second one"] if spec.is_pair else None
    task = Task(
        name,
        list(spec.labels),
        list(spec.label_words),
        list(spec.label_descriptions),
        spec.template,
        spec.encoder_template,
        spec.loss,
        Split(["A fine film"], [0], pairs),
    )
    assert task.format(task.train, "<mask>") == [expected]
    expected_enc = "A fine film Second one" if spec.is_pair else "A fine film"
    assert task.format_for_encoder(task.train) == [expected_enc]
    assert task.num_classes == len(spec.labels)


def test_format_does_not_expand_placeholders_inside_texts():
    task = load_task("demo")
    split = Split(["price {mask} and {text} {x}"], [1])
    assert task.format(split, "[MASK]") == ["price {mask} and {text} {x} . It was [MASK] ."]


def test_pair_template_without_pairs_is_an_error():
    spec = TASKS["rte"]
    task = Task(
        "rte",
        ["a", "b"],
        ["Yes", "No"],
        ["a", "b"],
        spec.template,
        spec.encoder_template,
        "hinge",
        _split([0]),
    )
    with pytest.raises(DataError, match="needs text pairs"):
        task.format(task.train, "<mask>")


# --------------------------------------------------------------------------- sampling


def test_few_shot_exact_k_per_class_disjoint_and_seeded():
    pool = _split([0] * 50 + [1] * 40 + [2] * 33)
    train, dev = few_shot(pool, 16, seed=3)
    assert np.bincount(train.labels).tolist() == [16, 16, 16]
    assert np.bincount(dev.labels).tolist() == [16, 16, 16]
    assert not set(train.texts) & set(dev.texts)
    assert len(set(train.texts)) == 48 and len(set(dev.texts)) == 48
    again_train, again_dev = few_shot(pool, 16, seed=3)
    assert again_train.texts == train.texts and again_dev.texts == dev.texts
    other, _ = few_shot(pool, 16, seed=4)
    assert set(other.texts) != set(train.texts)
    # texts and labels travel together
    assert all(pool.labels[int(t.split()[1])] == y for t, y in zip(train.texts, train.labels))


def test_few_shot_dev_k_and_pairs():
    pool = Split([f"t{i}" for i in range(30)], [0, 1] * 15, [f"p{i}" for i in range(30)])
    train, dev = few_shot(pool, 4, seed=0, dev_k=2)
    assert np.bincount(train.labels).tolist() == [4, 4] and np.bincount(dev.labels).tolist() == [2, 2]
    assert [p[1:] for p in train.text_pairs] == [t[1:] for t in train.texts]
    _, empty_dev = few_shot(pool, 4, seed=0, dev_k=0)
    assert len(empty_dev) == 0


def test_few_shot_too_small_class_names_class_and_counts():
    with pytest.raises(DataError, match=r"class 1 \('pos'\) has 5 examples; 4 train \+ 4 dev"):
        few_shot(_split([0] * 40 + [1] * 5), 4, seed=0, class_names=["neg", "pos"])
    with pytest.raises(DataError, match="class 1 has 0 examples"):  # a class missing from the pool
        few_shot(_split([0] * 40 + [2] * 40), 4, seed=0)
    with pytest.raises(DataError, match="k >= 1"):
        few_shot(_split([0, 1]), 0, seed=0)


def test_split_train_test_is_stratified_disjoint_and_seeded():
    pool = _split([0] * 60 + [1] * 40)
    train, test = split_train_test(pool, 0.25, seed=1)
    assert np.bincount(test.labels).tolist() == [15, 10] and len(train) == 75
    assert not set(train.texts) & set(test.texts)
    assert split_train_test(pool, 0.25, seed=1)[1].texts == test.texts
    assert split_train_test(pool, 0.25, seed=2)[1].texts != test.texts
    with pytest.raises(DataError, match="test_fraction"):
        split_train_test(pool, 1.5, seed=0)


# --------------------------------------------------------------------------- real shared data


@pytest.mark.parametrize("name", REAL)
def test_real_tasks_load_with_labels_json_ranges(name):
    folder = _shared_dir(name)
    task = _real_task(name)
    labels = json.loads((folder / "labels.json").read_text())
    assert task.labels == labels and task.num_classes == len(labels)
    assert task.loss == TASKS[name].loss
    splits = [task.train] + ([task.test] if task.test is not None else [])
    for split in splits:
        assert split.labels.dtype == np.int64
        assert split.labels.min() == 0 and split.labels.max() == len(labels) - 1
        assert (split.text_pairs is not None) == (name in PAIR_TASKS)
    assert (task.test is None) == (not (folder / "test.jsonl").exists())
    prompt = task.format(task.train.head(1), "<mask>")[0]
    assert "<mask>" in prompt and task.train.texts[0] in prompt and "{" not in prompt


def test_real_pool_supports_bbt_16_shot_sampling():
    _shared_dir("agnews")
    train, dev = few_shot(_real_task("agnews").train, 16, seed=42, class_names=_real_task("agnews").labels)
    assert np.bincount(train.labels).tolist() == [16] * 4 and len(dev) == 64


def test_yelp_without_test_split_can_be_split():
    _shared_dir("yelp_polarity")
    task = _real_task("yelp_polarity")
    train, test = split_train_test(task.train, 0.5, seed=0)
    assert np.bincount(test.labels).tolist() == [80, 80] and len(train) == 160


def test_env_data_dir_with_one_folder_per_task(monkeypatch):
    _shared_dir("dbpedia")
    monkeypatch.setenv("BBFL_DATA_DIR", str(SHARED))
    task = load_task("dbpedia")
    assert task.labels == _real_task("dbpedia").labels and len(task.train) == len(_real_task("dbpedia").train)
    # the root itself has no train file, so the demo still loads from the package
    assert len(load_task("demo").train) == 200


def test_env_data_dir_flat_folder_and_demo_not_shadowed(monkeypatch, tmp_path):
    _write(tmp_path, "train.jsonl", '{"text": "x", "label": "a"}\n{"text": "y", "label": "b"}\n')
    monkeypatch.setenv("BBFL_DATA_DIR", str(tmp_path))
    assert load_task("mine").labels == ["a", "b"]
    assert load_task().name == tmp_path.name
    assert load_task("demo").labels == ["negative", "positive"]


def test_labels_json_order_must_agree_with_the_registered_spec(tmp_path):
    _write(tmp_path, "train.jsonl", '{"text": "x", "label": 0}\n{"text": "y", "label": 1}\n')
    _write(tmp_path, "labels.json", '["positive", "negative"]')
    with pytest.raises(DataError, match=r"labels.json: class names \['positive', 'negative'\] disagree"):
        load_task("sst2", data_dir=tmp_path)


def test_lmbff_tsv_with_bom_quotes_and_pairs():
    path = SHARED / "lmbff_k-shot" / "MRPC" / "16-13" / "train.tsv"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    rows = read_records(path, text_col="#1 String", pair_col="#2 String", label_col="Quality")
    split = records_to_split(rows, ["not_equivalent", "equivalent"], path)
    assert len(split) == 32 and split.text_pairs is not None
    assert np.bincount(split.labels).tolist() == [16, 16]


# --------------------------------------------------------------------------- demo


def test_demo_is_packaged_balanced_and_disjoint():
    pkg = resources.files("bbfl.data")
    assert (pkg / "demo.jsonl").is_file() and (pkg / "demo_test.jsonl").is_file()
    task = load_task()
    assert task.name == "demo" and task.test is not None
    assert np.bincount(task.train.labels).tolist() == [100, 100]
    assert np.bincount(task.test.labels).tolist() == [50, 50]
    texts = [t.lower() for t in task.train.texts + task.test.texts]
    assert len(set(texts)) == 300
    split = task.train.head(2)
    assert task.format(split, "[MASK]")[0] == f"{split.texts[0]} . It was [MASK] ."
    assert task.format_for_encoder(split) == split.texts


def test_demo_accepts_overrides():
    task = load_task("demo", label_words=["awful", "good"], template="Review: {text} Verdict: {mask}")
    assert task.label_words == ["awful", "good"] and task.format(task.test.head(1), "?")[0].endswith("?")


# --------------------------------------------------------------------------- custom data


def test_custom_csv_and_tsv_with_string_labels_and_toml_spec(tmp_path):
    _write(tmp_path, "train.csv", 'sentence,sentiment\ngood stuff,pos\n"bad, really bad",neg\nfine,pos\n')
    _write(tmp_path, "test.tsv", 'sentence\tsentiment\nawful "stuff\tneg\n')
    spec = _write(
        tmp_path,
        "reviews.toml",
        'labels = ["neg", "pos"]\nlabel_words = ["bad", "good"]\ntemplate = "{text} It is {mask}."\n'
        'text_col = "sentence"\nlabel_col = "sentiment"\n',
    )
    task = load_task("reviews", data_dir=tmp_path, spec_file=spec)
    assert task.train.labels.tolist() == [1, 0, 1] and task.train.texts[1] == "bad, really bad"
    assert task.test.labels.tolist() == [0] and task.test.texts == ['awful "stuff']
    assert task.label_descriptions == ["neg", "pos"]  # defaults to the class names
    assert task.format(task.test, "<m>") == ['awful "stuff It is <m>.']
    assert task.loss == "ce" and task.encoder_template == "{text}"


def test_custom_jsonl_infers_sorted_string_labels(tmp_path):
    rows = [{"text": f"t{i}", "label": lab} for i, lab in enumerate(["sports", "arts", "sports", "news"])]
    _write(tmp_path, "train.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    task = load_task("topics", data_dir=tmp_path)
    assert task.labels == ["arts", "news", "sports"] and task.train.labels.tolist() == [2, 0, 2, 1]
    assert task.label_words == task.labels == task.label_descriptions and task.test is None
    assert task.template == "{text} . {mask} ."


def test_custom_numeric_labels_map_to_ids(tmp_path):
    _write(tmp_path, "train.csv", "text,stars\na,5\nb,1\nc,3\nd,10\n")
    task = load_task("stars", data_dir=tmp_path, label_col="stars")
    assert task.labels == ["1", "3", "5", "10"] and task.train.labels.tolist() == [2, 0, 1, 3]
    _write(tmp_path, "train.csv", "text,label\na,1\nb,0\n")
    assert load_task("ids", data_dir=tmp_path).train.labels.tolist() == [1, 0]


def test_custom_json_list_with_pairs_gets_pair_defaults(tmp_path):
    rows = [{"q": "a", "a": "b", "y": "same"}, {"q": "c", "a": "d", "y": "different"}]
    _write(tmp_path, "train.json", json.dumps(rows))
    task = load_task("qq", data_dir=tmp_path, text_col="q", pair_col="a", label_col="y", loss="hinge")
    assert task.labels == ["different", "same"] and task.train.text_pairs == ["b", "d"]
    assert task.format(task.train.head(1), "M") == ["a ? M , b"]
    assert task.format_for_encoder(task.train.head(1)) == ["a b"] and task.loss == "hinge"


# --------------------------------------------------------------------------- bad inputs


BAD_FILES = [
    # (file name, content, extra load_task options, fragments the message must contain)
    ("train.jsonl", '{"text": "ok", "label": 0}\n{not json}\n', {}, ["line 2", "{not json}"]),
    (
        "train.jsonl",
        '{"text": "ok", "label": 0}\n{"sentence": "x", "label": 1}\n',
        {},
        ["line 2", "'text'", "sentence"],
    ),
    ("train.jsonl", "", {}, ["no rows", "empty"]),
    ("train.jsonl", '{"text": "ok", "label": 7}\n', {}, ["unknown label 7", "'a', 'b'"]),
    ("train.jsonl", '{"text": "ok", "label": "maybe"}\n', {}, ["unknown label 'maybe'"]),
    ("train.jsonl", '{"text": "  ", "label": 0}\n', {}, ["line 1", "'text'", "'  '"]),
    ("train.jsonl", "[1, 2]\n", {}, ["line 1", "JSON object", "[1, 2]"]),
    ("train.csv", "good,1\nbad,0\n", {}, ["missing column", "'text'", "'good'"]),
    ("train.csv", "text,label\nfine,\n", {}, ["line 2", "empty 'label'"]),
    ("train.tsv", "text\tlabel\n\t1\n", {}, ["line 2", "empty or non-text 'text'"]),
    ("train.json", '{"text": "x"}', {}, ["JSON list", "dict"]),
    (
        "train.jsonl",
        '{"text": "x", "label": 0}\n',
        {"label_col": "y"},
        ["missing column(s) ['y']", "'label'"],
    ),
]


@pytest.mark.parametrize(("filename", "content", "options", "fragments"), BAD_FILES)
def test_bad_files_raise_data_error_naming_file_and_value(tmp_path, filename, content, options, fragments):
    _write(tmp_path, filename, content)
    _write(tmp_path, "labels.json", '["a", "b"]')
    with pytest.raises(DataError) as info:
        load_task("custom", data_dir=tmp_path, **options)
    message = str(info.value)
    assert filename in message
    for fragment in fragments:
        assert fragment in message


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file"):
        read_records(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match=r"data\.parquet: unknown file type '\.parquet'"):
        read_records(_write(tmp_path, "data.parquet", "x"))
    _write(tmp_path, "train.xml", "<a/>")
    with pytest.raises(DataError, match=r"no train file \(found \['train.xml'\]"):
        load_task("custom", data_dir=tmp_path)
    with pytest.raises(DataError, match="not a directory"):
        load_task("custom", data_dir=tmp_path / "absent")
    _write(tmp_path, "train.csv", "text,label\na,0\n")
    _write(tmp_path, "train.jsonl", '{"text": "a", "label": 0}\n')
    with pytest.raises(DataError, match=r"several train files \['train.jsonl', 'train.csv'\]"):
        load_task("custom", data_dir=tmp_path)


def test_bad_labels_json(tmp_path):
    _write(tmp_path, "train.jsonl", '{"text": "x", "label": 0}\n')
    _write(tmp_path, "labels.json", '{"0": "neg"}')
    with pytest.raises(
        DataError, match=r"labels.json: expected a JSON list of class names, got \{'0': 'neg'\}"
    ):
        load_task("custom", data_dir=tmp_path)


def test_records_to_split_names_file_row_value_and_allowed(tmp_path):
    recs = [{"text": "a", "label": "pos"}, {"text": "b", "label": 1.5}]
    with pytest.raises(DataError) as info:
        records_to_split(recs, ["neg", "pos"], tmp_path / "train.jsonl")
    assert "train.jsonl: row 2 has unknown label 1.5" in str(info.value) and "['neg', 'pos']" in str(
        info.value
    )
    assert records_to_split(recs[:1], ["neg", "pos"], "f").labels.tolist() == [1]


@pytest.fixture
def two_rows(tmp_path) -> Path:
    _write(tmp_path, "train.jsonl", '{"text": "x", "label": 0}\n{"text": "y", "label": 1}\n')
    return tmp_path


@pytest.mark.parametrize(
    ("options", "fragments"),
    [
        ({"labels": ["a", "b"], "label_words": ["only"]}, ["label_words has 1 entries ['only']"]),
        ({"label_descriptions": ["x", "y", "z"]}, ["label_descriptions has 3 entries"]),
        ({"template": "no placeholders"}, ["template 'no placeholders' must contain {text} and {mask}"]),
        ({"template": "{text} {mask} {text_pair}"}, ["uses {text_pair}"]),
        ({"encoder_template": "{mask}"}, ["encoder_template '{mask}' must contain {text}"]),
        ({"loss": "mse"}, ["loss must be 'ce' or 'hinge', got 'mse'"]),
        ({"labels": ["a", "a"]}, ["labels must be distinct", "['a', 'a']"]),
        ({"colour": "blue"}, ["unknown task option(s) ['colour']"]),
    ],
)
def test_bad_spec_values_are_named(two_rows, options, fragments):
    with pytest.raises(DataError) as info:
        load_task("c", data_dir=two_rows, **options)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_bad_toml_spec_names_the_file_and_value(two_rows):
    spec = _write(two_rows, "spec.toml", 'template = "{text} only"\n')
    with pytest.raises(DataError, match=r"spec\.toml\): template '\{text\} only' must contain"):
        load_task("c", data_dir=two_rows, spec_file=spec)
    spec = _write(two_rows, "spec.toml", 'labels = ["a", "b"]\nverbalizer = ["x", "y"]\n')
    with pytest.raises(DataError, match=r"spec\.toml: unknown key\(s\) \['verbalizer'\]"):
        load_task("c", data_dir=two_rows, spec_file=spec)
    spec = _write(two_rows, "spec.toml", "labels = [\n")
    with pytest.raises(DataError, match=r"spec\.toml: not valid TOML"):
        load_task("c", data_dir=two_rows, spec_file=spec)
    with pytest.raises(DataError, match=r"missing\.toml: task spec file not found"):
        load_task("c", data_dir=two_rows, spec_file=two_rows / "missing.toml")


# --------------------------------------------------------------------------- hub


def test_hub_without_datasets_says_pass_data_dir(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(DataError, match=r"task 'sst2'.*`datasets` package is not installed.*--data-dir"):
        load_task("sst2")


def test_hub_download_failure_says_pass_data_dir(monkeypatch):
    def load_dataset(*args):
        raise ConnectionError("offline")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(DataError, match=r"downloading 'nyu-mll/glue/rte' failed \(offline\).*--data-dir"):
        load_task("rte")


def test_hub_columns_are_mapped_and_unlabelled_rows_dropped(monkeypatch):
    calls = []

    def load_dataset(name, config):
        calls.append((name, config))
        part = {"premise": ["p0", "p1", "p2"], "hypothesis": ["h0", "h1", "h2"], "label": [2, -1, 0]}
        return {"train": part, "test": part}

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    task = load_task("snli")
    assert calls == [("stanfordnlp/snli", None)]
    assert task.train.texts == ["p0", "p2"] and task.train.text_pairs == ["h0", "h2"]
    assert task.train.labels.tolist() == [2, 0] and task.test is not None and task.loss == "hinge"
