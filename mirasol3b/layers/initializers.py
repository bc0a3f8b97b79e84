"""Parameter initialisers with logical axis names attached."""

from __future__ import annotations

from collections.abc import Sequence

from flax import linen as nn

default_kernel_init = nn.initializers.xavier_uniform()
embedding_init = nn.initializers.normal(stddev=0.02)


def logical(init, axes: Sequence[str | None]):
    """Wraps an initialiser so the parameter carries logical axis names `axes`."""
    return nn.with_logical_partitioning(init, tuple(axes))
