"""One training step: forward, loss, gradients, optimizer update."""

from __future__ import annotations

from collections.abc import Callable

import jax
import ml_collections
import optax
from flax import linen as nn

from mirasol3b import losses
from mirasol3b.train.state import TrainState


def make_loss_fn(model: nn.Module, loss_config: ml_collections.ConfigDict) -> Callable:
    """`loss_fn(params, batch, rng) -> (loss, metrics)`."""
    def loss_fn(params, batch, rng):
        outputs = model.apply({"params": params}, batch, train=True, rngs={"dropout": rng})
        return losses.compute_loss(outputs, batch, latent_loss_weight=loss_config.latent_loss_weight,
                                   latent_loss_type=loss_config.latent_loss,
                                   latent_temperature=loss_config.latent_temperature,
                                   latent_negatives=loss_config.latent_negatives,
                                   normalize_latent_target=loss_config.normalize_latent_target)
    return loss_fn


def make_train_step(model: nn.Module, optimizer: optax.GradientTransformation,
                    loss_config: ml_collections.ConfigDict) -> Callable:
    """`train_step(state, batch, rng) -> (state, metrics)`; jit it with shardings and donation."""
    loss_fn = make_loss_fn(model, loss_config)

    def train_step(state: TrainState, batch, rng):
        rng = jax.random.fold_in(rng, state.step)
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, rng)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics["grad_norm"] = optax.tree.norm(grads)
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step
