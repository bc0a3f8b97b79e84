"""A linear map over several input/output axes whose kernel keeps its real shape.

(Flax's DenseGeneral initialises a flattened 2-D kernel, which clashes with 3-D logical axis
names under a mesh; this one initialises `[*in_dims, *out_dims]` directly.)
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from mirasol3b.layers.initializers import logical


class Projection(nn.Module):
    """Contracts the last `num_input_axes` axes of `x` with a `[*in, *features]` kernel."""

    features: tuple[int, ...]
    kernel_axes: tuple[str | None, ...]
    num_input_axes: int = 1
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n_in, n_out = self.num_input_axes, len(self.features)
        in_dims = tuple(x.shape[-n_in:])
        init = nn.initializers.xavier_uniform(in_axis=tuple(range(n_in)),
                                              out_axis=tuple(range(n_in, n_in + n_out)))
        kernel = self.param("kernel", logical(init, self.kernel_axes), in_dims + tuple(self.features),
                            self.param_dtype)
        contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
        return jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype), (contract, ((), ())))


def heads_projection(num_heads: int, head_dim: int, dtype, param_dtype, name: str) -> Projection:
    """`[..., embed] -> [..., heads, head_dim]`."""
    return Projection((num_heads, head_dim), ("embed", "heads", "head_dim"), 1, dtype, param_dtype, name=name)


def output_projection(width: int, dtype, param_dtype, name: str, axes: Sequence[str] = ("heads", "head_dim", "embed")):
    """`[..., heads, head_dim] -> [..., width]`."""
    return Projection((width,), tuple(axes), 2, dtype, param_dtype, name=name)
