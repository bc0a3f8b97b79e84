"""Every attention mask in the model is built here.

Masks are boolean, `True` = may attend, shaped `[batch | 1, 1, queries, keys]` so that they
broadcast over heads. Combine them with `combine`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def combine(*masks: jax.Array | None) -> jax.Array | None:
    """Logical AND of the masks that are not None (None if all are)."""
    out = None
    for m in masks:
        if m is not None:
            out = m if out is None else jnp.logical_and(out, m)
    return out


def causal(length: int) -> jax.Array:
    """Token i sees tokens <= i: `[1, 1, length, length]`."""
    idx = jnp.arange(length)
    return (idx[None, :] <= idx[:, None])[None, None]


def block_causal(num_blocks: int, block_size: int) -> jax.Array:
    """Tokens of block t see every token of blocks <= t: `[1, 1, n, n]`, n = blocks * size.

    Used over the time-aligned latents, one block per snippet.
    """
    block_id = jnp.arange(num_blocks * block_size) // block_size
    return (block_id[None, :] <= block_id[:, None])[None, None]


def key_padding(key_valid: jax.Array) -> jax.Array:
    """Masks out invalid keys: `[batch, keys]` -> `[batch, 1, 1, keys]`.

    Queries are never masked: a padded query row still sees the valid keys (or, if none, attends
    uniformly), which keeps softmax finite; padded outputs are ignored downstream.
    """
    return key_valid.astype(bool)[:, None, None, :]


def cached_causal(query_positions: jax.Array, cache_length: int,
                  key_valid: jax.Array | None = None) -> jax.Array:
    """Causal mask of a chunk of queries against a KV cache.

    Args:
      query_positions: `[batch, queries]` cache slot each query is written to.
      cache_length: number of cache slots.
      key_valid: optional `[batch, cache_length]`, False for slots holding padding.
    Returns:
      `[batch, 1, queries, cache_length]`.
    """
    slots = jnp.arange(cache_length)
    mask = slots[None, None, :] <= query_positions[:, :, None]
    if key_valid is not None:
        mask = jnp.logical_and(mask, key_valid.astype(bool)[:, None, :])
    return mask[:, None]
