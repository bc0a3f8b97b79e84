"""Brings each modality's tokens to the Combiner's width and marks which modality they came from."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from mirasol3b.layers.initializers import default_kernel_init, embedding_init, logical


class ModalityFusion(nn.Module):
    """`{name: [batch, snippets, tokens_i, width_i]}` -> `[batch, snippets, sum(tokens_i), width]`.

    Modalities are concatenated in sorted-name order, each projected and given a learned
    modality embedding.
    """

    width: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: dict[str, jax.Array]) -> jax.Array:
        if not tokens:
            raise ValueError("ModalityFusion needs at least one modality")
        parts = []
        for name in sorted(tokens):
            x = nn.Dense(self.width, dtype=self.dtype, param_dtype=self.param_dtype, name=f"{name}_projection",
                         kernel_init=logical(default_kernel_init, ("embed", "mlp")),
                         bias_init=logical(nn.initializers.zeros, ("mlp",)))(tokens[name])
            kind = self.param(f"{name}_embedding", logical(embedding_init, ("embed",)), (self.width,),
                              self.param_dtype)
            parts.append(x + kind.astype(x.dtype))
        x = jnp.concatenate(parts, axis=2)
        return nn.with_logical_constraint(x, ("batch", "snippets", "tokens", "embed"))
