"""The one transformer stack: `depth` blocks under `nn.scan` and `nn.remat`, then a final LayerNorm.

Every stack in the model (video ViT, audio ViT, Combiner, TTM processor, time-aligned model, text
decoder) is this module with a different spec and mask.
"""

from __future__ import annotations

import jax
from flax import linen as nn

from mirasol3b.layers.block import TransformerBlock
from mirasol3b.layers.norms import LayerNorm
from mirasol3b.layers.spec import REMAT_POLICIES, TransformerSpec


class TransformerStack(nn.Module):
    """`x [batch, tokens, embed]` -> `[batch, tokens, embed]` (see `TransformerBlock` for the rest).

    Parameters of scanned layers are stacked on a leading `layers` axis; decode caches on axis 1,
    so every cache leaf keeps batch first (beam search reorders caches along axis 0).

    `keep_last > 0` returns the last `keep_last` tokens only, and the last layer computes only
    those (see `TransformerBlock.keep_last`). Scanned, that layer runs apart as `last_layer` (the
    scan's body has one shape); unrolled, it is `layers_{depth - 1}` as always.
    """

    spec: TransformerSpec
    cross_attention: bool = False
    self_attention_chunk: int = 0  # see `Attention.chunk`; the mask is then in its chunked layout
    keep_last: int = 0

    @nn.compact
    def __call__(self, x: jax.Array, mask=None, kv=None, kv_mask=None, cache_index=None, *,
                 deterministic: bool = True, decode: bool = False) -> jax.Array:
        s = self.spec
        if self.keep_last and (decode or self.self_attention_chunk):
            raise ValueError("TransformerStack.keep_last is for full-sequence self-attention (no decode, no chunks)")

        def block(in_scan: bool):
            if s.remat_policy == "none":
                return TransformerBlock
            return nn.remat(TransformerBlock, policy=REMAT_POLICIES[s.remat_policy], prevent_cse=not in_scan)

        # The mode flags become block fields (not scanned arguments): scan and remat see arrays only.
        fields = dict(spec=s, cross_attention=self.cross_attention, self_attention_chunk=self.self_attention_chunk,
                      decode=decode, deterministic=deterministic)
        inputs = (mask, kv, kv_mask, cache_index)
        if s.scan_layers:
            scanned_depth = s.depth - (1 if self.keep_last else 0)
            if scanned_depth:
                scanned = nn.scan(
                    block(in_scan=True),
                    variable_axes={"params": 0, "cache": 1},
                    split_rngs={"params": True, "dropout": True},
                    in_axes=nn.broadcast,
                    length=scanned_depth,
                    metadata_params={nn.PARTITION_NAME: "layers"},
                )
                x, _ = scanned(**fields, name="layers")(x, *inputs)
            if self.keep_last:
                x, _ = block(in_scan=False)(**fields, keep_last=self.keep_last, name="last_layer")(x, *inputs)
        else:
            for i in range(s.depth):
                keep = self.keep_last if i == s.depth - 1 else 0
                x, _ = block(in_scan=False)(**fields, keep_last=keep, name=f"layers_{i}")(x, *inputs)
        return LayerNorm(dtype=s.compute_dtype, param_dtype=s.weight_dtype, name="final_norm")(x)
