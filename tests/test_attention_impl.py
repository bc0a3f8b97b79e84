"""`model.attention_impl`: cuDNN's fused attention gives what the XLA einsums give.

The equivalence tests need an NVIDIA GPU and are skipped elsewhere (run them where one is:
`pytest tests/test_attention_impl.py`); the CPU checks that asking for cuDNN without one fails
clearly run everywhere.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from mirasol3b.layers import Attention, masks
from mirasol3b.layers.attention import resolve_implementation
from mirasol3b.model import Mirasol3B
from mirasol3b.train.batches import model_batch
from mirasol3b.train.random_batches import random_batch

ON_GPU = jax.default_backend() == "gpu"
needs_gpu = pytest.mark.skipif(not ON_GPU, reason="cuDNN attention needs an NVIDIA GPU")


def _attention(implementation, **kw):
    return Attention(num_heads=4, head_dim=64, implementation=implementation, dtype=jnp.bfloat16, **kw)


def _randn(seed, shape):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _outputs_and_grads(implementation, x, kv=None, mask=None, chunk=0, cross=False):
    module = _attention(implementation, chunk=chunk, cross=cross)
    params = _attention("xla", chunk=chunk, cross=cross).init(jax.random.key(0), x, kv, mask)

    def loss(p, x):
        y = module.apply(p, x, kv, mask)
        return jnp.mean(jnp.square(y.astype(jnp.float32))), y

    (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
    return y, grads


def _assert_close(a, b, tol):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        u, v = np.asarray(u, np.float32), np.asarray(v, np.float32)
        scale = np.abs(v).max() + 1e-6
        assert np.abs(u - v).max() <= tol * scale, (np.abs(u - v).max(), scale)


def test_auto_takes_cudnn_only_where_it_applies():
    bf16 = jnp.bfloat16
    assert resolve_implementation("auto", bf16, 0.0, 64, backend="gpu") == "cudnn"
    assert resolve_implementation("auto", jnp.float16, 0.0, 128, backend="gpu") == "cudnn"
    assert resolve_implementation("auto", jnp.float32, 0.0, 64, backend="gpu") == "xla"
    assert resolve_implementation("auto", bf16, 0.1, 64, backend="gpu") == "xla"  # no dropout in the kernel
    assert resolve_implementation("auto", bf16, 0.0, 256, backend="gpu") == "xla"
    assert resolve_implementation("auto", bf16, 0.0, 12, backend="gpu") == "xla"
    assert resolve_implementation("auto", bf16, 0.0, 64, backend="cpu") == "xla"
    assert resolve_implementation("auto", bf16, 0.0, 64, backend="tpu") == "xla"
    assert resolve_implementation("cudnn", jnp.float32, 0.0, 64, backend="cpu") == "cudnn"  # as asked


def test_cudnn_attention_off_gpu_names_the_fix():
    if ON_GPU:
        pytest.skip("this machine has a GPU")
    x = _randn(0, (1, 8, 32))
    params = _attention("xla").init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="attention_impl='xla'"):
        _attention("cudnn").apply(params, x)


@needs_gpu
@pytest.mark.parametrize("case", ["self_block_causal_padded", "self_unmasked", "cross_padded", "chunked"])
def test_cudnn_attention_matches_xla(case):
    """Outputs and gradients (params and input) in bf16, within bf16 rounding of each other."""
    x = _randn(1, (2, 96, 128))
    valid = jnp.array([[True] * 96, [True] * 80 + [False] * 16])
    kwargs = {
        "self_block_causal_padded": dict(mask=masks.combine(masks.block_causal(12, 8), masks.key_padding(valid))),
        "self_unmasked": dict(),
        "cross_padded": dict(kv=_randn(2, (2, 40, 96)), cross=True,
                             mask=masks.key_padding(jnp.arange(40)[None] < jnp.array([[40], [25]]))),
        "chunked": dict(chunk=32, mask=masks.combine(masks.chunked_sliding_block_causal(12, 8, 4),
                                                     masks.chunked_key_padding(valid, 32))),
    }[case]
    y_xla, g_xla = _outputs_and_grads("xla", x, **kwargs)
    y_cudnn, g_cudnn = _outputs_and_grads("cudnn", x, **kwargs)
    _assert_close(y_cudnn, y_xla, 2e-2)
    _assert_close(g_cudnn, g_xla, 3e-2)


@needs_gpu
def test_cudnn_model_loss_matches_xla():
    """The whole tiny model in bf16 (every stack: encoders, Combiner, block-causal time-aligned
    model, causal text decoder): same logits and latent predictions with either implementation."""
    cfg = tiny.get_config()
    with cfg.unlocked():
        cfg.model.dtype = "bfloat16"
    batch = jax.tree.map(jnp.asarray, model_batch(random_batch(cfg, np.random.default_rng(0), 2), cfg))
    params = Mirasol3B(cfg.model).init(jax.random.key(0), batch)
    outputs = {}
    for impl in ("xla", "cudnn", "auto"):
        with cfg.unlocked():
            cfg.model.attention_impl = impl
        outputs[impl] = jax.jit(Mirasol3B(cfg.model).apply)(params, batch)
    _assert_close(outputs["cudnn"], outputs["xla"], 3e-2)
    jax.tree.map(np.testing.assert_array_equal, outputs["auto"], outputs["cudnn"])  # bf16 on a GPU: cuDNN
