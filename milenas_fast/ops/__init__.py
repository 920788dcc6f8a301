"""Fast ops (C++/CUDA extension) and their plain-PyTorch reference twins."""
from . import extension
from .edge_reduce import edge_reduce, edge_reduce_reference

__all__ = ["edge_reduce", "edge_reduce_reference", "extension"]
