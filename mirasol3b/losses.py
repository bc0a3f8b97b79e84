"""The training objective: text LM loss + latent_loss_weight x next-snippet latent loss."""

from __future__ import annotations

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


def compute_loss(outputs: dict[str, jax.Array], batch: dict[str, jax.Array], *, latent_loss_weight: float,
                 normalize_latent_target: bool = True) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Scalar loss and metrics (`loss`, `text_loss`, `latent_loss`, `token_accuracy`, `scored_tokens`)."""
    t_loss, metrics = text_loss(outputs["logits"], batch["text_targets"], batch["text_loss_weights"])
    l_loss = latent_loss(outputs["latents"], outputs["predictions"], batch["media_mask"],
                         normalize_target=normalize_latent_target)
    loss = t_loss + latent_loss_weight * l_loss
    return loss, {"loss": loss, "text_loss": t_loss, "latent_loss": l_loss, **metrics}
