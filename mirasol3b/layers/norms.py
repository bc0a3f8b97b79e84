"""LayerNorm with its scale and bias on the `embed` logical axis, computed in float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from mirasol3b.layers.initializers import logical


class LayerNorm(nn.Module):
    """`[..., embed] -> [..., embed]`, statistics in float32, output in `dtype`."""

    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    use_scale_and_bias: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.LayerNorm(
            dtype=jnp.float32, param_dtype=self.param_dtype,
            use_scale=self.use_scale_and_bias, use_bias=self.use_scale_and_bias,
            scale_init=logical(nn.initializers.ones, ("embed",)),
            bias_init=logical(nn.initializers.zeros, ("embed",)),
            name="ln")(x.astype(jnp.float32)).astype(self.dtype)
