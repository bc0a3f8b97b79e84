"""Brings each modality's tokens to the Combiner's width and marks which modality they came from."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from mirasol3b.layers.initializers import embedding_init, logical
from mirasol3b.layers.projection import dense


class ModalityFusion(nn.Module):
    """`{name: [batch, snippets, tokens_i, width_i]}` -> `[batch, snippets, sum(tokens_i), width]`.

    Modalities are concatenated in sorted-name order, each projected and given a learned
    modality embedding.

    `modality_dropout` (training only, with two or more modalities): each example loses one whole
    modality with this probability per modality (never all of them): its tokens become the bare
    modality embedding. Without it the model leans on whichever modality pays off first and
    leaves the other half-learnt (measured on synthetic_avqa: see configs/tiny.py).
    """

    width: int
    modality_dropout: float = 0.0
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: dict[str, jax.Array], *, deterministic: bool = True) -> jax.Array:
        if not tokens:
            raise ValueError("ModalityFusion needs at least one modality")
        names = sorted(tokens)
        dropped = self._dropped(len(names), next(iter(tokens.values())).shape[0], deterministic)
        parts = []
        for i, name in enumerate(names):
            x = dense(self.width, ("embed", "mlp"), self.dtype, self.param_dtype, f"{name}_projection")(tokens[name])
            if dropped is not None:
                x = jnp.where(dropped[:, i, None, None, None], jnp.zeros_like(x), x)
            kind = self.param(f"{name}_embedding", logical(embedding_init, ("embed",)), (self.width,),
                              self.param_dtype)
            parts.append(x + kind.astype(x.dtype))
        x = jnp.concatenate(parts, axis=2)
        return nn.with_logical_constraint(x, ("batch", "snippets", "tokens", "embed"))

    def _dropped(self, num_modalities: int, batch: int, deterministic: bool) -> jax.Array | None:
        """bool [batch, num_modalities]: at most one True per row, each with `modality_dropout`."""
        if deterministic or self.modality_dropout == 0.0 or num_modalities < 2:
            return None
        u = jax.random.uniform(self.make_rng("dropout"), (batch, 1))
        slot = jnp.arange(num_modalities)[None]
        return (u >= slot * self.modality_dropout) & (u < (slot + 1) * self.modality_dropout)
