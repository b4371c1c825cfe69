"""Data sets by name: a registry (plugins included), loaders for each format, and cached tensor
splits. A user's own image folder (``folder``) or ``.npz`` arrays (``npz``) are described from
their headers (:func:`describe_dataset`) before anything is decoded.

>>> splits = load_dataset(DatasetSpec(name="digits"), data_roots=[], seed=0)
>>> splits.train.x.shape[1:], splits.num_classes, splits.task
(torch.Size([1, 8, 8]), 10, 'multiclass')
"""

from worker.trial.datasets._describe import (
    DatasetDescription,
    clear_descriptions,
    data_roots,
    describe_dataset,
    set_data_roots,
)
from worker.trial.datasets._errors import DatasetError
from worker.trial.datasets._loading import clear_cache, load_dataset
from worker.trial.datasets._locate import resolved_roots
from worker.trial.datasets._registry import (
    DATASETS,
    USER_KINDS,
    DatasetInfo,
    dataset_info,
    register_dataset,
    registered_datasets,
)
from worker.trial.datasets._splits import DataSplits, Split

__all__ = [
    "DATASETS",
    "USER_KINDS",
    "DataSplits",
    "DatasetDescription",
    "DatasetError",
    "DatasetInfo",
    "Split",
    "clear_cache",
    "clear_descriptions",
    "data_roots",
    "dataset_info",
    "describe_dataset",
    "load_dataset",
    "register_dataset",
    "registered_datasets",
    "resolved_roots",
    "set_data_roots",
]
