"""Datasets (CIFAR-10, synthetic), the train/validation split, augmentation plans and loaders."""
from ..errors import DataError
from .datasets import Split, load_dataset, split_train_val
from .loaders import LOADERS, BatchStream
from .select import make_loader, resolve_loader

__all__ = ["DataError", "Split", "load_dataset", "split_train_val", "LOADERS", "BatchStream", "make_loader",
           "resolve_loader"]
