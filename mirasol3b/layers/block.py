"""The one transformer block: pre-LN self-attention, optional cross-attention, MLP."""

from __future__ import annotations

import jax
from flax import linen as nn

from mirasol3b.layers.attention import Attention
from mirasol3b.layers.mlp import Mlp
from mirasol3b.layers.norms import LayerNorm
from mirasol3b.layers.spec import TransformerSpec


class TransformerBlock(nn.Module):
    """`x [batch, tokens, embed]` -> `([batch, tokens, embed], None)` (the scan-carry form).

    `mask` is the self-attention mask, `kv [batch, kv_tokens, kv_embed]` and `kv_mask` the
    cross-attention inputs (used only with `cross_attention=True`).

    `keep_last > 0`: only the last `keep_last` tokens go on (`[batch, keep_last, embed]` out): their
    queries still attend to every token's keys, and nothing else is computed for the others.
    """

    spec: TransformerSpec
    cross_attention: bool = False
    self_attention_chunk: int = 0  # see `Attention.chunk`
    decode: bool = False
    deterministic: bool = True
    keep_last: int = 0

    @nn.compact
    def __call__(self, x: jax.Array, mask=None, kv=None, kv_mask=None, cache_index=None):
        s = self.spec
        attention = lambda cross, name: Attention(  # noqa: E731
            num_heads=s.num_heads, head_dim=s.heads_dim, cross=cross, decode=self.decode,
            chunk=0 if cross else self.self_attention_chunk,
            dropout_rate=s.dropout_rate, implementation=s.attention_impl, dtype=s.compute_dtype,
            param_dtype=s.weight_dtype, name=name)
        norm = lambda name: LayerNorm(dtype=s.compute_dtype, param_dtype=s.weight_dtype, name=name)  # noqa: E731
        dropout = nn.Dropout(s.dropout_rate)

        normed = norm("pre_self_attention_norm")(x)
        if self.keep_last:
            x, queries = x[:, -self.keep_last:], normed[:, -self.keep_last:]
            mask = None if mask is None else mask[..., -self.keep_last:, :]
            h = attention(False, "self_attention")(queries, normed, mask, deterministic=self.deterministic)
        else:
            h = attention(False, "self_attention")(normed, mask=mask, cache_index=cache_index,
                                                   deterministic=self.deterministic)
        x = x + dropout(h, deterministic=self.deterministic)
        if self.cross_attention:
            h = attention(True, "cross_attention")(norm("pre_cross_attention_norm")(x), kv, kv_mask,
                                                   deterministic=self.deterministic)
            x = x + dropout(h, deterministic=self.deterministic)
        h = Mlp(s.mlp_dim, dropout_rate=s.dropout_rate, dtype=s.compute_dtype, param_dtype=s.weight_dtype,
                name="mlp")(norm("pre_mlp_norm")(x), deterministic=self.deterministic)
        x = x + dropout(h, deterministic=self.deterministic)
        return nn.with_logical_constraint(x, ("batch", "tokens", "embed")), None
