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
    """

    spec: TransformerSpec
    cross_attention: bool = False
    self_attention_chunk: int = 0  # see `Attention.chunk`; the mask is then in its chunked layout

    @nn.compact
    def __call__(self, x: jax.Array, mask=None, kv=None, kv_mask=None, cache_index=None, *,
                 deterministic: bool = True, decode: bool = False) -> jax.Array:
        s = self.spec
        block = TransformerBlock
        policy_name = s.remat_policy
        if policy_name != "none":
            block = nn.remat(block, policy=REMAT_POLICIES[policy_name], prevent_cse=not s.scan_layers)
        # The mode flags become block fields (not scanned arguments): scan and remat see arrays only.
        fields = dict(spec=s, cross_attention=self.cross_attention, self_attention_chunk=self.self_attention_chunk,
                      decode=decode, deterministic=deterministic)
        if s.scan_layers:
            scanned = nn.scan(
                block,
                variable_axes={"params": 0, "cache": 1},
                split_rngs={"params": True, "dropout": True},
                in_axes=nn.broadcast,
                length=s.depth,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x, _ = scanned(**fields, name="layers")(x, mask, kv, kv_mask, cache_index)
        else:
            for i in range(s.depth):
                x, _ = block(**fields, name=f"layers_{i}")(x, mask, kv, kv_mask, cache_index)
        return LayerNorm(dtype=s.compute_dtype, param_dtype=s.weight_dtype, name="final_norm")(x)
