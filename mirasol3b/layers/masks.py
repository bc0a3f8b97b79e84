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


def sliding_block_causal(num_blocks: int, block_size: int, window: int) -> jax.Array:
    """Tokens of block t see every token of blocks t - window < s <= t: `[1, 1, n, n]`.

    The dense form of `chunked_sliding_block_causal` (for reference and short sequences).
    """
    block_id = jnp.arange(num_blocks * block_size) // block_size
    back = block_id[:, None] - block_id[None, :]
    return ((back >= 0) & (back < window))[None, None]


def chunked(x: jax.Array, chunk: int, previous: bool = False) -> jax.Array:
    """The chunked layout of `Attention(chunk=...)`: `[batch, n, ...]` -> `[batch, n / chunk, chunk, ...]`;
    with `previous` (keys), each chunk is preceded by the one before it (zeros, or False, before the
    first): `[batch, n / chunk, 2 * chunk, ...]`."""
    b, n = x.shape[:2]
    if n % chunk:
        raise ValueError(f"chunked attention: {n} tokens are not a multiple of chunk={chunk}")
    x = x.reshape(b, n // chunk, chunk, *x.shape[2:])
    if previous:
        x = jnp.concatenate([jnp.pad(x, ((0, 0), (1, 0)) + ((0, 0),) * (x.ndim - 2))[:, :-1], x], axis=2)
    return x


def chunked_sliding_block_causal(num_blocks: int, block_size: int, window: int) -> jax.Array:
    """`sliding_block_causal` in the layout of `Attention(chunk=window * block_size)`: queries in
    chunks of `window` blocks, each against its previous chunk's keys and its own.
    `[1, chunks, 1, chunk, 2 * chunk]`; `num_blocks` must be a multiple of `window`."""
    if num_blocks % window:
        raise ValueError(f"num_blocks={num_blocks} is not a multiple of window={window}")
    chunk, chunks = window * block_size, num_blocks // window
    query = jnp.arange(chunks)[:, None] * chunk + jnp.arange(chunk)[None]  # [chunks, chunk] token ids
    key = (jnp.arange(chunks)[:, None] - 1) * chunk + jnp.arange(2 * chunk)[None]  # [chunks, 2 * chunk]
    back = query[:, :, None] // block_size - key[:, None, :] // block_size
    return ((key[:, None, :] >= 0) & (back >= 0) & (back < window))[None, :, None]


def chunked_key_padding(key_valid: jax.Array, chunk: int) -> jax.Array:
    """`key_padding` in the chunked layout: `[batch, keys]` -> `[batch, chunks, 1, 1, 2 * chunk]`."""
    return chunked(key_valid.astype(bool), chunk, previous=True)[:, :, None, None, :]


def segment_readout(segment_sizes: tuple[int, ...], num_readers: int) -> jax.Array:
    """Tokens laid out as `[segment 0, ..., segment n-1, readers]`: reader j sees the tokens of
    segment `j % n` and every reader; segment tokens see everything. `[1, 1, k, k]`."""
    segment = jnp.concatenate([jnp.full((size,), i) for i, size in enumerate(segment_sizes)]
                              + [jnp.full((num_readers,), -1)])
    reads = jnp.concatenate([jnp.full((sum(segment_sizes),), -1), jnp.arange(num_readers) % len(segment_sizes)])
    ok = (reads[:, None] < 0) | (segment[None, :] < 0) | (segment[None, :] == reads[:, None])
    return ok[None, None]


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
