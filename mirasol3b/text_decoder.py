"""Contextual autoregressive text decoder: causal self-attention plus cross-attention to the media."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from mirasol3b.layers import TokenEmbedding, TransformerSpec, TransformerStack, masks
from mirasol3b.layers.embeddings import lookup
from mirasol3b.layers.initializers import embedding_init, logical
from mirasol3b.layers.projection import dense

# Tables are padded to a multiple of this so the vocab axis shards evenly over `tensor`; the
# padding rows never reach the logits.
VOCAB_PAD_MULTIPLE = 128


def padded_vocab_size(vocab_size: int) -> int:
    return -(-vocab_size // VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE


class TextDecoder(nn.Module):
    """`tokens [batch, length]`, `media [batch, media_tokens, media_width]` -> logits
    `[batch, length, vocab]` float32.

    `positions [batch, length]` (default 0..length-1) index the learned position table, so a
    left-padded prompt can start at position 0. `mask` is the self-attention mask (default causal).
    With `decode=True` keys/values go to the `cache` collection: pass `cache_index` (the slot of
    `tokens[:, 0]`) and a `masks.cached_causal` mask; `media` is needed only on the first call,
    whose cross-attention keys/values are cached for every later token.
    """

    spec: TransformerSpec
    vocab_size: int
    max_length: int

    @nn.compact
    def __call__(self, tokens: jax.Array, media: jax.Array | None, media_mask: jax.Array | None, *,
                 positions: jax.Array | None = None, mask: jax.Array | None = None,
                 cache_index: jax.Array | None = None, decode: bool = False,
                 deterministic: bool = True) -> jax.Array:
        s = self.spec
        length = tokens.shape[1]
        if length > self.max_length:  # the position table would read past its end: NaN everywhere
            raise ValueError(f"text of {length} tokens is longer than model.text_decoder.max_length "
                             f"({self.max_length})")
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(length), tokens.shape)
        if mask is None:
            mask = masks.causal(length)
        table_rows = padded_vocab_size(self.vocab_size)
        x = TokenEmbedding(table_rows, s.width, dtype=s.compute_dtype, param_dtype=s.weight_dtype,
                           name="token_embedding")(tokens)
        table = self.param("position_embedding", logical(embedding_init, ("tokens", "embed")),
                           (self.max_length, s.width), s.weight_dtype)
        x = x + lookup(table, positions, "tokens").astype(x.dtype)
        x = nn.with_logical_constraint(x, ("batch", "tokens", "embed"))
        kv_mask = None if media_mask is None else masks.key_padding(media_mask)
        x = TransformerStack(s, cross_attention=True, name="transformer")(
            x, mask, media, kv_mask, cache_index, deterministic=deterministic, decode=decode)
        logits = dense(table_rows, ("embed", "vocab"), s.compute_dtype, s.weight_dtype, "logits", use_bias=False)(x)
        logits = nn.with_logical_constraint(logits.astype(jnp.float32), ("batch", "tokens", "vocab"))
        return logits[..., :self.vocab_size]
