"""Tasks, loaders (local files, bundled demo, `datasets` hub) and few-shot sampling."""

from bbfl.data.loaders import load_task, read_records, records_to_split
from bbfl.data.registry import TASKS, TaskSpec, get_spec, list_tasks
from bbfl.data.sampling import few_shot, limit_test, split_train_test, stratified_rows
from bbfl.data.task import Split, Task

__all__ = [
    "TASKS",
    "Split",
    "Task",
    "TaskSpec",
    "few_shot",
    "get_spec",
    "limit_test",
    "list_tasks",
    "load_task",
    "read_records",
    "records_to_split",
    "split_train_test",
    "stratified_rows",
]
