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


def _count(weights: jax.Array) -> jax.Array:
    """What a mean over `weights` divides by: their sum, at least 1 (an all-padding batch scores 0)."""
    return jnp.maximum(jnp.sum(weights, dtype=jnp.float32), 1.0)


def text_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array,
              denominator: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """Weighted mean cross-entropy over scored tokens; `logits [b, l, v]`, `targets/weights [b, l]`.

    `denominator` (default: these scored tokens) divides the sums instead: a microbatch divides by
    its whole batch's count (`batch_denominators`), so microbatch losses add up to the batch's.
    """
    weights = weights.astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    denom = _count(weights) if denominator is None else denominator
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return (ce * weights).sum() / denom, {
        "token_accuracy": (correct * weights).sum() / denom,
        "scored_tokens": weights.sum(),
    }


def scored_pairs(media_mask: jax.Array) -> jax.Array:
    """`[batch, snippets-1]`: whether the pair (t, t+1) has real media on both sides (a latent loss term)."""
    return jnp.logical_and(media_mask[:, :-1], media_mask[:, 1:])


def batch_denominators(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """What the losses divide by over the whole `batch`: scored text tokens and scored snippet pairs."""
    return {"text": _count(batch["text_loss_weights"]), "latent": _count(scored_pairs(batch["media_mask"]))}


def latent_loss(latents: jax.Array, predictions: jax.Array, media_mask: jax.Array, *,
                normalize_target: bool = True, denominator: jax.Array | None = None) -> jax.Array:
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
    valid = scored_pairs(media_mask).astype(jnp.float32)
    return (err * valid).sum() / (_count(valid) if denominator is None else denominator)


def contrastive_latent_loss(latents: jax.Array, predictions: jax.Array, media_mask: jax.Array, *,
                            temperature: float = 0.1, negatives: str = "examples",
                            denominator: jax.Array | None = None) -> jax.Array:
    """InfoNCE of `predictions[b, t, j]` against `latents[b, t + 1, j]`, per token slot j.

    `negatives`: "examples" = the other examples' latents at the same snippet; "snippets" = also
    every other snippet of every example, the clip's own included. With "examples", anything
    constant over a clip (a background, a voice) identifies the next latent, and the encoders can
    settle on it; with "snippets" the prediction must also tell snippet t+1 from the clip's other
    snippets, so what changes over time counts. It costs (batch * snippets)^2 similarities per slot.
    Pairs (t, t+1) without real media on both sides are neither scored nor used as negatives.
    Shapes: `[batch, snippets, m, width]`, mask `[batch, snippets]`. `denominator`: as `latent_loss`'s
    (scored pairs); the mean is over pairs and slots.
    """
    if negatives not in LATENT_NEGATIVES:
        raise ValueError(f"negatives must be one of {LATENT_NEGATIVES}, got {negatives!r}")
    unit = lambda x: x * jax.lax.rsqrt(jnp.sum(jnp.square(x), -1, keepdims=True) + 1e-6)  # noqa: E731
    target = unit(latents[:, 1:].astype(jnp.float32))
    pred = unit(predictions[:, :-1].astype(jnp.float32))
    valid = scored_pairs(media_mask)  # [b, t-1]
    pairs = _count(valid) if denominator is None else denominator
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
    return (nll * weight).sum() / (nll.shape[1] * pairs)


LATENT_LOSSES = ("contrastive", "mse")
LATENT_NEGATIVES = ("examples", "snippets")


def compute_loss(outputs: dict[str, jax.Array], batch: dict[str, jax.Array], *, latent_loss_weight: float,
                 latent_loss_type: str = "contrastive", latent_temperature: float = 0.1,
                 latent_negatives: str = "examples",
                 normalize_latent_target: bool = True,
                 denominators: dict[str, jax.Array] | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Scalar loss and metrics (`loss`, `text_loss`, `latent_loss`, `token_accuracy`, `scored_tokens`).

    `denominators`: `batch_denominators` of the whole batch when `batch` is one of its microbatches;
    every loss and metric is then this microbatch's share, and the shares sum to the batch's values.
    """
    denominators = denominators or batch_denominators(batch)
    t_loss, metrics = text_loss(outputs["logits"], batch["text_targets"], batch["text_loss_weights"],
                                denominators["text"])
    if latent_loss_type == "contrastive":
        l_loss = contrastive_latent_loss(outputs["latents"], outputs["predictions"], batch["media_mask"],
                                         temperature=latent_temperature, negatives=latent_negatives,
                                         denominator=denominators["latent"])
    elif latent_loss_type == "mse":
        l_loss = latent_loss(outputs["latents"], outputs["predictions"], batch["media_mask"],
                             normalize_target=normalize_latent_target, denominator=denominators["latent"])
    else:
        raise ValueError(f"latent_loss_type must be one of {LATENT_LOSSES}, got {latent_loss_type!r}")
    loss = t_loss + latent_loss_weight * l_loss
    return loss, {"loss": loss, "text_loss": t_loss, "latent_loss": l_loss, **metrics}
