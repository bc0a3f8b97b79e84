"""Transformer Combiner: a transformer over one snippet's tokens plus m learned output tokens."""

from __future__ import annotations

import einops
import jax
import jax.numpy as jnp
from flax import linen as nn

from mirasol3b.layers import TransformerSpec, TransformerStack, masks
from mirasol3b.layers.initializers import embedding_init, logical


class TransformerCombiner(nn.Module):
    """`tokens [batch, snippets, tokens, width]` -> `[batch, snippets, num_outputs, width]`.

    Each snippet is combined on its own: the outputs of snippet t depend on snippet t only.
    `media_mask` is accepted for interface parity with the TTM Combiner and not needed here.
    """

    spec: TransformerSpec
    num_outputs: int
    # Token counts of the modalities, in the order they are concatenated: output j then reads
    # modality j % n only (the media tokens still attend across modalities). None: outputs read all.
    segment_sizes: tuple[int, ...] | None = None
    # The last layer computes the outputs only (`TransformerStack.keep_last`): the same values.
    outputs_only: bool = True

    @nn.compact
    def __call__(self, tokens: jax.Array, media_mask: jax.Array | None = None, *,
                 deterministic: bool = True) -> jax.Array:
        b = tokens.shape[0]
        x = einops.rearrange(tokens, "b n k d -> (b n) k d")
        queries = self.param("output_tokens", logical(embedding_init, ("tokens", "embed")),
                             (self.num_outputs, self.spec.width), self.spec.weight_dtype)
        queries = jnp.broadcast_to(queries.astype(x.dtype), (x.shape[0],) + queries.shape)
        x = jnp.concatenate([x, queries], axis=1)
        mask = None if self.segment_sizes is None else masks.segment_readout(self.segment_sizes, self.num_outputs)
        keep = self.num_outputs if self.outputs_only else 0
        x = TransformerStack(self.spec, keep_last=keep, name="transformer")(x, mask, deterministic=deterministic)
        x = einops.rearrange(x[:, -self.num_outputs:], "(b n) m d -> b n m d", b=b)
        return nn.with_logical_constraint(x, ("batch", "snippets", "tokens", "embed"))
