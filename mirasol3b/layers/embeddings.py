"""Token and position embeddings."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from mirasol3b.layers.initializers import embedding_init, logical


class LearnedPositions(nn.Module):
    """A learned `[num_positions, embed]` table, added to `x [..., num_positions, embed]`."""

    num_positions: int
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        table = self.param("embedding", logical(embedding_init, ("tokens", "embed")),
                           (self.num_positions, x.shape[-1]), self.param_dtype)
        return x + table.astype(x.dtype)


def sinusoidal(positions: jax.Array, dim: int, max_timescale: float = 10_000.0) -> jax.Array:
    """Parameter-free position code: `positions [...]` -> `[..., dim]` float32.

    Used where the number of positions grows with the input (snippets of a long video), so that
    longer inputs never add parameters.
    """
    if dim % 2:
        raise ValueError(f"sinusoidal embedding needs an even dim, got {dim}")
    freqs = np.exp(-np.log(max_timescale) * np.arange(dim // 2) / (dim // 2)).astype(np.float32)
    angles = positions.astype(jnp.float32)[..., None] * freqs
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


class TokenEmbedding(nn.Module):
    """`[batch, length] int -> [batch, length, embed]`; table on ('vocab', 'embed')."""

    vocab_size: int
    width: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        table = self.param("embedding", logical(embedding_init, ("vocab", "embed")),
                           (self.vocab_size, self.width), self.param_dtype)
        return lookup(table, tokens, "vocab").astype(self.dtype)


def lookup(table: jax.Array, ids: jax.Array, row_axis: str) -> jax.Array:
    """`table[ids]`, with the table's `embed` axis gathered first (FSDP gathers weights before use).

    Without it the partitioner cannot move the fsdp-sharded embed axis onto the batch and
    replicates whole activations instead.
    """
    table = nn.with_logical_constraint(table, (row_axis, None))
    return jnp.take(table, ids, axis=0)
