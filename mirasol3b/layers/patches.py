"""Linear embedding of flattened patches (tubes of video, tiles of a spectrogram)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from mirasol3b.layers.embeddings import LearnedPositions
from mirasol3b.layers.initializers import default_kernel_init, logical


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
        x = nn.Dense(self.width, dtype=self.dtype, param_dtype=self.param_dtype, name="projection",
                     kernel_init=logical(default_kernel_init, ("patch", "embed")),
                     bias_init=logical(nn.initializers.zeros, ("embed",)))(patches.astype(self.dtype))
        return LearnedPositions(self.num_tokens, param_dtype=self.param_dtype, name="positions")(x)
