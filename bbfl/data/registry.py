"""Known tasks with BBT's templates and verbalizers (Sun et al., ICML 2022, official ``bbt.py``).

Class order follows the normalised files in ``../shared/data/<task>/labels.json``, which is also
the order of the labels on the `datasets` hub, so a task reads the same from either source.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from bbfl.exceptions import DataError

PAIR_ENCODER_TEMPLATE = "{text} {text_pair}"
PAIR_TEMPLATE = "{text} ? {mask} , {text_pair}"  # BBT's `<S1> ? [MASK] , <S2>` for MRPC, RTE, SNLI


@dataclass(frozen=True)
class TaskSpec:
    """How to phrase a task and where to download it; the data themselves live in a :class:`Task`.

    Parameters
    ----------
    name : str
        Registry key and ``--task`` value.
    labels : tuple of str
        Class names; the index is the class id.
    label_words : tuple of str
        Verbalizer, one word per class.
    label_descriptions : tuple of str
        One sentence per class for sentence-encoder heads.
    template : str
        Prompt with ``{text}``, optional ``{text_pair}`` and ``{mask}``.
    encoder_template : str
        Prompt for sentence-encoder heads (no mask).
    loss : {"ce", "hinge"}
        BBT's loss: hinge for MRPC, RTE and SNLI, cross-entropy otherwise.
    hub_name, hub_config : str or None
        ``datasets.load_dataset(hub_name, hub_config)``; ``None`` means not on the hub.
    hub_text_col, hub_pair_col, hub_label_col : str
        Column names in the hub dataset (``hub_pair_col`` is ``None`` for single sentences).
    hub_test_split : str
        The hub split used as test set (GLUE's validation set for GLUE tasks, as in BBT).
    description : str
        One line for ``bbfl tasks``.
    """

    name: str
    labels: tuple[str, ...]
    label_words: tuple[str, ...]
    label_descriptions: tuple[str, ...]
    template: str
    encoder_template: str = "{text}"
    loss: Literal["ce", "hinge"] = "ce"
    hub_name: str | None = None
    hub_config: str | None = None
    hub_text_col: str = "text"
    hub_pair_col: str | None = None
    hub_label_col: str = "label"
    hub_test_split: str = "test"
    description: str = ""

    @property
    def is_pair(self) -> bool:
        """Whether examples are sentence pairs."""
        return "{text_pair}" in self.template


_SENTIMENT = dict(
    labels=("negative", "positive"),
    label_words=("bad", "great"),
    label_descriptions=("It was terrible.", "It was great."),
    template="{text} . It was {mask} .",
)
_PAIR = dict(
    template=PAIR_TEMPLATE,
    encoder_template=PAIR_ENCODER_TEMPLATE,
    loss="hinge",
    hub_text_col="sentence1",
    hub_pair_col="sentence2",
)

_DBPEDIA = (  # (class name, BBT label word, description)
    ("Company", "Company", "This is about a company or business."),
    ("EducationalInstitution", "Education", "This is about a school, college or university."),
    ("Artist", "Artist", "This is about an artist, musician, actor or writer."),
    ("Athlete", "Athlete", "This is about an athlete or sports player."),
    ("OfficeHolder", "Office", "This is about a politician or office holder."),
    ("MeanOfTransportation", "Transportation", "This is about a vehicle, ship, train or aircraft."),
    ("Building", "Building", "This is about a building or structure."),
    ("NaturalPlace", "Natural", "This is about a natural place such as a mountain, lake or river."),
    ("Village", "Village", "This is about a village or small town."),
    ("Animal", "Animal", "This is about an animal species."),
    ("Plant", "Plant", "This is about a plant species."),
    ("Album", "Album", "This is about a music album."),
    ("Film", "Film", "This is about a film or movie."),
    ("WrittenWork", "Written", "This is about a book, journal or other written work."),
)

_SPECS = [
    TaskSpec(
        "demo",
        **_SENTIMENT,
        description="Bundled offline demo: 300 hand-written review sentences (200 pool, 100 test)",
    ),
    TaskSpec(
        "sst2",
        **_SENTIMENT,
        hub_name="nyu-mll/glue",
        hub_config="sst2",
        hub_text_col="sentence",
        hub_test_split="validation",
        description="SST-2 movie-review sentiment (GLUE; test = GLUE dev)",
    ),
    TaskSpec(
        "yelp_polarity",
        **_SENTIMENT,
        hub_name="fancyzhx/yelp_polarity",
        description="Yelp review polarity",
    ),
    TaskSpec(
        "agnews",
        labels=("World", "Sports", "Business", "Sci/Tech"),
        label_words=("World", "Sports", "Business", "Tech"),
        label_descriptions=(
            "World politics and international news.",
            "Sports news.",
            "Business and finance news.",
            "Science and technology news.",
        ),
        template="{mask} News: {text}",
        hub_name="fancyzhx/ag_news",
        description="AG News topic classification (4 classes)",
    ),
    TaskSpec(
        "dbpedia",
        labels=tuple(row[0] for row in _DBPEDIA),
        label_words=tuple(row[1] for row in _DBPEDIA),
        label_descriptions=tuple(row[2] for row in _DBPEDIA),
        template="[ Category: {mask} ] {text}",
        hub_name="fancyzhx/dbpedia_14",
        hub_text_col="content",
        description="DBPedia ontology classification (14 classes)",
    ),
    TaskSpec(
        "mrpc",
        labels=("not_equivalent", "equivalent"),
        label_words=("No", "Yes"),
        label_descriptions=(
            "The two sentences mean different things.",
            "The two sentences mean the same thing.",
        ),
        **_PAIR,
        hub_name="nyu-mll/glue",
        hub_config="mrpc",
        hub_test_split="validation",
        description="MRPC paraphrase detection (GLUE; test = GLUE dev)",
    ),
    TaskSpec(
        "rte",
        labels=("entailment", "not_entailment"),
        label_words=("Yes", "No"),
        label_descriptions=(
            "The first sentence implies the second.",
            "The first sentence does not imply the second.",
        ),
        **_PAIR,
        hub_name="nyu-mll/glue",
        hub_config="rte",
        hub_test_split="validation",
        description="RTE textual entailment (GLUE; test = dev, same as SuperGLUE val)",
    ),
    TaskSpec(
        "snli",
        labels=("entailment", "neutral", "contradiction"),
        label_words=("Yes", "Maybe", "No"),
        label_descriptions=(
            "The second sentence is true given the first.",
            "The second sentence might be true given the first.",
            "The second sentence is false given the first.",
        ),
        **{**_PAIR, "hub_text_col": "premise", "hub_pair_col": "hypothesis"},
        hub_name="stanfordnlp/snli",
        description="SNLI natural-language inference (3 classes)",
    ),
]

TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in _SPECS}


def list_tasks() -> list[TaskSpec]:
    """All registered task specs, in registry order.

    Returns
    -------
    list of TaskSpec
    """
    return list(TASKS.values())


def get_spec(name: str) -> TaskSpec:
    """The registered spec called ``name``.

    Parameters
    ----------
    name : str
        Task name.

    Returns
    -------
    TaskSpec

    Raises
    ------
    DataError
        If ``name`` is not registered; the message lists the known names.
    """
    if name not in TASKS:
        raise DataError(
            f"unknown task {name!r}; known tasks: {', '.join(TASKS)} "
            "(for your own data give --data-dir, and --spec for its labels and template)"
        )
    return TASKS[name]
