"""TokenLearner (v1.1): learns S soft selections over the input tokens."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from mirasol3b.layers import LayerNorm, Mlp


class TokenLearner(nn.Module):
    """`[batch, tokens, embed]` -> `[batch, num_tokens, embed]`.

    LayerNorm -> MLP -> `num_tokens` attention maps, softmax over the input tokens; each output is
    a weighted sum of the un-normalised inputs. `mask` (bool `[tokens, num_tokens]`, optional): which
    inputs each output may select.
    """

    num_tokens: int
    hidden_dim: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None, *, deterministic: bool = True) -> jax.Array:
        h = LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="norm")(x)
        logits = Mlp(self.hidden_dim, out_features=self.num_tokens, dtype=self.dtype,
                     param_dtype=self.param_dtype, output_axis="memory", name="selector")(
                         h, deterministic=deterministic)
        logits = logits.astype(jnp.float32)
        if mask is not None:
            logits = jnp.where(mask[None], logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=1).astype(self.dtype)  # over tokens
        return jnp.einsum("bns,bnd->bsd", weights, x.astype(self.dtype))
