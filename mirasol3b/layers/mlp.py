"""The one MLP: Dense -> GELU -> (dropout) -> Dense."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from mirasol3b.layers.projection import dense


class Mlp(nn.Module):
    """`[..., embed] -> [..., out_features or embed]`."""

    hidden_dim: int
    out_features: int | None = None
    dropout_rate: float = 0.0
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    output_axis: str = "embed"

    @nn.compact
    def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
        out_features = self.out_features or x.shape[-1]
        h = dense(self.hidden_dim, ("embed", "mlp"), self.dtype, self.param_dtype, "wi")(x)
        h = nn.gelu(h)
        h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
        return dense(out_features, ("mlp", self.output_axis), self.dtype, self.param_dtype, "wo")(h)
