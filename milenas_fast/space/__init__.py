"""What is searched: primitives, MixedOp, the supernet, genotypes."""
from .genotype import Genotype
from .mixed_op import MixedOp
from .primitives import PRIMITIVES
from .supernet import Cell, Network

__all__ = ["Genotype", "MixedOp", "PRIMITIVES", "Cell", "Network"]
