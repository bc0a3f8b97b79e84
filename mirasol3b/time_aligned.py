"""Time-aligned autoregressive model: block-causal over the snippets' combined latents."""

from __future__ import annotations

import einops
import jax
import jax.numpy as jnp
from flax import linen as nn

from mirasol3b.layers import LearnedPositions, TransformerSpec, TransformerStack, masks, sinusoidal
from mirasol3b.layers.projection import dense


def windowed_snippets(snippets: int, window: int) -> int:
    """Snippets the windowed (chunked) attention runs over, padded to whole windows; 0 when the
    window does not apply (off, or at least as long as the clip) and attention is dense."""
    return -(-snippets // window) * window if 0 < window < snippets else 0


class TimeAlignedModel(nn.Module):
    """`latents [batch, snippets, m, latent_width]`, `media_mask [batch, snippets]` ->
    (`features [batch, snippets, m, width]`, `predictions [batch, snippets, m, latent_width]`).

    Tokens of snippet t attend to snippets <= t that hold real media (with `window > 0`, only the
    last `window` of them: attention then costs time and memory linear in the snippets, and deeper
    layers reach further back); `predictions[:, t]` is the model's guess of `latents[:, t + 1]`.
    Snippet positions are sinusoidal, so longer videos add snippets and no parameters.
    `causal=False` (an ablation: the model not autoregressive) lets every snippet attend to every
    real one; its predictions then see their targets, so the latent loss must be off.
    """

    spec: TransformerSpec
    window: int = 0
    causal: bool = True

    @nn.compact
    def __call__(self, latents: jax.Array, media_mask: jax.Array | None, *, deterministic: bool = True,
                 decode: bool = False, first_snippet: jax.Array | int = 0, cache_mask: jax.Array | None = None,
                 cache_index: jax.Array | None = None):
        """With `decode=True` (streaming) `latents` are the snippets `first_snippet ..` of a stream
        whose earlier keys and values are in the `cache` collection: they are written at token slot
        `cache_index`, and `cache_mask [batch, 1, tokens, cache_tokens]` says which slots each
        token reads (`streaming.py` keeps the slots and the window); `media_mask` is not read."""
        b, t, m, latent_width = latents.shape
        s = self.spec
        x = dense(s.width, ("mlp", "embed"), s.compute_dtype, s.weight_dtype, "input_projection")(latents)
        x = LearnedPositions(m, param_dtype=s.weight_dtype, name="token_positions")(x)
        x = x + sinusoidal(first_snippet + jnp.arange(t), s.width)[None, :, None, :].astype(x.dtype)
        if decode:
            x = einops.rearrange(x, "b t m d -> b (t m) d")
            x = TransformerStack(s, name="transformer")(x, cache_mask, cache_index=cache_index,
                                                        deterministic=deterministic, decode=True)
            return self._outputs(x, m, t, latent_width)
        valid = media_mask.astype(bool)
        chunk = 0
        padded = windowed_snippets(t, self.window)
        if padded:
            # Whole chunks of `window` snippets; the padded snippets are masked keys and dropped.
            x = jnp.pad(x, ((0, 0), (0, padded - t), (0, 0), (0, 0)))
            valid = jnp.pad(valid, ((0, 0), (0, padded - t)))
            chunk = self.window * m
        x = einops.rearrange(x, "b t m d -> b (t m) d")
        token_valid = jnp.repeat(valid, m, axis=1)
        if chunk:
            mask = masks.combine(masks.chunked_sliding_block_causal(valid.shape[1], m, self.window),
                                 masks.chunked_key_padding(token_valid, chunk))
        elif self.causal:
            mask = masks.combine(masks.block_causal(t, m), masks.key_padding(token_valid))
        else:
            mask = masks.key_padding(token_valid)
        x = TransformerStack(s, self_attention_chunk=chunk, name="transformer")(x, mask, deterministic=deterministic)
        return self._outputs(x, m, t, latent_width)

    def _outputs(self, x: jax.Array, m: int, t: int, latent_width: int):
        s = self.spec
        features = einops.rearrange(x, "b (t m) d -> b t m d", m=m)[:, :t]
        head = dense(latent_width, ("embed", "mlp"), s.compute_dtype, s.weight_dtype, "prediction_head")
        predictions = head(features)
        return (nn.with_logical_constraint(features, ("batch", "snippets", "tokens", "embed")),
                predictions.astype(jnp.float32))
