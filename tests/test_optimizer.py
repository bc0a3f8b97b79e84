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


def test_weight_decay_reaches_kernels_only():
    from flax import linen as nn

    from configs import tiny
    from mirasol3b.model import Mirasol3B
    from mirasol3b.train.optimizer import weight_decay_mask
    from mirasol3b.train.state import example_batch

    cfg = tiny.get_config()
    boxed = jax.eval_shape(Mirasol3B(cfg.model).init, jax.random.key(0), example_batch(cfg, 1))["params"]
    paths = {jax.tree_util.keystr(path): decays  # the train step's params: plain arrays
             for path, decays in jax.tree_util.tree_leaves_with_path(weight_decay_mask(nn.unbox(boxed)))}
    decayed = {p for p, d in paths.items() if d}
    assert decayed and all(p.endswith("['kernel']") for p in decayed)
    kept = set(paths) - decayed
    for kind in ("['scale']", "['bias']", "['embedding']"):  # norms, biases, the token table
        assert any(p.endswith(kind) for p in kept), kind
    assert not any(p.endswith("['kernel']") for p in kept)


def test_learning_rate_warms_up_linearly_then_decays_on_a_cosine_to_its_floor():
    import ml_collections

    from mirasol3b.train.optimizer import learning_rate_schedule

    train = ml_collections.ConfigDict(dict(learning_rate=1e-3, warmup_steps=10, num_steps=110,
                                           end_learning_rate_fraction=0.1))
    rate = lambda step: float(learning_rate_schedule(train)(step))  # noqa: E731
    assert rate(0) == 0.0
    assert rate(5) == pytest.approx(5e-4)
    assert rate(10) == pytest.approx(1e-3)
    assert rate(60) == pytest.approx(1e-4 + 0.9e-3 * 0.5)  # half way down the cosine
    assert rate(110) == pytest.approx(1e-4) and rate(500) == pytest.approx(1e-4)
