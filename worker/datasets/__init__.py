"""Data sets by name: a registry, loaders for each format, and cached tensor splits.

>>> splits = load_dataset(DatasetSpec(name="digits"), data_roots=[], seed=0)
>>> splits.train.x.shape[1:], splits.num_classes, splits.task
(torch.Size([1, 8, 8]), 10, 'multiclass')
"""

from worker.datasets.errors import DatasetError
from worker.datasets.loading import clear_cache, load_dataset
from worker.datasets.registry import DATASETS, DatasetInfo, dataset_info
from worker.datasets.splits import DataSplits, Split

__all__ = [
    "DATASETS",
    "DataSplits",
    "DatasetError",
    "DatasetInfo",
    "Split",
    "clear_cache",
    "dataset_info",
    "load_dataset",
]
