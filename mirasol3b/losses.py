"""The training objective: text LM loss + latent_loss_weight x next-snippet latent loss.

Two latent losses (`config.loss.latent_loss`):
- "contrastive" (default): InfoNCE. The prediction for snippet t+1 must pick that snippet's true
  latents out of those of every other example in the batch at the same snippet (cosine similarity
  / temperature). Both sides get gradients, as in CPC. It cannot be lowered by making the latents
  independent of the media, which is what the regression target does in practice: trained with
  "mse", the tiny model's Combiner outputs became the same for every clip (std across clips
  0.002 vs 1.05 overall) and answers stopped depending on the media.
- "mse": regression onto the stop-gradient, per-token standardised next latents.
"""

from __future__ import annotations

import einops
import jax
import jax.numpy as jnp
import optax


def text_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> tuple[jax.Array, dict]:
    """Weighted mean cross-entropy over scored tokens; `logits [b, l, v]`, `targets/weights [b, l]`."""
    weights = weights.astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    denom = jnp.maximum(weights.sum(), 1.0)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return (ce * weights).sum() / denom, {
        "token_accuracy": (correct * weights).sum() / denom,
        "scored_tokens": weights.sum(),
    }


def latent_loss(latents: jax.Array, predictions: jax.Array, media_mask: jax.Array, *,
                normalize_target: bool = True) -> jax.Array:
    """Mean squared error of `predictions[:, t]` against `stop_gradient(latents[:, t + 1])`.

    Counted only where both snippet t and t+1 hold real media. With `normalize_target` the target
    is standardised per token (no parameters), so the Combiner cannot lower the loss by shrinking
    its outputs towards a constant.
    """
    target = jax.lax.stop_gradient(latents[:, 1:].astype(jnp.float32))
    if normalize_target:
        mean = target.mean(-1, keepdims=True)
        var = target.var(-1, keepdims=True)
        target = (target - mean) * jax.lax.rsqrt(var + 1e-6)
    err = jnp.mean(jnp.square(predictions[:, :-1].astype(jnp.float32) - target), axis=(-2, -1))  # [b, t-1]
    valid = jnp.logical_and(media_mask[:, :-1], media_mask[:, 1:]).astype(jnp.float32)
    return (err * valid).sum() / jnp.maximum(valid.sum(), 1.0)


def contrastive_latent_loss(latents: jax.Array, predictions: jax.Array, media_mask: jax.Array, *,
                            temperature: float = 0.1, negatives: str = "examples") -> jax.Array:
    """InfoNCE of `predictions[b, t, j]` against `latents[b, t + 1, j]`, per token slot j.

    `negatives`: "examples" = the other examples' latents at the same snippet; "snippets" = also
    every other snippet of every example, the clip's own included. With "examples", anything
    constant over a clip (a background, a voice) identifies the next latent, and the encoders can
    settle on it; with "snippets" the prediction must also tell snippet t+1 from the clip's other
    snippets, so what changes over time counts. It costs (batch * snippets)^2 similarities per slot.
    Pairs (t, t+1) without real media on both sides are neither scored nor used as negatives.
    Shapes: `[batch, snippets, m, width]`, mask `[batch, snippets]`.
    """
    if negatives not in LATENT_NEGATIVES:
        raise ValueError(f"negatives must be one of {LATENT_NEGATIVES}, got {negatives!r}")
    unit = lambda x: x * jax.lax.rsqrt(jnp.sum(jnp.square(x), -1, keepdims=True) + 1e-6)  # noqa: E731
    target = unit(latents[:, 1:].astype(jnp.float32))
    pred = unit(predictions[:, :-1].astype(jnp.float32))
    valid = jnp.logical_and(media_mask[:, :-1], media_mask[:, 1:])  # [b, t-1]
    # Candidates per group: [group, m, candidates, width], each prediction's positive on the diagonal.
    if negatives == "examples":
        grouped = lambda x: einops.rearrange(x, "b t j d -> t j b d")  # noqa: E731
        valid = einops.rearrange(valid, "b t -> t 1 b")
    else:
        grouped = lambda x: einops.rearrange(x, "b t j d -> 1 j (b t) d")  # noqa: E731
        valid = einops.rearrange(valid, "b t -> 1 1 (b t)")
    logits = jnp.einsum("gjnd,gjkd->gjnk", grouped(pred), grouped(target)) / temperature
    logits = jnp.where(valid[..., None, :], logits, jnp.finfo(jnp.float32).min)
    nll = -jnp.diagonal(jax.nn.log_softmax(logits, axis=-1), axis1=-2, axis2=-1)  # [group, m, n]
    weight = jnp.broadcast_to(valid, nll.shape).astype(jnp.float32)
    return (nll * weight).sum() / jnp.maximum(weight.sum(), 1.0)


LATENT_LOSSES = ("contrastive", "mse")
LATENT_NEGATIVES = ("examples", "snippets")


def compute_loss(outputs: dict[str, jax.Array], batch: dict[str, jax.Array], *, latent_loss_weight: float,
                 latent_loss_type: str = "contrastive", latent_temperature: float = 0.1,
                 latent_negatives: str = "examples",
                 normalize_latent_target: bool = True) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Scalar loss and metrics (`loss`, `text_loss`, `latent_loss`, `token_accuracy`, `scored_tokens`)."""
    t_loss, metrics = text_loss(outputs["logits"], batch["text_targets"], batch["text_loss_weights"])
    if latent_loss_type == "contrastive":
        l_loss = contrastive_latent_loss(outputs["latents"], outputs["predictions"], batch["media_mask"],
                                         temperature=latent_temperature, negatives=latent_negatives)
    elif latent_loss_type == "mse":
        l_loss = latent_loss(outputs["latents"], outputs["predictions"], batch["media_mask"],
                             normalize_target=normalize_latent_target)
    else:
        raise ValueError(f"latent_loss_type must be one of {LATENT_LOSSES}, got {latent_loss_type!r}")
    loss = t_loss + latent_loss_weight * l_loss
    return loss, {"loss": loss, "text_loss": t_loss, "latent_loss": l_loss, **metrics}
