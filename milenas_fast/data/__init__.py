"""Datasets (CIFAR-10, synthetic), the train/validation split, augmentation plans and loaders."""
from .datasets import DataError, Split, load_dataset, split_train_val
from .loaders import LOADERS, BatchStream, make_loader

__all__ = ["DataError", "Split", "load_dataset", "split_train_val", "LOADERS", "BatchStream", "make_loader"]
