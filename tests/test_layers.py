"""Behaviour of the shared building blocks: masks, attention, the transformer stack, param metadata."""

from __future__ import annotations

import chex
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from configs import tiny
from mirasol3b import sharding
from mirasol3b.layers import Attention, TransformerSpec, TransformerStack, masks, projection
from mirasol3b.model import Mirasol3B, samples_per_snippet

T_, F_ = True, False


# ---- masks ------------------------------------------------------------------------------------

def test_causal_mask():
    expected = np.array([[T_, F_, F_, F_],
                         [T_, T_, F_, F_],
                         [T_, T_, T_, F_],
                         [T_, T_, T_, T_]])
    m = masks.causal(4)
    chex.assert_shape(m, (1, 1, 4, 4))
    assert m.dtype == jnp.bool_
    np.testing.assert_array_equal(m[0, 0], expected)


def test_block_causal_mask():
    # 3 snippets of 2 tokens: a token sees every token of its own and earlier snippets.
    expected = np.array([[T_, T_, F_, F_, F_, F_],
                         [T_, T_, F_, F_, F_, F_],
                         [T_, T_, T_, T_, F_, F_],
                         [T_, T_, T_, T_, F_, F_],
                         [T_, T_, T_, T_, T_, T_],
                         [T_, T_, T_, T_, T_, T_]])
    m = masks.block_causal(3, 2)
    chex.assert_shape(m, (1, 1, 6, 6))
    np.testing.assert_array_equal(m[0, 0], expected)
    # Block size 1 is the plain causal mask.
    np.testing.assert_array_equal(masks.block_causal(5, 1), masks.causal(5))


def test_segment_readout_mask():
    # Segments of 2 and 1 tokens, then 3 readers: reader j reads segment j % 2 and every reader.
    expected = np.array([[T_, T_, T_, T_, T_, T_],
                         [T_, T_, T_, T_, T_, T_],
                         [T_, T_, T_, T_, T_, T_],
                         [T_, T_, F_, T_, T_, T_],
                         [F_, F_, T_, T_, T_, T_],
                         [T_, T_, F_, T_, T_, T_]])
    m = masks.segment_readout((2, 1), 3)
    chex.assert_shape(m, (1, 1, 6, 6))
    np.testing.assert_array_equal(m[0, 0], expected)


def test_key_padding_mask():
    valid = jnp.array([[1, 1, 0], [1, 0, 0]])
    m = masks.key_padding(valid)
    chex.assert_shape(m, (2, 1, 1, 3))
    assert m.dtype == jnp.bool_
    np.testing.assert_array_equal(m[:, 0, 0], [[T_, T_, F_], [T_, F_, F_]])


def test_cached_causal_mask():
    positions = jnp.array([[2, 3], [0, 1]])
    key_valid = jnp.array([[T_, T_, T_, T_], [F_, T_, T_, T_]])
    m = masks.cached_causal(positions, 4, key_valid)
    chex.assert_shape(m, (2, 1, 2, 4))
    np.testing.assert_array_equal(m[:, 0], [
        [[T_, T_, T_, F_], [T_, T_, T_, T_]],
        [[F_, F_, F_, F_], [F_, T_, F_, F_]],
    ])
    no_padding = masks.cached_causal(positions, 4)
    np.testing.assert_array_equal(no_padding[1, 0], [[T_, F_, F_, F_], [T_, T_, F_, F_]])


def test_combine_masks():
    assert masks.combine(None, None) is None
    c = masks.causal(3)
    assert masks.combine(None, c) is c
    both = masks.combine(c, masks.key_padding(jnp.array([[1, 0, 1]])))
    np.testing.assert_array_equal(both[0, 0], [[T_, F_, F_], [T_, F_, F_], [T_, F_, T_]])


# ---- attention --------------------------------------------------------------------------------

def _attention(dtype=jnp.float32, cross=False, chunk=0):
    return Attention(num_heads=2, head_dim=8, cross=cross, chunk=chunk, dtype=dtype)


def _randn(seed, shape, scale=1.0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale, jnp.float32)


def _init(module, *args, seed=0, scale=0.2, **kwargs):
    """Random params in `module.init`'s layout without compiling init (slow on CPU): the boxed
    abstract tree from `eval_shape`, each leaf filled from numpy."""
    boxed = jax.eval_shape(module.init, jax.random.key(0), *args, **kwargs)
    rng = np.random.default_rng(seed)
    fill = lambda a: jnp.asarray(rng.normal(size=a.shape) * scale, a.dtype)  # noqa: E731
    return boxed, jax.tree.map(fill, nn.unbox(boxed))


def test_self_attention_masked_key_has_no_effect():
    attn = _attention()
    x = _randn(0, (2, 5, 16))
    mask = masks.causal(5)
    _, params = _init(attn, x, mask=mask)
    apply = jax.jit(lambda x: attn.apply(params, x, mask=mask))
    out = apply(x)
    chex.assert_shape(out, (2, 5, 16))
    x2 = x.at[:, 4].add(3.0)  # the last token: masked for every earlier query
    out2 = apply(x2)
    np.testing.assert_allclose(out2[:, :4], out[:, :4], rtol=0, atol=1e-6)
    assert np.abs(out2[:, 4] - out[:, 4]).max() > 1e-2  # the token itself does change


def test_sliding_block_causal_masks_dense_and_chunked_agree():
    dense = masks.sliding_block_causal(6, 2, 2)[0, 0]
    # Block 3 (tokens 6, 7) sees blocks 2 and 3 only.
    np.testing.assert_array_equal(dense[6], [F_] * 4 + [T_] * 4 + [F_] * 4)
    np.testing.assert_array_equal(masks.sliding_block_causal(6, 2, 6), masks.block_causal(6, 2))
    chunked = masks.chunked_sliding_block_causal(6, 2, 2)
    chex.assert_shape(chunked, (1, 3, 1, 4, 8))
    for c in range(3):  # chunk c holds tokens 4c..4c+3; its keys are tokens 4c-4..4c+3
        keys = np.arange(4 * c - 4, 4 * c + 4)
        expected = np.where(keys[None] >= 0, dense[4 * c:4 * c + 4][:, np.clip(keys, 0, None)], False)
        np.testing.assert_array_equal(chunked[0, c, 0], expected)
    with pytest.raises(ValueError, match="multiple of window"):
        masks.chunked_sliding_block_causal(5, 2, 2)


def test_chunked_attention_equals_dense_attention_with_the_same_mask():
    """Chunks of 4 tokens against their own and the previous chunk: the same outputs as dense
    attention under the equivalent mask, key padding included."""
    x = _randn(0, (2, 12, 16))
    valid = jnp.array([[True] * 12, [True] * 9 + [False] * 3])
    dense_mask = masks.combine(masks.sliding_block_causal(6, 2, 2), masks.key_padding(valid))
    chunked_mask = masks.combine(masks.chunked_sliding_block_causal(6, 2, 2), masks.chunked_key_padding(valid, 4))
    _, params = _init(_attention(), x, mask=dense_mask)
    dense = _attention().apply(params, x, mask=dense_mask)
    chunked = _attention(chunk=4).apply(params, x, mask=chunked_mask)
    np.testing.assert_allclose(chunked, dense, rtol=1e-5, atol=1e-6)


def test_cross_attention_other_width_and_padded_keys():
    attn = _attention(cross=True)
    x = _randn(1, (2, 3, 16))
    kv = _randn(2, (2, 6, 24))  # another width than the queries
    kv_mask = masks.key_padding(jnp.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 1, 1]]))
    _, params = _init(attn, x, kv, kv_mask)
    chex.assert_shape(params["params"]["key"]["kernel"], (24, 2, 8))
    chex.assert_shape(params["params"]["query"]["kernel"], (16, 2, 8))
    chex.assert_shape(params["params"]["out"]["kernel"], (2, 8, 16))
    apply = jax.jit(lambda kv: attn.apply(params, x, kv, kv_mask))
    out = apply(kv)
    chex.assert_shape(out, (2, 3, 16))
    # Perturbing padded keys (batch 0: keys 4, 5; batch 1: key 3) changes nothing.
    padded = kv.at[0, 4:].add(5.0).at[1, 3].add(5.0)
    np.testing.assert_allclose(apply(padded), out, rtol=0, atol=1e-6)
    # Perturbing a valid key does.
    assert np.abs(apply(kv.at[0, 0].add(5.0))[0] - out[0]).max() > 1e-2


def _primitive_names(jaxpr) -> set[str]:
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            names |= _primitive_names(sub)
    return names


def _primitive_input_dtypes(jaxpr, name):
    """dtypes of the inputs of every `name` primitive in a (closed) jaxpr, sub-jaxprs included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == name:
            found.extend(v.aval.dtype for v in eqn.invars)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found.extend(_primitive_input_dtypes(sub, name))
    return found


def test_bf16_attention_has_float32_softmax():
    x = _randn(3, (2, 4, 16), scale=30.0)  # large activations -> logits in the thousands
    mask = jnp.ones((2, 1, 4, 4), bool).at[0, 0, 1, :].set(False)  # one fully masked query row
    f32, bf16 = _attention(jnp.float32), _attention(jnp.bfloat16)
    _, params = _init(f32, x, mask=mask)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))

    fn = lambda x: bf16.apply(params, x, mask=mask)  # noqa: E731
    exp_dtypes = _primitive_input_dtypes(jax.make_jaxpr(fn)(x).jaxpr, "exp")
    assert exp_dtypes and all(d == jnp.float32 for d in exp_dtypes), exp_dtypes

    out = jax.jit(fn)(x)
    assert out.dtype == jnp.bfloat16
    assert bool(jnp.isfinite(out.astype(jnp.float32)).all())
    ref = jax.jit(lambda x: f32.apply(params, x, mask=mask))(x)
    err = np.abs(np.asarray(out, np.float32) - np.asarray(ref))
    assert err.max() <= 0.05 * np.abs(np.asarray(ref)).max(), err.max()


# ---- transformer stack ------------------------------------------------------------------------

_SPEC = TransformerSpec(width=16, depth=2, num_heads=2, mlp_dim=32)


def _stack_inputs():
    x = _randn(4, (2, 5, 16))
    kv = _randn(5, (2, 3, 8))
    return x, masks.causal(5), kv, masks.key_padding(jnp.array([[1, 1, 0], [1, 1, 1]]))


def test_scanned_stack_equals_unrolled_stack():
    x, mask, kv, kv_mask = _stack_inputs()
    unrolled = TransformerStack(_SPEC.replace(scan_layers=False), cross_attention=True)
    scanned = TransformerStack(_SPEC, cross_attention=True)
    p_unrolled = _init(unrolled, x, mask, kv, kv_mask, seed=1)[1]["params"]
    abstract_scanned = nn.unbox(jax.eval_shape(scanned.init, jax.random.key(1), x, mask, kv, kv_mask))["params"]

    layers = [p_unrolled[f"layers_{i}"] for i in range(_SPEC.depth)]
    p_scanned = {"layers": jax.tree.map(lambda *a: jnp.stack(a), *layers), "final_norm": p_unrolled["final_norm"]}
    # Same tree, same shapes, same parameter count as the scanned layout.
    chex.assert_trees_all_equal_shapes_and_dtypes(p_scanned, abstract_scanned)
    count = lambda t: sum(int(np.prod(a.shape)) for a in jax.tree.leaves(t))  # noqa: E731
    assert count(p_unrolled) == count(abstract_scanned)

    out_unrolled = jax.jit(lambda p: unrolled.apply({"params": p}, x, mask, kv, kv_mask))(p_unrolled)
    out_scanned = jax.jit(lambda p: scanned.apply({"params": p}, x, mask, kv, kv_mask))(p_scanned)
    np.testing.assert_allclose(out_scanned, out_unrolled, rtol=1e-5, atol=1e-5)


def test_keep_last_computes_exactly_the_full_stacks_last_tokens():
    """The Combiner's stack: its last layer computes only the kept tokens, which still attend to all."""
    x, mask, kv, kv_mask = _stack_inputs()
    mask = jnp.broadcast_to(mask, (2, 1, 5, 5)).at[1, 0, 4, 0].set(False)  # a row that differs per example
    keep = 2
    full = TransformerStack(_SPEC.replace(scan_layers=False), cross_attention=True)
    kept = TransformerStack(_SPEC.replace(scan_layers=False), cross_attention=True, keep_last=keep)
    params = _init(full, x, mask, kv, kv_mask, seed=3)[1]["params"]
    chex.assert_trees_all_equal_shapes_and_dtypes(
        params, nn.unbox(jax.eval_shape(kept.init, jax.random.key(3), x, mask, kv, kv_mask))["params"])

    def loss(module, p, x):  # a loss on the kept tokens, so the gradients must agree too
        out = module.apply({"params": p}, x, mask, kv, kv_mask)
        return jnp.sum(jnp.square(out[:, -keep:])), out
    grad = lambda module: jax.jit(jax.value_and_grad(  # noqa: E731
        lambda p, x: loss(module, p, x), (0, 1), has_aux=True))(params, x)
    (l_full, out_full), g_full = grad(full)
    (l_kept, out_kept), g_kept = grad(kept)
    chex.assert_shape(out_kept, (2, keep, 16))
    np.testing.assert_allclose(out_kept, out_full[:, -keep:], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(l_kept, l_full, rtol=1e-5)
    chex.assert_trees_all_close(g_kept, g_full, rtol=1e-4, atol=1e-6)
    assert float(jnp.abs(g_full[1][:, 0]).max()) > 0  # a dropped token still feeds the kept ones

    # Scanned, the last layer runs apart from the scan: `layers` holds depth - 1 of them.
    scanned = TransformerStack(_SPEC, cross_attention=True, keep_last=keep)
    first = [params[f"layers_{i}"] for i in range(_SPEC.depth - 1)]
    p_scanned = {"layers": jax.tree.map(lambda *a: jnp.stack(a), *first),
                 "last_layer": params[f"layers_{_SPEC.depth - 1}"], "final_norm": params["final_norm"]}
    chex.assert_trees_all_equal_shapes_and_dtypes(
        p_scanned, nn.unbox(jax.eval_shape(scanned.init, jax.random.key(3), x, mask, kv, kv_mask))["params"])
    out_scanned = jax.jit(lambda p: scanned.apply({"params": p}, x, mask, kv, kv_mask))(p_scanned)
    np.testing.assert_allclose(out_scanned, out_kept, rtol=1e-5, atol=1e-6)

    with pytest.raises(ValueError, match="keep_last"):
        kept.apply({"params": params}, x, mask, kv, kv_mask, decode=True)


def test_remat_policy_does_not_change_outputs_or_gradients():
    x, mask, kv, kv_mask = _stack_inputs()
    plain = TransformerStack(_SPEC, cross_attention=True)
    remat = TransformerStack(_SPEC.replace(remat_policy="nothing_saveable"), cross_attention=True)
    params = _init(plain, x, mask, kv, kv_mask, seed=2)[1]["params"]
    abstract_remat = nn.unbox(jax.eval_shape(remat.init, jax.random.key(2), x, mask, kv, kv_mask))["params"]
    chex.assert_trees_all_equal_shapes_and_dtypes(params, abstract_remat)

    def value_and_grads(module):
        def f(p, x, kv):
            return jnp.sum(jnp.square(module.apply({"params": p}, x, mask, kv, kv_mask)))
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(params, x, kv)

    forward = lambda module: jax.make_jaxpr(module.apply)({"params": params}, x, mask, kv, kv_mask).jaxpr  # noqa: E731
    remat_primitives = {"checkpoint", "remat", "remat2"}  # jax.checkpoint's name varies by version
    assert remat_primitives & _primitive_names(forward(remat))
    assert not remat_primitives & _primitive_names(forward(plain))

    v_plain, g_plain = value_and_grads(plain)
    v_remat, g_remat = value_and_grads(remat)
    np.testing.assert_allclose(v_remat, v_plain, rtol=1e-6)
    chex.assert_trees_all_close(g_remat, g_plain, rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(g_plain[1]).max()) > 0  # the gradients are not trivially zero


# ---- logical axis names on every parameter ----------------------------------------------------

@pytest.mark.parametrize("variant", [None, "ttm"])
def test_every_parameter_has_logical_axis_names(variant):
    cfg = tiny.get_config(variant).model
    with cfg.unlocked():
        cfg.scan_layers = True  # and the scanned layout's leading 'layers' axis has a rule too
    t = 2
    batch = {
        "video": jax.ShapeDtypeStruct((2, t * cfg.video.snippet_frames, cfg.video.image_size,
                                       cfg.video.image_size, 3), jnp.uint8),
        "audio": jax.ShapeDtypeStruct((2, t * samples_per_snippet(cfg)), jnp.float32),
        "media_mask": jax.ShapeDtypeStruct((2, t), jnp.bool_),
        "text_inputs": jax.ShapeDtypeStruct((2, 8), jnp.int32),
    }
    boxed = jax.eval_shape(Mirasol3B(cfg).init, jax.random.key(0), batch)["params"]
    known = {name for name, _ in sharding.LOGICAL_AXIS_RULES}
    leaves = jax.tree_util.tree_leaves_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert len(leaves) > 20
    for path, leaf in leaves:
        where = jax.tree_util.keystr(path)
        assert isinstance(leaf, nn.LogicallyPartitioned), f"{where} has no logical axis names"
        assert len(leaf.names) == leaf.value.ndim, f"{where}: names {leaf.names} for shape {leaf.value.shape}"
        unknown = [n for n in leaf.names if n not in known]
        assert not unknown, f"{where}: axis names {unknown} have no rule in sharding.LOGICAL_AXIS_RULES"
    # Scanned stacks put their layers on a leading 'layers' axis.
    assert any(leaf.names[0] == "layers" for _, leaf in leaves)


@pytest.mark.parametrize("x_shape,kernel_shape,num_input_axes",
                         [((2, 3, 8), (8, 4, 5), 1),       # heads projection
                          ((2, 3, 4, 5), (4, 5, 8), 2),    # output projection
                          ((8,), (8, 6), 1)])              # no leading axes
def test_matmul_equals_the_nd_contraction_in_value_and_gradients(x_shape, kernel_shape, num_input_axes):
    x = jax.random.normal(jax.random.key(0), x_shape)
    kernel = jax.random.normal(jax.random.key(1), kernel_shape)
    n = num_input_axes
    dims = ((tuple(range(len(x_shape) - n, len(x_shape))), tuple(range(n))), ((), ()))

    def loss(contract):
        return lambda x, k: jnp.sum(jnp.sin(contract(x, k)))

    ours = jax.value_and_grad(loss(lambda x, k: projection.matmul(x, k, n)), argnums=(0, 1))(x, kernel)
    reference = jax.value_and_grad(loss(lambda x, k: jax.lax.dot_general(x, k, dims)), argnums=(0, 1))(x, kernel)
    chex.assert_trees_all_close(ours, reference, rtol=1e-5, atol=1e-5)
    chex.assert_shape(projection.matmul(x, kernel, n), x_shape[:len(x_shape) - n] + kernel_shape[n:])
    with pytest.raises(ValueError, match="cannot contract"):
        projection.matmul(x, jnp.zeros((3,) + kernel_shape[1:]), n)


def test_dense_has_nn_denses_parameters_and_outputs():
    x = jax.random.normal(jax.random.key(0), (2, 3, 8))
    ours, flax_dense = projection.Dense(5, name="wi"), nn.Dense(5, name="wi")
    params = flax_dense.init(jax.random.key(1), x)
    chex.assert_trees_all_equal_shapes(ours.init(jax.random.key(1), x), params)
    chex.assert_trees_all_close(ours.apply(params, x), flax_dense.apply(params, x), rtol=1e-5, atol=1e-5)
