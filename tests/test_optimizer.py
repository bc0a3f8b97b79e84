"""The optimizer's own global-norm clipping against optax's."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import optax
import pytest

from mirasol3b.train.optimizer import clip_by_global_norm


@pytest.mark.parametrize("grad_scale", [0.0, 0.01, 1.0, 30.0])  # norms 0, 0.07 (under max_norm), 6.6, 198
def test_clip_by_global_norm_equals_optax(grad_scale):
    grads = {"kernel": grad_scale * jax.random.normal(jax.random.key(0), (8, 5)),
             "bias": grad_scale * jax.random.normal(jax.random.key(1), (5,))}
    ours, theirs = clip_by_global_norm(1.0), optax.clip_by_global_norm(1.0)
    assert jax.tree.structure(ours.init(grads)) == jax.tree.structure(theirs.init(grads))
    clipped, _ = ours.update(grads, ours.init(grads))
    expected, _ = theirs.update(grads, theirs.init(grads))
    chex.assert_trees_all_close(clipped, expected, rtol=1e-6, atol=0)
    norm = float(optax.tree.norm(clipped))
    assert norm == pytest.approx(min(float(optax.tree.norm(grads)), 1.0), rel=1e-6)
    if grad_scale < 1.0:  # under the limit: untouched, bit for bit
        chex.assert_trees_all_equal(clipped, grads)


def test_clip_by_global_norm_keeps_a_nan_gradient_visible():
    grads = {"kernel": jnp.array([1.0, jnp.nan])}
    clipped, _ = clip_by_global_norm(1.0).update(grads, optax.EmptyState())
    assert jnp.isnan(clipped["kernel"]).all()
