"""milenas-fast: fast, faithful MiLeNAS on the DARTS search space."""
from .space import PRIMITIVES, Genotype, MixedOp, Network

__version__ = "0.1.0"
__all__ = ["MixedOp", "Network", "Genotype", "PRIMITIVES", "__version__"]
