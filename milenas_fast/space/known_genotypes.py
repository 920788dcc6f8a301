"""Published cells, selectable with `milenas-fast train --arch NAME`."""
from __future__ import annotations

from ..errors import ConfigError
from .genotype import Genotype

# DARTS paper, first-order search (3.00 % error).
DARTS_V1 = Genotype(
    normal=[("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("skip_connect", 0), ("sep_conv_3x3", 1),
            ("skip_connect", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("skip_connect", 2)],
    normal_concat=range(2, 6),
    reduce=[("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 0),
            ("max_pool_3x3", 0), ("skip_connect", 2), ("skip_connect", 2), ("avg_pool_3x3", 0)],
    reduce_concat=range(2, 6),
)

# DARTS paper, second-order search (2.76 % error, 3.3M parameters).
DARTS_V2 = Genotype(
    normal=[("sep_conv_3x3", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("sep_conv_3x3", 1),
            ("sep_conv_3x3", 1), ("skip_connect", 0), ("skip_connect", 0), ("dil_conv_3x3", 2)],
    normal_concat=range(2, 6),
    reduce=[("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 1),
            ("max_pool_3x3", 0), ("skip_connect", 2), ("skip_connect", 2), ("max_pool_3x3", 1)],
    reduce_concat=range(2, 6),
)

# MiLeNAS paper's headline cell: 50-epoch search, epoch 48, n7r3 (2.51 ± 0.11 % error, 3.87M parameters).
MILENAS = Genotype(
    normal=[("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("dil_conv_3x3", 0), ("sep_conv_3x3", 1),
            ("skip_connect", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("sep_conv_5x5", 1)],
    normal_concat=range(2, 6),
    reduce=[("dil_conv_3x3", 0), ("sep_conv_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 0),
            ("skip_connect", 2), ("dil_conv_5x5", 3), ("skip_connect", 2), ("max_pool_3x3", 0)],
    reduce_concat=range(2, 6),
)

KNOWN = {"DARTS_V1": DARTS_V1, "DARTS_V2": DARTS_V2, "DARTS": DARTS_V2, "MILENAS": MILENAS}


def by_name(name: str) -> Genotype:
    """A published genotype by name (case-insensitive); ConfigError lists the known names."""
    g = KNOWN.get(name.upper())
    if g is None:
        raise ConfigError(f"--arch {name!r} is not a known architecture; known: {', '.join(KNOWN)} "
                          "(or pass --genotype TEXT|FILE|RUN_DIR)")
    return g
