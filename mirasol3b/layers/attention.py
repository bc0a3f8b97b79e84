"""The one multi-head attention: self or cross, any mask, optional KV cache, float32 softmax."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from mirasol3b.layers import masks
from mirasol3b.layers.projection import heads_projection, output_projection
from mirasol3b.layers.spec import fused_attention_fits

_QKV_AXES = ("batch", "tokens", "heads", "head_dim")


def resolve_implementation(implementation: str, dtype, dropout_rate: float, head_dim: int,
                           backend: str | None = None) -> str:
    """"auto" -> "cudnn" where cuDNN's fused kernel applies (an NVIDIA GPU, bf16/fp16, no dropout,
    head dim a multiple of 8 up to 128), else "xla"; "xla" and "cudnn" stay as asked. The backend
    is `jax.default_backend()` unless given: a CPU computation on a GPU host should ask for "xla"."""
    if implementation != "auto":
        return implementation
    backend = backend or jax.default_backend()
    fits = backend == "gpu" and fused_attention_fits(dtype, dropout_rate) and head_dim % 8 == 0 and head_dim <= 128
    return "cudnn" if fits else "xla"


class Attention(nn.Module):
    """Multi-head dot-product attention.

    `x [batch, queries, embed]`, `kv [batch, keys, kv_embed]`, `mask [batch | 1, 1, queries, keys]`
    bool -> `[batch, queries, embed]`. Self-attention reads keys/values from `x`, or from `kv` when
    given (the queries are then some of those tokens, e.g. the last ones: see `TransformerBlock`).

    With `decode=True` the keys and values live in the `cache` collection:
    - self-attention writes this call's keys/values at slot `cache_index` and attends over the
      whole cache, so `mask` must be `[batch, 1, queries, cache_length]`
      (see `masks.cached_causal`). A cache is created, not written, when the module is
      initialised with a full-length input.
    - cross-attention (`cross=True`) computes keys/values from `kv` once (when `kv` is given)
      and reads them back on later calls made with `kv=None`: they are never recomputed per token.

    With `chunk > 0` (self-attention, no cache) the queries go in chunks of `chunk` tokens, each
    attending to its own chunk's keys and the previous chunk's: cost linear in length. `mask` is
    then `[batch | 1, chunks, 1, chunk, 2 * chunk]` (see `masks.chunked_*`).

    `implementation` (`layers.spec.ATTENTION_IMPLS`): "xla", "cudnn" (the fused kernel on NVIDIA
    GPUs) or "auto" (`resolve_implementation`); decoding with a cache always takes "xla" (one query
    a step: nothing to fuse).
    """

    num_heads: int
    head_dim: int
    cross: bool = False
    decode: bool = False
    chunk: int = 0
    dropout_rate: float = 0.0
    implementation: str = "auto"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def _project(self, name: str, x: jax.Array) -> jax.Array:
        y = heads_projection(self.num_heads, self.head_dim, self.dtype, self.param_dtype, name)(x)
        return nn.with_logical_constraint(y, _QKV_AXES)

    def _cached(self, name: str, value: jax.Array | None, cache_index: jax.Array | None):
        """Returns (cached value to attend over, whether the cache already existed)."""
        initialised = self.has_variable("cache", name)
        if value is None:
            if not initialised:
                raise ValueError(f"{self.name}: cross-attention decode step before the cache was filled")
            return self.get_variable("cache", name), True
        var = self.variable("cache", name, jnp.zeros, value.shape, value.dtype)
        if not initialised:
            return value, False
        if self.cross:
            var.value = value
        else:
            if cache_index is None:
                raise ValueError(f"{self.name}: self-attention decode needs cache_index")
            var.value = jax.lax.dynamic_update_slice(
                var.value, value.astype(var.value.dtype), (0, cache_index, 0, 0))
        return var.value, True

    def _attend(self, q, k, v, mask, deterministic: bool, lead: str = "") -> jax.Array:
        """Softmax(q k^T) v over the last token axis; `lead` names extra axes after batch."""
        implementation = resolve_implementation(self.implementation, self.dtype, self.dropout_rate, self.head_dim)
        if implementation == "cudnn" and not self.decode:
            return self._attend_fused(q, k, v, mask, lead)
        logits = jnp.einsum(f"b{lead}qhd,b{lead}khd->b{lead}hqk", q, k, preferred_element_type=jnp.float32)
        if mask is not None:
            logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1)
        probs = nn.Dropout(self.dropout_rate)(probs, deterministic=deterministic).astype(self.dtype)
        return jnp.einsum(f"b{lead}hqk,b{lead}khd->b{lead}qhd", probs, v.astype(self.dtype))

    def _attend_fused(self, q, k, v, mask, lead: str) -> jax.Array:
        """`_attend` through cuDNN's fused attention (q is already scaled)."""
        if jax.default_backend() != "gpu":
            raise ValueError(f"{self.name}: attention_impl 'cudnn' runs on NVIDIA GPUs only; this JAX backend is "
                             f"{jax.default_backend()!r} (use model.attention_impl='xla')")
        if lead:  # chunks fold into the batch: [b, n, ...] -> [b * n, ...]
            b, n = q.shape[:2]
            fold = lambda t: t.reshape(b * n, *t.shape[2:])  # noqa: E731
            if mask is not None:
                mask = fold(jnp.broadcast_to(mask, (b, n, *mask.shape[2:])))
            return self._attend_fused(fold(q), fold(k), fold(v), mask, "").reshape(q.shape)
        if mask is not None:  # cuDNN takes a mask as a bias spanning every query (no broadcast there)
            mask = jnp.broadcast_to(mask, (*mask.shape[:2], q.shape[1], k.shape[1]))
        return jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask=mask, scale=1.0,
                                            implementation="cudnn")

    @nn.compact
    def __call__(self, x: jax.Array, kv: jax.Array | None = None, mask: jax.Array | None = None, *,
                 cache_index: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
        if not self.cross:
            if kv is not None and (self.decode or self.chunk):
                raise ValueError(f"{self.name}: self-attention over separate keys has no cache or chunks")
            kv = x if kv is None else kv
        elif kv is None and not self.decode:
            raise ValueError(f"{self.name}: cross-attention needs kv inputs")
        q = self._project("query", x)
        k = self._project("key", kv) if kv is not None else None
        v = self._project("value", kv) if kv is not None else None
        if self.decode:
            k, _ = self._cached("cached_key", k, cache_index)
            v, _ = self._cached("cached_value", v, cache_index)

        # Scale q before the product (smaller numbers in low precision); softmax in float32.
        q = q * jnp.asarray(self.head_dim ** -0.5, q.dtype)
        if self.chunk:
            if self.cross or self.decode:
                raise ValueError(f"{self.name}: chunked attention is for self-attention without a cache")
            out = self._attend(masks.chunked(q, self.chunk), masks.chunked(k, self.chunk, previous=True),
                               masks.chunked(v, self.chunk, previous=True), mask, deterministic, "n")
            out = out.reshape(q.shape)
        else:
            out = self._attend(q, k, v, mask, deterministic)
        out = nn.with_logical_constraint(out, _QKV_AXES)
        return output_projection(x.shape[-1], self.dtype, self.param_dtype, "out")(out)
