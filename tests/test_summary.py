"""Tests for mirasol3b.summary and the paper-sized configs (eval_shape and lowering only)."""

from __future__ import annotations

import copy
import functools
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import linen as nn

from configs import long_video, mirasol3b, tiny
from mirasol3b import configlib, summary
from mirasol3b.model import Mirasol3B

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _abstract_params(config, batch):
    model = Mirasol3B(config.model)
    init = functools.partial(model.init, train=False)
    return model, nn.unbox(jax.eval_shape(init, {"params": jax.random.key(0)}, batch)["params"])


def _tree(params) -> dict[str, tuple]:
    """'a/b/c' -> (shape, dtype) of every leaf."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {jax.tree_util.keystr(path, simple=True, separator="/"): (leaf.shape, leaf.dtype) for path, leaf in flat}


def _abstract_tree(config) -> dict[str, tuple]:
    return _tree(_abstract_params(config, summary.example_batch(config, 1))[1])


@pytest.mark.parametrize("variant", ["", "ttm"])
def test_long_video_has_the_paper_models_parameters(variant):
    short, long = mirasol3b.get_config(variant), long_video.get_config(variant)
    assert long.data.num_frames == 4 * short.data.num_frames
    assert _abstract_tree(long) == _abstract_tree(short)


@pytest.mark.parametrize("variant", ["", "ttm"])
def test_paper_config_is_about_3b_with_half_in_audio_video(variant):
    config = mirasol3b.get_config(variant)
    counts = summary.summarize(config, flops=False)
    assert 2.7e9 <= counts["total"] <= 3.3e9
    assert sum(counts[c] for c in summary.COMPONENTS) == counts["total"]
    assert counts["total"] == sum(int(np.prod(s)) for s, _ in _abstract_tree(config).values())
    assert 0.45 <= counts["audio_video_fraction"] <= 0.65
    assert counts["sequence"]["snippets"] == 8 and counts["sequence"]["video_tokens"] == 784


def _unstack_layers(tree):
    """A scanned params tree in the unrolled layout: `layers` [depth, ...] -> `layers_0`, ..."""
    if not isinstance(tree, dict):
        return tree
    out = {}
    for key, value in tree.items():
        if key == "layers":
            depth = jax.tree.leaves(value)[0].shape[0]
            out.update({f"layers_{i}": jax.tree.map(lambda x, i=i: x[i], value) for i in range(depth)})
        else:
            out[key] = _unstack_layers(value)
    return out


def test_ttm_unrolled_matches_scanned():
    scanned = tiny.get_config("ttm")
    unrolled = copy.deepcopy(scanned)
    unrolled.model.scan_layers = False
    batch = summary.example_batch(scanned, 2, abstract=False)
    rng = np.random.default_rng(0)
    batch["video"] = rng.integers(0, 256, batch["video"].shape, dtype=np.uint8)
    batch["audio"] = rng.normal(0, 0.1, batch["audio"].shape).astype(np.float32)
    batch["media_mask"][:] = True
    batch["media_mask"][1, 1] = False  # a padded snippet leaves the memory as it was, in both paths
    batch["text_inputs"] = rng.integers(0, scanned.model.vocab_size, batch["text_inputs"].shape, dtype=np.int32)

    scanned_model, abstract = _abstract_params(scanned, batch)
    unrolled_model, unrolled_abstract = _abstract_params(unrolled, batch)
    # Random values stand in for init (whose compile would dominate this test's runtime).
    scanned_params = jax.tree.map(lambda x: rng.normal(0, 0.2, x.shape).astype(x.dtype), abstract)
    params = _unstack_layers(scanned_params)
    # TTM's step params are shared, not stacked per snippet, in both paths.
    assert "step" in params["combiner"] and "layers_0" in params["combiner"]["step"]["process"]
    assert _tree(params) == _tree(unrolled_abstract)

    want = jax.jit(scanned_model.apply)({"params": scanned_params}, batch)
    got = jax.jit(unrolled_model.apply)({"params": params}, batch)
    for key in ("logits", "latents", "predictions"):
        np.testing.assert_allclose(got[key], want[key], atol=1e-5, rtol=1e-5, err_msg=key)


def _flops(config) -> tuple[float, float]:
    s = summary.summarize(config)
    return s["train_step_flops"], s["analytic_flops"]["total"]["train"]


def test_train_step_flops_agree_with_analytic_and_grow_with_depth():
    config = tiny.get_config()
    xla, analytic = _flops(config)
    assert 0.95 < xla / analytic < 1.1

    deeper = copy.deepcopy(config)
    deeper.model.text_decoder.depth += 2
    deeper_xla, deeper_analytic = _flops(deeper)
    # Elementwise ops are not in the analytic count; at width 64 they are a few % of the step.
    np.testing.assert_allclose(deeper_xla - xla, deeper_analytic - analytic, rtol=0.1)


def test_head_dim_sets_attention_width_apart_from_the_stack_width():
    """3 heads of 32 in stacks 64 wide: heads need not divide the width once head_dim is set."""
    config = tiny.get_config()
    for stack in configlib.STACKS:
        config.model[stack].update(num_heads=3, head_dim=32)
    configlib.validate(config)
    xla, analytic = _flops(config)
    assert 0.95 < xla / analytic < 1.1
    base_xla, base_analytic = _flops(tiny.get_config())  # 4 heads of 16
    np.testing.assert_allclose(xla - base_xla, analytic - base_analytic, rtol=0.1)
    params = summary._state(config)[2].params
    attention = params["text_decoder"]["transformer"]["layers_0"]["self_attention"]
    assert attention["query"]["kernel"].shape == (64, 3, 32)
    assert attention["out"]["kernel"].shape == (3, 32, 64)


def test_time_aligned_window_saves_the_flops_the_analytic_count_says():
    """64 snippets: a window of 4 leaves each query 32 keys instead of up to 256."""
    config = tiny.get_config()
    config.data.update(num_frames=128, batch_size=8)
    full_xla, full_analytic = _flops(config)
    windowed = copy.deepcopy(config)
    windowed.model.time_aligned.window = 4
    xla, analytic = _flops(windowed)
    assert 0.95 < xla / analytic < 1.1
    assert analytic < full_analytic
    np.testing.assert_allclose(full_xla - xla, full_analytic - analytic, rtol=0.1)


def test_ttm_flops_with_remat_count_the_recompute():
    """Counted as a while loop, the TTM's snippets would count once (ratio ~0.9 here)."""
    config = tiny.get_config("ttm")
    config.model.remat_policy = "nothing_saveable"
    config.data.num_frames *= 2
    xla, analytic = _flops(config)
    assert 0.95 < xla / analytic < 1.1


def test_cli_loads_long_video_config_by_path():
    out = subprocess.run(
        [sys.executable, "-m", "mirasol3b.summary", "--config=configs/long_video.py:ttm", "--flops=false",
         "--config.data.batch_size=4"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=True).stdout
    assert "512 frames = 32 snippets" in out and "total" in out and "combiner=ttm" in out
