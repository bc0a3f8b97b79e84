"""One training step: forward, loss, gradients, optimizer update."""

from __future__ import annotations

from collections.abc import Callable

import einops
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import linen as nn

from mirasol3b import losses
from mirasol3b.train.state import TrainState


def latent_loss_weight(loss_config: ml_collections.ConfigDict, step) -> jax.Array:
    """The latent loss's weight at `step`: `latent_loss_weight`, or, when `latent_loss_decay_steps`
    > 0, a cosine from it to 0 over that many steps (the text loss alone trains after them).

    Why decay: the latent loss is what gets the encoders going early on; left on, it can pull the
    video encoder towards predicting the next snippet and away from what answers need (a demo run
    with seed 1 at learning rate 3e-3 reached 47% with it constant, 92% with it decayed over 1500
    of 3000 steps; at 1e-3, configs/tiny.py's rate, none of five runs needed it).
    """
    weight = jnp.asarray(loss_config.latent_loss_weight, jnp.float32)
    decay_steps = loss_config.latent_loss_decay_steps
    if not decay_steps:
        return weight
    progress = jnp.minimum(jnp.asarray(step, jnp.float32) / decay_steps, 1.0)
    return weight * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))


def make_loss_fn(model: nn.Module, loss_config: ml_collections.ConfigDict) -> Callable:
    """`loss_fn(params, batch, rng, step=0, denominators=None) -> (loss, metrics)`; `step` sets the
    latent loss's weight; `denominators` (`losses.batch_denominators`) make it a microbatch's share."""
    def loss_fn(params, batch, rng, step=0, denominators=None):
        outputs = model.apply({"params": params}, batch, train=True, rngs={"dropout": rng})
        weight = latent_loss_weight(loss_config, step)
        loss, metrics = losses.compute_loss(outputs, batch, latent_loss_weight=weight,
                                            latent_loss_type=loss_config.latent_loss,
                                            latent_temperature=loss_config.latent_temperature,
                                            latent_negatives=loss_config.latent_negatives,
                                            normalize_latent_target=loss_config.normalize_latent_target,
                                            denominators=denominators)
        if loss_config.latent_loss_decay_steps:
            metrics["latent_loss_weight"] = weight  # logged, so a run shows where its schedule is
        return loss, metrics
    return loss_fn


def make_grad_fn(model: nn.Module, loss_config: ml_collections.ConfigDict, microbatches: int = 1) -> Callable:
    """`grad_fn(params, batch, rng, step) -> (metrics, grads)` of the whole batch's loss.

    With `microbatches` > 1 the batch runs as that many slices in a `lax.scan` that sums their
    gradients: activation memory of one slice, the same result as one pass up to float rounding,
    except that the contrastive latent loss (either `latent_negatives`) takes its negatives from
    the slice (batch_size / microbatches clips), not from the whole batch. Slice i holds
    examples i, i + microbatches, ...: on a batch sharded over its first axis each device keeps
    its own rows, so slicing moves no data.
    """
    value_and_grad = jax.value_and_grad(make_loss_fn(model, loss_config), has_aux=True)
    if microbatches == 1:
        def grad_fn(params, batch, rng, step):
            (_, metrics), grads = value_and_grad(params, batch, rng, step)
            return metrics, grads
        return grad_fn

    def split(x):
        x = einops.rearrange(x, "(b k) ... -> k b ...", k=microbatches)
        return nn.with_logical_constraint(x, (None, "batch") + (None,) * (x.ndim - 2))

    def grad_fn(params, batch, rng, step):
        denominators = losses.batch_denominators(batch)

        def one(carry, slice_and_index):
            micro, i = slice_and_index
            (_, metrics), grads = value_and_grad(params, micro, jax.random.fold_in(rng, i), step, denominators)
            return jax.tree.map(jnp.add, carry, (metrics, grads)), None

        slices = jax.tree.map(split, batch)
        first = jax.tree.map(lambda x: x[0], slices)
        (_, metrics), grads = jax.eval_shape(value_and_grad, params, first, rng, step, denominators)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (metrics, grads))
        (metrics, grads), _ = jax.lax.scan(one, zeros, (slices, jnp.arange(microbatches)))
        if "latent_loss_weight" in metrics:  # a setting, not a share: the sum counted it k times
            metrics["latent_loss_weight"] = latent_loss_weight(loss_config, step)
        return metrics, grads
    return grad_fn


def make_train_step(model: nn.Module, optimizer: optax.GradientTransformation,
                    loss_config: ml_collections.ConfigDict, microbatches: int = 1) -> Callable:
    """`train_step(state, batch, rng) -> (state, metrics)`; jit it with shardings and donation.
    `microbatches`: see `make_grad_fn`."""
    grad_fn = make_grad_fn(model, loss_config, microbatches)

    def train_step(state: TrainState, batch, rng):
        rng = jax.random.fold_in(rng, state.step)
        metrics, grads = grad_fn(state.params, batch, rng, state.step)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics["grad_norm"] = optax.tree.norm(grads)
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step
