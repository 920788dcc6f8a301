"""milenas-fast: fast, faithful MiLeNAS on the DARTS search space."""
from .patch import patch_module, replace_mixed_ops
from .space import PRIMITIVES, Genotype, MixedOp, Network
from .space.sampled_op import HardSampledMixedOp

__version__ = "0.1.0"
__all__ = ["MixedOp", "HardSampledMixedOp", "Network", "Genotype", "PRIMITIVES", "patch_module", "replace_mixed_ops",
           "__version__"]
