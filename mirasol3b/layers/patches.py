"""Linear embedding of flattened patches (tubes of video, tiles of a spectrogram), and the ViT on top."""

from __future__ import annotations

import einops
import jax
import jax.numpy as jnp
from flax import linen as nn

from mirasol3b.layers.embeddings import LearnedPositions
from mirasol3b.layers.projection import dense
from mirasol3b.layers.spec import TransformerSpec
from mirasol3b.layers.stack import TransformerStack


class PatchEmbedding(nn.Module):
    """`[batch, tokens, patch_values]` -> `[batch, tokens, width]` with learned positions."""

    width: int
    num_tokens: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, patches: jax.Array) -> jax.Array:
        if patches.shape[-2] != self.num_tokens:
            raise ValueError(f"{self.name}: expected {self.num_tokens} patches, got {patches.shape[-2]}")
        projection = dense(self.width, ("patch", "embed"), self.dtype, self.param_dtype, "projection")
        x = projection(patches.astype(self.dtype))
        return LearnedPositions(self.num_tokens, param_dtype=self.param_dtype, name="positions")(x)


def snippet_vit(patches: jax.Array, batch: int, spec: TransformerSpec, embedding_name: str, *,
                deterministic: bool) -> jax.Array:
    """`patches [batch * snippets, tokens, patch_values]` -> `[batch, snippets, tokens, width]`.

    Called from an encoder's compact `__call__`: the embedding and the stack become its submodules.
    """
    x = nn.with_logical_constraint(patches, ("batch", "tokens", "patch"))
    x = PatchEmbedding(spec.width, patches.shape[1], dtype=spec.compute_dtype, param_dtype=spec.weight_dtype,
                       name=embedding_name)(x)
    x = TransformerStack(spec, name="transformer")(x, deterministic=deterministic)
    x = einops.rearrange(x, "(b n) k d -> b n k d", b=batch)
    return nn.with_logical_constraint(x, ("batch", "snippets", "tokens", "embed"))
