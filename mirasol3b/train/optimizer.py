"""AdamW with linear warm-up and cosine decay, global-norm clipping, decay on kernels only."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax


SCHEDULE_FIELDS = ("learning_rate", "warmup_steps", "num_steps", "end_learning_rate_fraction")  # of config.train


def learning_rate_schedule(train: ml_collections.ConfigDict) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=train.learning_rate, warmup_steps=train.warmup_steps,
        decay_steps=train.num_steps, end_value=train.learning_rate * train.end_learning_rate_fraction)


def weight_decay_mask(params):
    """True for matrices that should decay: every `kernel`; not biases, norms, embeddings or positions."""
    def decays(path, _):
        return getattr(path[-1], "key", None) == "kernel"
    return jax.tree_util.tree_map_with_path(decays, params)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """`optax.clip_by_global_norm` (same result, same empty state) as one multiply by
    `min(1, max_norm / norm)`. Optax divides every gradient by the norm; XLA does not duplicate a
    division into the two Adam moments that read the clipped gradient, so each one was written
    out and read back: one more pass over every gradient and one more op per parameter."""
    def update(updates, state, params=None):
        del params
        scale = jnp.minimum(1.0, max_norm / optax.tree.norm(updates))
        return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates), state
    return optax.GradientTransformation(optax.init_empty_state, update)


def make_optimizer(train: ml_collections.ConfigDict) -> optax.GradientTransformation:
    parts = []
    if train.grad_clip_norm is not None:
        parts.append(clip_by_global_norm(train.grad_clip_norm))
    parts.append(optax.adamw(learning_rate_schedule(train), b1=train.adam_b1, b2=train.adam_b2,
                             weight_decay=train.weight_decay, mask=weight_decay_mask))
    return optax.chain(*parts)
