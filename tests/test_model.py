"""Behaviour of the whole model: shapes, dtypes, causality, padding, losses, training, sharding, config.

Compiles are the cost on CPU, so every model is built once per module (`_setup`), params are filled
from numpy in `init`'s layout (compiling `init` takes longer than a forward pass), and one jitted
forward per combiner serves every perturbation test.
"""

from __future__ import annotations

import copy
import functools
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl import flags
from flax import linen as nn
from ml_collections import config_flags

from configs import tiny
from mirasol3b import configlib, losses, sharding
from mirasol3b.combiner import ModalityFusion, TokenLearner, TransformerCombiner, TTMCombiner
from mirasol3b.combiner.ttm import selection_mask
from mirasol3b.encoders.audio import AudioEncoder
from mirasol3b.encoders.spectrogram import log_mel_spectrogram
from mirasol3b.encoders.video import VideoEncoder
from mirasol3b.model import Mirasol3B, logmel_spec, samples_per_snippet, stack_spec, tokens_per_snippet
from mirasol3b.text_decoder import TextDecoder
from mirasol3b.time_aligned import TimeAlignedModel
from mirasol3b.train import optimizer as optim
from mirasol3b.train import state as train_state
from mirasol3b.train import step as train_step

B, T, L = 2, 4, 8  # batch, snippets, text length
NV, NA = 16, 20  # video tokens (1 tube x 4 x 4 patches), audio tokens (25 frames / 5 x 32 mels / 8)
VARIANTS = {"transformer": None, "ttm": "ttm"}


def make_config(variant: str | None = None, **model_changes):
    cfg = tiny.get_config(variant)
    # One layer per stack where the tests reason about reach (window, readout) and for compile time.
    for stack in ("text_decoder", "combiner_transformer", "time_aligned"):
        cfg.model[stack].depth = 1
    for key, value in model_changes.items():
        cfg.model[key] = value
    return configlib.validate(cfg)


def make_batch(model_cfg, batch_size: int = B, seed: int = 0) -> dict[str, jax.Array]:
    rng = np.random.default_rng(seed)
    v = model_cfg.video
    weights = np.ones((batch_size, L), np.float32)
    weights[:, :3] = 0.0  # a 3-token prompt that is not scored
    return {
        "video": jnp.asarray(rng.integers(0, 256, (batch_size, T * v.snippet_frames, v.image_size, v.image_size, 3)),
                             jnp.uint8),
        "audio": jnp.asarray(rng.normal(size=(batch_size, T * samples_per_snippet(model_cfg))) * 0.3, jnp.float32),
        "media_mask": jnp.ones((batch_size, T), bool),
        "text_inputs": jnp.asarray(rng.integers(0, model_cfg.vocab_size, (batch_size, L)), jnp.int32),
        "text_targets": jnp.asarray(rng.integers(0, model_cfg.vocab_size, (batch_size, L)), jnp.int32),
        "text_loss_weights": jnp.asarray(weights),
    }


def numpy_params(boxed_abstract, seed: int = 0):
    """Random params in the layout of `boxed_abstract` (from `jax.eval_shape(model.init, ...)`):
    norm scales 1, everything else N(0, 0.05)."""
    rng = np.random.default_rng(seed)

    def fill(path, a):
        if getattr(path[-1], "key", None) == "scale":
            return jnp.ones(a.shape, a.dtype)
        return jnp.asarray(rng.normal(size=a.shape) * 0.05, a.dtype)
    return jax.tree_util.tree_map_with_path(fill, nn.unbox(boxed_abstract))


_BOUNDARIES = (VideoEncoder, AudioEncoder, ModalityFusion, TransformerCombiner, TTMCombiner, TimeAlignedModel,
               TextDecoder)


def _capture(module, method_name):
    return method_name == "__call__" and isinstance(module, _BOUNDARIES)


@functools.cache
def _setup(variant: str, dtype: str = "float32"):
    """(config, model, params, forward) with `forward(params, batch) -> (outputs, intermediates)`."""
    cfg = make_config(VARIANTS[variant], dtype=dtype)
    model = Mirasol3B(cfg.model)
    boxed = jax.eval_shape(model.init, jax.random.key(0), make_batch(cfg.model))["params"]
    params = numpy_params(boxed)

    @jax.jit
    def forward(params, batch):
        out, state = model.apply({"params": params}, batch, capture_intermediates=_capture,
                                 mutable=["intermediates"])
        return out, state["intermediates"]
    return cfg, model, params, forward


def _run(variant, batch):
    _, _, params, forward = _setup(variant)
    return forward(params, batch)


def _with(batch, **changes):
    return {**batch, **changes}


def _close(a, b):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


def _differ(a, b, min_change=1e-4):
    assert np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max() > min_change


# ---- shapes and dtypes ------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_shapes_at_every_module_boundary(variant):
    cfg, _, _, _ = _setup(variant)
    m, d, v = cfg.model.num_latents, cfg.model.combiner_transformer.width, cfg.model.vocab_size
    out, inter = _run(variant, make_batch(cfg.model))
    (video,) = inter["video_encoder"]["__call__"]
    (audio,) = inter["audio_encoder"]["__call__"]
    (fused,) = inter["fusion"]["__call__"]
    (combined,) = inter["combiner"]["__call__"]
    if cfg.model.combiner == "ttm":  # it also returns its memory after the last snippet (for streams)
        combined, memory = combined
        chex.assert_shape(memory, (B, cfg.model.ttm.memory_size, d))
    ((features, predictions),) = inter["time_aligned"]["__call__"]
    (logits,) = inter["text_decoder"]["__call__"]
    chex.assert_shape(video, (B, T, NV, cfg.model.video_encoder.width))
    chex.assert_shape(audio, (B, T, NA, cfg.model.audio_encoder.width))
    chex.assert_shape(fused, (B, T, NV + NA, d))
    chex.assert_shape([combined, out["latents"]], (B, T, m, d))
    chex.assert_shape(features, (B, T, m, cfg.model.time_aligned.width))
    chex.assert_shape([predictions, out["predictions"]], (B, T, m, d))
    chex.assert_shape([logits, out["logits"]], (B, L, v))
    chex.assert_type([logits, out["logits"], predictions, out["predictions"]], jnp.float32)
    _close(out["latents"], combined)
    _close(out["logits"], logits)
    chex.assert_tree_all_finite(out)


def test_param_dtype_is_separate_from_compute_dtype():
    cfg = make_config(dtype="bfloat16")
    assert cfg.model.param_dtype == "float32"
    model = Mirasol3B(cfg.model)
    batch = make_batch(cfg.model)
    boxed = jax.eval_shape(model.init, jax.random.key(0), batch)["params"]
    chex.assert_trees_all_equal_shapes(nn.unbox(boxed), _setup("transformer")[2])  # same params as float32
    chex.assert_type(jax.tree.leaves(nn.unbox(boxed)), jnp.float32)
    params = _setup("transformer")[2]
    out = jax.jit(lambda p, b: model.apply({"params": p}, b))(params, batch)
    chex.assert_type(out["latents"], jnp.bfloat16)  # the compute dtype did take effect
    chex.assert_type([out["logits"], out["predictions"]], jnp.float32)
    chex.assert_tree_all_finite(out)
    ref, _ = _run("transformer", batch)
    err = np.abs(np.asarray(out["logits"]) - np.asarray(ref["logits"])).max()
    assert err < 0.1 * np.abs(np.asarray(ref["logits"])).max(), err


# ---- causality --------------------------------------------------------------------------------

def _perturb_snippet(cfg, batch, modality: str, snippet: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    if modality == "video":
        f = cfg.model.video.snippet_frames
        video = np.array(batch["video"])
        video[:, snippet * f:(snippet + 1) * f] = rng.integers(0, 256, video[:, snippet * f:(snippet + 1) * f].shape)
        return _with(batch, video=jnp.asarray(video))
    s = samples_per_snippet(cfg.model)
    audio = np.array(batch["audio"])
    audio[:, snippet * s:(snippet + 1) * s] = rng.normal(size=(audio.shape[0], s))
    return _with(batch, audio=jnp.asarray(audio))


@pytest.mark.parametrize("modality", ["video", "audio"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_snippets_are_causal(variant, modality):
    cfg = _setup(variant)[0]
    batch = make_batch(cfg.model)
    base, _ = _run(variant, batch)
    for t in range(T - 1):  # change snippet t + 1
        out, _ = _run(variant, _perturb_snippet(cfg, batch, modality, t + 1))
        for key in ("latents", "predictions"):
            _close(out[key][:, :t + 1], base[key][:, :t + 1])
            _differ(out[key][:, t + 1], base[key][:, t + 1])


@pytest.mark.parametrize("variant", VARIANTS)
def test_text_decoder_is_causal(variant):
    cfg = _setup(variant)[0]
    batch = make_batch(cfg.model)
    base, _ = _run(variant, batch)
    for i in range(L - 1):  # change token i + 1
        tokens = batch["text_inputs"].at[:, i + 1].set((batch["text_inputs"][:, i + 1] + 7) % cfg.model.vocab_size)
        out, _ = _run(variant, _with(batch, text_inputs=tokens))
        _close(out["logits"][:, :i + 1], base["logits"][:, :i + 1])
        _differ(out["logits"][:, i + 1], base["logits"][:, i + 1])


def test_ttm_memory_carries_information_across_snippets():
    """Changing snippet 1 changes snippet 2's (and 3's) Combiner output with TTM, not with the
    Transformer Combiner, which combines each snippet on its own."""
    for variant, carries in (("ttm", True), ("transformer", False)):
        cfg = _setup(variant)[0]
        batch = make_batch(cfg.model)
        base, _ = _run(variant, batch)
        out, _ = _run(variant, _perturb_snippet(cfg, batch, "video", 1))
        _differ(out["latents"][:, 1], base["latents"][:, 1])
        for later in (2, 3):
            if carries:
                _differ(out["latents"][:, later], base["latents"][:, later])
            else:
                _close(out["latents"][:, later], base["latents"][:, later])



def test_token_learner_mask_decides_which_inputs_each_output_selects():
    """With the TTM's per-modality mask (memory shared, then two modalities), output j changes when a
    token it may select changes, and never otherwise."""
    rng = np.random.default_rng(0)
    sources = jnp.asarray([-1, -1, 0, 0, 0, 1, 1])  # 2 memory slots, 3 audio tokens, 2 video tokens
    mask = selection_mask(sources, 4, 2)
    np.testing.assert_array_equal(np.asarray(mask[:, 0]), [True, True, True, True, True, False, False])
    learner = TokenLearner(4, 16)
    x = jnp.asarray(rng.normal(size=(2, 7, 8)), jnp.float32)
    params = learner.init(jax.random.key(0), x, mask)
    base = learner.apply(params, x, mask)
    chex.assert_shape(base, (2, 4, 8))
    for i in range(7):
        out = learner.apply(params, x.at[:, i].add(1.0), mask)
        for j in range(4):
            (_differ if mask[i, j] else _close)(out[:, j], base[:, j])


def test_gated_ttm_write_interpolates_between_keeping_and_replacing_the_memory():
    """The gated write's gate forced shut keeps the memory it was given over every snippet; forced
    open it gives the paper's write ("replace", same weights) exactly."""
    cfg = make_config("ttm")
    spec, width = stack_spec(cfg.model, "combiner_transformer"), cfg.model.combiner_transformer.width
    fields = dict(num_outputs=4, memory_size=3, token_learner_hidden=16)
    gated, replace = TTMCombiner(spec, write="gated", **fields), TTMCombiner(spec, **fields)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.normal(size=(2, 3, 5, width)), jnp.float32)
    memory = jnp.asarray(rng.normal(size=(2, 3, width)), jnp.float32)
    params = nn.unbox(gated.init(jax.random.key(0), tokens, memory=memory))["params"]

    def run(model, params):
        return model.apply({"params": params}, tokens, memory=memory, return_memory=True)
    replace_params = {"step": {k: v for k, v in params["step"].items() if k not in ("gate", "gate_norm")}}
    for bias, expected in ((-1e4, memory), (1e4, run(replace, replace_params)[1])):
        step = dict(params["step"], gate={**params["step"]["gate"], "bias": jnp.full((width,), bias)})
        _close(run(gated, {"step": step})[1], expected)
    _differ(run(gated, params)[1], memory)  # at its initial gate it writes


@pytest.mark.parametrize("readout", ["joint", "per_modality"])
def test_combiner_readout_decides_which_modality_each_output_reads(readout):
    """One Combiner layer: with a per-modality readout, output j changes only when modality j % 2
    (audio, then video: the fusion's order) changes; with the joint readout every output does."""
    cfg = make_config(combiner_readout=readout)
    m = cfg.model
    sizes = {"audio": 5, "video": 3}
    assert tokens_per_snippet(m) == {"video": NV, "audio": NA}  # what the model gives the readout mask
    combiner = TransformerCombiner(
        stack_spec(m, "combiner_transformer"), num_outputs=4,
        segment_sizes=(sizes["audio"], sizes["video"]) if readout == "per_modality" else None)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.normal(size=(2, 3, sum(sizes.values()), m.combiner_transformer.width)), jnp.float32)
    params = combiner.init(jax.random.key(0), tokens)
    base = combiner.apply(params, tokens)
    chex.assert_shape(base, (2, 3, 4, m.combiner_transformer.width))
    for i, (name, lo, hi) in enumerate([("audio", 0, 5), ("video", 5, 8)]):
        out = combiner.apply(params, tokens.at[:, :, lo:hi].add(jnp.asarray(rng.normal(size=(hi - lo, tokens.shape[-1])),
                                                                            jnp.float32)))
        for j in range(4):
            if readout == "joint" or j % 2 == i:
                _differ(out[:, :, j], base[:, :, j])
            else:
                _close(out[:, :, j], base[:, :, j])


def _time_aligned_inputs(t: int, m: int, seed: int):
    """(spec, latent width, rng, latents [2, t, m, width], media_mask with example 1's last snippet padded)."""
    cfg = make_config()
    width = cfg.model.combiner_transformer.width
    rng = np.random.default_rng(seed)
    latents = jnp.asarray(rng.normal(size=(2, t, m, width)), jnp.float32)
    media_mask = jnp.ones((2, t), bool).at[1, t - 1].set(False)
    return stack_spec(cfg.model, "time_aligned"), width, rng, latents, media_mask


def test_time_aligned_window_sees_only_the_last_window_snippets():
    """Window 2 over 7 snippets (chunks of 2, the last one padded), one layer: snippet t's features
    change when snippet t or t - 1 changes, and never for earlier or later ones; a window as long
    as the clip is the full block-causal model, with the same parameters."""
    m, t = 3, 7
    spec, width, rng, latents, media_mask = _time_aligned_inputs(t, m, seed=0)
    windowed, full = TimeAlignedModel(spec, window=2), TimeAlignedModel(spec)
    boxed = jax.eval_shape(full.init, jax.random.key(0), latents, media_mask)["params"]
    assert jax.tree.map(jnp.shape, jax.eval_shape(windowed.init, jax.random.key(0), latents, media_mask)) == \
        jax.tree.map(jnp.shape, {"params": boxed})
    params = numpy_params(boxed)
    apply = jax.jit(lambda module, x: module.apply({"params": params}, x, media_mask), static_argnums=0)
    base, predictions = apply(windowed, latents)
    chex.assert_shape(base, (2, t, m, spec.width))
    chex.assert_shape(predictions, (2, t, m, width))
    for changed in range(t):
        out, _ = apply(windowed, latents.at[:, changed].add(jnp.asarray(rng.normal(size=(m, width)), jnp.float32)))
        for snippet in range(t):
            if snippet in (changed, changed + 1):
                _differ(out[0, snippet], base[0, snippet])
            else:
                _close(out[0, snippet], base[0, snippet])
    for module in (TimeAlignedModel(spec, window=t), TimeAlignedModel(spec, window=9)):
        np.testing.assert_allclose(apply(module, latents)[0], apply(full, latents)[0], rtol=1e-6, atol=1e-6)


def test_a_non_causal_time_aligned_model_sees_later_snippets_but_not_padded_ones():
    """The ablation `causal=False`: snippet 0's features depend on the last snippet, with the same
    parameters; a padded snippet still reaches no one."""
    m, t = 2, 4
    spec, _, _, latents, media_mask = _time_aligned_inputs(t, m, seed=1)
    causal, full = TimeAlignedModel(spec), TimeAlignedModel(spec, causal=False)
    params = numpy_params(jax.eval_shape(causal.init, jax.random.key(0), latents, media_mask)["params"])
    apply = jax.jit(lambda module, x: module.apply({"params": params}, x, media_mask)[0], static_argnums=0)
    later = latents.at[:, 3].add(1.0)
    _close(apply(causal, later)[:, :3], apply(causal, latents)[:, :3])
    changed, base = apply(full, later), apply(full, latents)
    _differ(changed[0, 0], base[0, 0])
    _close(changed[1, :3], base[1, :3])  # example 1's snippet 3 is padding


def test_modality_dropout_in_the_model_follows_the_key_in_training_only():
    """With modality dropout on (the only randomness here) the training loss depends on the key;
    evaluation does not depend on it at all."""
    cfg = make_config(modality_dropout=0.5)
    model = Mirasol3B(cfg.model)
    batch = make_batch(cfg.model, 4, seed=3)
    params = numpy_params(jax.eval_shape(model.init, jax.random.key(0), batch)["params"])
    loss = jax.jit(lambda rng: train_step.make_loss_fn(model, cfg.loss)(params, batch, rng)[0])
    assert float(loss(jax.random.key(0))) != float(loss(jax.random.key(1)))
    assert float(loss(jax.random.key(0))) == float(loss(jax.random.key(0)))
    evaluate = jax.jit(lambda rng: model.apply({"params": params}, batch, rngs={"dropout": rng})["logits"])
    np.testing.assert_array_equal(evaluate(jax.random.key(0)), evaluate(jax.random.key(1)))


def test_the_train_step_draws_new_dropout_keys_each_step(monkeypatch):
    """The key a loss sees is the step's own (the run's key folded with the step), in one pass and in
    every microbatch: a fixed key would repeat the same dropout masks all run."""
    def loss_fn_seeing_its_key(model, loss_config):
        def loss_fn(params, batch, rng, step=0, denominators=None):
            seen = jax.random.uniform(rng)
            return params["w"] * 0 + seen, {"loss": seen}
        return loss_fn
    monkeypatch.setattr(train_step, "make_loss_fn", loss_fn_seeing_its_key)
    optimizer = optax.sgd(0.1)
    params = {"w": jnp.zeros(())}
    batch = {"x": jnp.zeros((4, 1)), "text_loss_weights": jnp.ones((4, 1)), "media_mask": jnp.ones((4, 2), bool)}
    for microbatches in (1, 2):
        step = jax.jit(train_step.make_train_step(None, optimizer, None, microbatches))
        state = train_state.TrainState(step=jnp.int32(0), params=params, opt_state=optimizer.init(params))
        seen = {(n, seed): float(step(state.replace(step=jnp.int32(n)), batch, jax.random.key(seed))[1]["loss"])
                for n, seed in ((0, 0), (1, 0), (0, 1), (0, 0))}
        assert len(set(seen.values())) == 3, (microbatches, seen)  # (0, 0) twice: the same key


def test_modality_dropout_hides_one_whole_modality_per_example_in_training_only():
    """Each example loses at most one modality, each with the configured rate; a hidden modality's
    tokens no longer depend on its input; evaluation and single-modality models are untouched."""
    rate, n = 0.3, 4000
    fusion = ModalityFusion(8, modality_dropout=rate)
    rng = np.random.default_rng(0)
    tokens = {"audio": jnp.asarray(rng.normal(size=(n, 1, 3, 5)), jnp.float32),
              "video": jnp.asarray(rng.normal(size=(n, 1, 2, 6)), jnp.float32)}
    params = fusion.init(jax.random.key(0), tokens)
    train = lambda t: fusion.apply(params, t, deterministic=False, rngs={"dropout": jax.random.key(1)})  # noqa: E731
    out = train(tokens)
    changed = {name: tokens[name] + 1.0 for name in tokens}
    audio_hidden = np.all(np.asarray(train({**tokens, "audio": changed["audio"]})[:, :, :3] == out[:, :, :3]), (1, 2, 3))
    video_hidden = np.all(np.asarray(train({**tokens, "video": changed["video"]})[:, :, 3:] == out[:, :, 3:]), (1, 2, 3))
    assert not np.any(audio_hidden & video_hidden)
    for hidden in (audio_hidden, video_hidden):
        assert abs(hidden.mean() - rate) < 0.03, hidden.mean()
    np.testing.assert_array_equal(fusion.apply(params, tokens), ModalityFusion(8).apply(params, tokens))
    alone = {"video": tokens["video"]}
    one = ModalityFusion(8, modality_dropout=rate)
    one_params = one.init(jax.random.key(0), alone)
    np.testing.assert_array_equal(one.apply(one_params, alone, deterministic=False, rngs={"dropout": jax.random.key(1)}),
                                  one.apply(one_params, alone))


def test_audio_encoder_feeds_the_log_mel_standardised_by_mean_db_and_std_db():
    """The patch projection sees (dB - mean_db) / std_db: an encoder with the defaults equals one
    fed raw dB (0, 1) whose projection absorbs the standardisation; the default centres the
    demo's faint noise floor near 0 instead of leaving a shared -1.1 offset in every patch."""
    cfg = make_config()
    a = cfg.model.audio
    encoder = lambda mean, std: AudioEncoder(  # noqa: E731
        stack_spec(cfg.model, "audio_encoder"), logmel=logmel_spec(cfg.model),
        samples_per_snippet=samples_per_snippet(cfg.model), patch_frames=a.patch_frames,
        patch_mels=a.patch_mels, mean_db=mean, std_db=std)
    audio = make_batch(cfg.model)["audio"]
    standardised = encoder(a.mean_db, a.std_db)
    params = nn.unbox(standardised.init(jax.random.key(0), audio))
    proj = params["params"]["patch_embedding"]["projection"]
    raw = {"params": {**params["params"], "patch_embedding": {**params["params"]["patch_embedding"], "projection": {
        "kernel": proj["kernel"] / a.std_db,
        "bias": proj["bias"] - a.mean_db / a.std_db * proj["kernel"].sum(0)}}}}
    np.testing.assert_allclose(np.asarray(encoder(0.0, 1.0).apply(raw, audio)),
                               np.asarray(standardised.apply(params, audio)), rtol=2e-4, atol=2e-4)
    noise = np.random.default_rng(0).normal(0.0, 0.003, (1, samples_per_snippet(cfg.model))).astype(np.float32)
    floor = (np.asarray(log_mel_spectrogram(jnp.asarray(noise), logmel_spec(cfg.model))) - a.mean_db) / a.std_db
    assert abs(floor.mean()) < 0.1, floor.mean()


# ---- padding ----------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_padded_snippets_neither_attend_nor_count(variant):
    cfg = _setup(variant)[0]
    batch = make_batch(cfg.model)
    # Example 0 has a padded snippet in the middle (2), example 1 at the end (3).
    media_mask = np.ones((B, T), bool)
    media_mask[0, 2] = media_mask[1, 3] = False
    batch = _with(batch, media_mask=jnp.asarray(media_mask))
    changed = batch
    for modality in ("video", "audio"):
        for snippet in (2, 3):
            moved = _perturb_snippet(cfg, changed, modality, snippet, seed=snippet + 10)
            example = 0 if snippet == 2 else 1  # only touch the padded snippet of each example
            changed = _with(changed, **{modality: changed[modality].at[example].set(moved[modality][example])})
    base, _ = _run(variant, batch)
    out, _ = _run(variant, changed)
    _differ(out["latents"][0, 2], base["latents"][0, 2])  # the padded snippets' own latents do change
    _differ(out["latents"][1, 3], base["latents"][1, 3])
    _close(out["logits"], base["logits"])
    valid = jnp.asarray(media_mask)
    _close(out["latents"][valid], base["latents"][valid])  # TTM memory skips the padded snippet
    _close(out["predictions"][valid], base["predictions"][valid])
    for weight in (1.0, 3.0):
        loss, metrics = losses.compute_loss(out, changed, latent_loss_weight=weight)
        base_loss, base_metrics = losses.compute_loss(base, batch, latent_loss_weight=weight)
        _close(loss, base_loss)
        _close(metrics["latent_loss"], base_metrics["latent_loss"])


# ---- losses -----------------------------------------------------------------------------------

def _normalised(x):
    return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)


def test_latent_loss_counts_only_valid_pairs():
    rng = np.random.default_rng(0)
    latents = rng.normal(size=(2, 4, 3, 8)).astype(np.float32) * 2 + 1
    predictions = rng.normal(size=(2, 4, 3, 8)).astype(np.float32)
    mask = np.array([[True, True, False, True], [True, True, True, True]])
    valid_pairs = [(0, 0), (1, 0), (1, 1), (1, 2)]  # (example, t): snippets t and t + 1 both real
    for normalize in (True, False):
        target = _normalised(latents) if normalize else latents
        expected = np.mean([np.mean((predictions[b, t] - target[b, t + 1]) ** 2) for b, t in valid_pairs])
        got = losses.latent_loss(jnp.asarray(latents), jnp.asarray(predictions), jnp.asarray(mask),
                                 normalize_target=normalize)
        np.testing.assert_allclose(got, expected, rtol=1e-5)
    # Whatever the masked pairs hold, the loss is the same.
    garbage = predictions.copy()
    garbage[0, 1:] = 1e3
    _close(losses.latent_loss(jnp.asarray(latents), jnp.asarray(garbage), jnp.asarray(mask)),
           losses.latent_loss(jnp.asarray(latents), jnp.asarray(predictions), jnp.asarray(mask)))


def test_contrastive_latent_loss_rewards_the_right_next_snippet_and_ignores_padding():
    rng = np.random.default_rng(4)
    latents = jnp.asarray(rng.normal(size=(6, 4, 2, 8)), jnp.float32)
    mask = jnp.ones((6, 4), bool)
    right = jnp.concatenate([latents[:, 1:], latents[:, :1]], axis=1)  # predictions[:, t] = latents[:, t + 1]
    wrong = jnp.roll(right, 1, axis=0)  # another example's next snippet
    loss = lambda lat, pred, m=mask: float(losses.contrastive_latent_loss(lat, pred, m, temperature=0.1))  # noqa: E731
    assert loss(latents, right) < 0.05 < np.log(6) + 1 < loss(latents, wrong)
    # Latents that ignore the media cannot do better than chance among the 6 examples.
    np.testing.assert_allclose(loss(jnp.ones_like(latents), jnp.ones_like(latents)), np.log(6), rtol=1e-5)
    # A padded snippet: its pairs are neither scored nor negatives, whatever they hold.
    padded = mask.at[0, 2].set(False)
    garbage_latents = latents.at[0, 2].set(1e3)
    garbage_pred = right.at[0, 1:3].set(-1e3)
    _close(loss(garbage_latents, garbage_pred, padded), loss(latents, right, padded))
    # Both sides learn (no stop-gradient): the target latents get a gradient too.
    g = jax.grad(lambda z: losses.contrastive_latent_loss(z, jnp.roll(z, -1, axis=1) * 0.5, mask))(latents)
    assert float(jnp.abs(g[:, 1:]).min()) > 0.0


def _infonce_reference(latents, predictions, mask, temperature):
    """Brute-force "snippets" InfoNCE: every valid (example, snippet) pair's target is a candidate."""
    unit = lambda x: x / np.sqrt((x**2).sum(-1, keepdims=True) + 1e-6)  # noqa: E731
    b, t, m, _ = latents.shape
    pairs = [(i, s) for i in range(b) for s in range(t - 1) if mask[i, s] and mask[i, s + 1]]
    total = []
    for j in range(m):
        for i, s in pairs:
            logits = np.array([unit(predictions[i, s, j]) @ unit(latents[k, r + 1, j]) for k, r in pairs]) / temperature
            own = pairs.index((i, s))
            total.append(np.log(np.exp(logits - logits.max()).sum()) + logits.max() - logits[own])
    return np.mean(total)


def test_contrastive_snippet_negatives_defeat_clip_constant_latents():
    rng = np.random.default_rng(5)
    b, t, m, d = 5, 4, 2, 64
    constant = np.repeat(rng.normal(size=(b, 1, m, d)), t, axis=1)  # the same latents all clip long
    moving = rng.normal(size=(b, t, m, d))  # a different latent every snippet
    mask = np.ones((b, t), bool)
    loss = lambda lat, negatives, m=mask: float(losses.contrastive_latent_loss(  # noqa: E731
        jnp.asarray(lat, jnp.float32), jnp.asarray(np.roll(lat, -1, axis=1), jnp.float32), jnp.asarray(m),
        temperature=0.05, negatives=negatives))
    # Other clips as the only negatives: a clip-constant code scores as well as real content.
    assert loss(constant, "examples") < 0.01 and loss(moving, "examples") < 0.01
    # With the clip's other snippets as negatives it cannot tell its t-1 targets apart.
    np.testing.assert_allclose(loss(constant, "snippets"), np.log(t - 1), rtol=1e-3)
    assert loss(moving, "snippets") < 0.01
    # Against a brute-force count, with a padded snippet (neither scored nor a negative).
    padded = mask.copy()
    padded[1, 2] = False
    lat, pred = rng.normal(size=(b, t, m, 8)), rng.normal(size=(b, t, m, 8))
    got = losses.contrastive_latent_loss(jnp.asarray(lat, jnp.float32), jnp.asarray(pred, jnp.float32),
                                         jnp.asarray(padded), temperature=0.3, negatives="snippets")
    np.testing.assert_allclose(float(got), _infonce_reference(lat, pred, padded, 0.3), rtol=1e-4)
    with pytest.raises(ValueError, match="negatives must be one of"):
        losses.contrastive_latent_loss(jnp.asarray(lat), jnp.asarray(pred), jnp.asarray(mask), negatives="clips")


def test_text_loss_counts_only_weighted_tokens():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(2, 5, 11)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 11, (2, 5)), jnp.int32)
    weights = jnp.asarray([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]], jnp.float32)
    loss, metrics = losses.text_loss(logits, targets, weights)
    logp = jax.nn.log_softmax(np.asarray(logits), axis=-1)
    ce = -np.take_along_axis(np.asarray(logp), np.asarray(targets)[..., None], -1)[..., 0]
    np.testing.assert_allclose(loss, (ce * np.asarray(weights)).sum() / 5.0, rtol=1e-6)
    assert float(metrics["scored_tokens"]) == 5.0
    _close(losses.text_loss(logits, targets.at[0, 1].set((targets[0, 1] + 1) % 11), weights)[0], loss)
    _differ(losses.text_loss(logits, targets.at[0, 2].set((targets[0, 2] + 1) % 11), weights)[0], loss)


def _random_outputs(seed=2):
    rng = np.random.default_rng(seed)
    outputs = {"logits": jnp.asarray(rng.normal(size=(2, 5, 11)), jnp.float32),
               "latents": jnp.asarray(rng.normal(size=(2, 3, 2, 4)), jnp.float32),
               "predictions": jnp.asarray(rng.normal(size=(2, 3, 2, 4)), jnp.float32)}
    batch = {"text_targets": jnp.asarray(rng.integers(0, 11, (2, 5)), jnp.int32),
             "text_loss_weights": jnp.ones((2, 5), jnp.float32), "media_mask": jnp.ones((2, 3), bool)}
    return outputs, batch


def test_total_loss_is_text_plus_weighted_latent():
    outputs, batch = _random_outputs()
    results = {w: losses.compute_loss(outputs, batch, latent_loss_weight=w) for w in (0.5, 2.0)}
    for w, (loss, metrics) in results.items():
        assert metrics["latent_loss"] > 0.1 and metrics["text_loss"] > 0.1
        np.testing.assert_allclose(loss, metrics["text_loss"] + w * metrics["latent_loss"], rtol=1e-6)
        _close(metrics["loss"], loss)
    np.testing.assert_allclose(results[2.0][0] - results[0.5][0], 1.5 * results[0.5][1]["latent_loss"], rtol=1e-5)


def test_latent_target_is_stop_gradient():
    outputs, batch = _random_outputs()
    latents, predictions, mask = outputs["latents"], outputs["predictions"], batch["media_mask"]
    g_latents, g_predictions = jax.grad(losses.latent_loss, argnums=(0, 1))(latents, predictions, mask)
    assert float(jnp.abs(g_latents).max()) == 0.0
    assert float(jnp.abs(g_predictions[:, :-1]).min()) > 0.0
    assert float(jnp.abs(g_predictions[:, -1]).max()) == 0.0  # the last snippet has nothing to predict
    # When predictions are a function of the latents, the gradient flows only through them.
    w = jnp.asarray(np.random.default_rng(3).normal(size=(4, 4)), jnp.float32)
    through = jax.grad(lambda z: losses.latent_loss(z, z @ w, mask))(latents)
    only_predictions = jax.grad(lambda z: losses.latent_loss(jax.lax.stop_gradient(z), z @ w, mask))(latents)
    _close(through, only_predictions)


# ---- training and sharding --------------------------------------------------------------------

TRAIN_BATCH = 8  # divisible by data x fsdp of every mesh below


@functools.cache
def _sharding_setup():
    """Transformer-Combiner model, a batch of 8 and params shared by the sharding tests."""
    cfg = make_config()
    model = Mirasol3B(cfg.model)
    batch = make_batch(cfg.model, TRAIN_BATCH, seed=5)
    boxed = jax.eval_shape(model.init, jax.random.key(0), batch)["params"]
    return cfg, model, batch, boxed


def test_train_step_lowers_loss_on_sharded_mesh():
    cfg = make_config(scan_layers=True)  # the scanned layout: kernels carry a leading 'layers' axis
    # Its own schedule: 20 steps must learn whatever learning rate configs/tiny.py trains at.
    cfg.train.update(learning_rate=3e-3, warmup_steps=5, num_steps=20)
    model = Mirasol3B(cfg.model)
    batch = make_batch(cfg.model, TRAIN_BATCH, seed=5)
    mesh = sharding.make_mesh((2, 2, 2))
    optimizer = optim.make_optimizer(cfg.train)
    state, shardings = train_state.create_sharded_state(model, optimizer, batch, mesh, jax.random.key(0))
    # Params really are spread over the mesh (FSDP over 'embed', tensor over 'mlp').
    kernel = state.params["text_decoder"]["transformer"]["layers"]["mlp"]["wi"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert kernel.addressable_shards[0].data.shape == (1, 32, 64)
    batch = {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim)) for k, v in batch.items()}
    step = train_step.make_train_step(model, optimizer, cfg.loss)
    history = []
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        step = jax.jit(step, in_shardings=(shardings, None, None), out_shardings=(shardings, None), donate_argnums=0)
        for _ in range(20):
            state, metrics = step(state, batch, jax.random.key(1))
            history.append({k: float(v) for k, v in metrics.items()})
    assert int(state.step) == 20
    first, last = history[0], history[-1]
    assert all(np.isfinite(h["loss"]) for h in history)
    assert last["loss"] < 0.7 * first["loss"], (first, last)
    assert last["text_loss"] < 0.9 * first["text_loss"], (first, last)
    assert last["latent_loss"] < 0.9 * first["latent_loss"], (first, last)


def test_every_param_kind_lands_on_its_mesh_axes():
    """The rules table, per kind of parameter: FSDP over 'embed', tensor parallelism over heads, MLP
    and vocabulary; every logical name a param uses is in the table (else it would be replicated)."""
    P = jax.sharding.PartitionSpec
    want = {("embed",): P("fsdp"), ("mlp",): P("tensor"), ("tokens", "embed"): P(None, "fsdp"),
            ("patch", "embed"): P(None, "fsdp"), ("embed", "mlp"): P("fsdp", "tensor"),
            ("mlp", "embed"): P("tensor", "fsdp"), ("embed", "heads", "head_dim"): P("fsdp", "tensor", None),
            ("heads", "head_dim", "embed"): P("tensor", None, "fsdp"), ("embed", "vocab"): P("fsdp", "tensor"),
            ("vocab", "embed"): P("tensor", "fsdp"),
            ("mlp", "memory"): P("tensor", None), ("memory",): P(None)}  # TTM's TokenLearner selectors
    named = {name for name, _ in sharding.LOGICAL_AXIS_RULES}
    for arg in (None, "ttm"):
        cfg = tiny.get_config(arg)
        boxed = jax.eval_shape(Mirasol3B(cfg.model).init, jax.random.key(0), make_batch(cfg.model, 1))["params"]
        specs = jax.tree.leaves(nn.get_partition_spec(boxed),
                                is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
        for logical in {tuple(spec) for spec in specs}:
            assert set(logical) - {None} <= named, logical
            assert nn.logical_to_mesh_axes(logical, sharding.LOGICAL_AXIS_RULES) == want[logical], logical


def test_mesh_shapes_are_resolved_or_refused():
    assert sharding.resolve_mesh_shape((-1, 2, 1), 8) == (4, 2, 1)
    assert sharding.resolve_mesh_shape((2, 2, 2), 8) == (2, 2, 2)
    for bad, reason in (((-1, -1, 1), "at most one -1"), ((0, 8, 1), "positive or -1"), ((-1, 3, 1), "cannot fill"),
                        ((2, 2, 1), "needs 4 devices"), ((8, 1), "3 entries")):
        with pytest.raises(ValueError, match=reason):
            sharding.resolve_mesh_shape(bad, 8)


# f32 reductions are split differently across shards. Measured: loss rel. diff 7e-8, gradients max
# abs. diff 6e-8 (largest gradient 0.22), so these bounds leave a margin of ~15x.
SHARDED_RTOL, SHARDED_ATOL = 1e-5, 1e-6


@functools.cache
def _single_device_loss_and_grads():
    cfg, model, batch, boxed = _sharding_setup()
    params = numpy_params(boxed, seed=7)
    fn = jax.jit(jax.value_and_grad(train_step.make_loss_fn(model, cfg.loss), has_aux=True))
    (loss, metrics), grads = fn(params, batch, jax.random.key(0))
    return params, jax.device_get((loss, metrics, grads))


@pytest.mark.parametrize("mesh_shape", [(2, 4, 1), (2, 2, 2)])
def test_sharded_loss_and_gradients_equal_single_device(mesh_shape):
    cfg, model, batch, boxed = _sharding_setup()
    params, (loss, metrics, grads) = _single_device_loss_and_grads()
    mesh = sharding.make_mesh(mesh_shape)
    param_shardings = sharding.logical_sharding(nn.get_partition_spec(boxed), mesh)
    batch_shardings = {k: sharding.batch_sharding(mesh, v.ndim) for k, v in batch.items()}
    params = jax.device_put(params, param_shardings)
    batch = jax.device_put(batch, batch_shardings)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        fn = jax.jit(jax.value_and_grad(train_step.make_loss_fn(model, cfg.loss), has_aux=True),
                     in_shardings=(param_shardings, batch_shardings, None), out_shardings=(None, param_shardings))
        (s_loss, s_metrics), s_grads = fn(params, batch, jax.random.key(0))
    assert len(set(jax.tree.leaves(jax.tree.map(lambda g: g.sharding.spec, s_grads)))) > 1  # really sharded
    np.testing.assert_allclose(s_loss, loss, rtol=SHARDED_RTOL)
    for key in ("text_loss", "latent_loss"):
        np.testing.assert_allclose(s_metrics[key], metrics[key], rtol=SHARDED_RTOL)
    chex.assert_trees_all_close(jax.device_get(s_grads), grads, rtol=SHARDED_RTOL, atol=SHARDED_ATOL)


def test_microbatches_give_the_batch_gradients_in_less_memory_on_a_sharded_mesh():
    """Gradient accumulation: two slices of the batch, summed, are one pass over it (the MSE latent
    loss: the contrastive one takes negatives from its slice), though the slices score different
    numbers of text tokens and snippet pairs; and the step needs less temporary memory."""
    cfg, model, batch, boxed = _sharding_setup()
    loss_config = copy.deepcopy(cfg.loss)
    loss_config.latent_loss = "mse"
    weights, mask = np.array(batch["text_loss_weights"]), np.ones((TRAIN_BATCH, T), bool)
    weights[1::2, :6] = 0.0  # odd examples (slice 1) score 2 tokens, even ones 5
    mask[1::2, 2:] = False  # and 1 snippet pair, even ones 3
    batch = dict(batch, text_loss_weights=jnp.asarray(weights), media_mask=jnp.asarray(mask))
    params = numpy_params(boxed, seed=7)
    mesh = sharding.make_mesh((2, 2, 2))
    param_shardings = sharding.logical_sharding(nn.get_partition_spec(boxed), mesh)
    batch_shardings = {k: sharding.batch_sharding(mesh, v.ndim) for k, v in batch.items()}
    params, batch = jax.device_put(params, param_shardings), jax.device_put(batch, batch_shardings)
    results, temp_bytes = {}, {}
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        for k in (1, 2):
            fn = jax.jit(train_step.make_grad_fn(model, loss_config, microbatches=k),
                         in_shardings=(param_shardings, batch_shardings, None, None),
                         out_shardings=(None, param_shardings))
            compiled = fn.lower(params, batch, jax.random.key(0), 0).compile()
            temp_bytes[k] = compiled.memory_analysis().temp_size_in_bytes
            results[k] = jax.device_get(compiled(params, batch, jax.random.key(0), 0))
    (metrics, grads), (micro_metrics, micro_grads) = results[1], results[2]
    assert set(micro_metrics) == set(metrics)
    for key in metrics:
        np.testing.assert_allclose(micro_metrics[key], metrics[key], rtol=SHARDED_RTOL, err_msg=key)
    assert metrics["scored_tokens"] == 4 * 5 + 4 * 2
    chex.assert_trees_all_close(micro_grads, grads, rtol=SHARDED_RTOL, atol=SHARDED_ATOL)
    assert temp_bytes[2] < 0.8 * temp_bytes[1], temp_bytes


# ---- config validation ------------------------------------------------------------------------

def _set(path, value):
    def change(cfg):
        *parents, leaf = path.split(".")
        node = cfg
        for p in parents:
            node = node[p]
        with cfg.ignore_type():
            node[leaf] = value
    return change


def _get(path, cfg):
    for p in path.split("."):
        cfg = cfg[p]
    return cfg


def _add_unknown(cfg):
    with cfg.unlocked():
        cfg.model.video.frame_rate = 8.0


BAD_CONFIGS = {
    "heads_not_dividing_width": (_set("model.video_encoder.num_heads", 3), "model.video_encoder.num_heads"),
    "negative_head_dim": (_set("model.text_decoder.head_dim", -8), "model.text_decoder.head_dim"),
    "frames_not_multiple_of_snippet": (_set("data.num_frames", 7), "data.num_frames"),
    "unknown_combiner": (_set("model.combiner", "perceiver"), "model.combiner"),
    "fractional_audio_samples": (_set("model.video.fps", 3.0), "model.video.fps"),
    "hop_not_dividing_snippet": (_set("model.audio.hop_length", 150), "model.audio.hop_length"),
    "patch_frames_not_dividing": (_set("model.audio.patch_frames", 4), "model.audio.patch_frames"),
    "negative_learning_rate": (_set("train.learning_rate", -1e-3), "train.learning_rate"),
    "bool_given_as_int": (_set("model.scan_layers", 1), "model.scan_layers"),
    "int_given_as_bool": (_set("model.num_latents", True), "model.num_latents"),
    "unknown_field": (_add_unknown, "model.video.frame_rate"),
    "tube_not_dividing_snippet": (_set("model.video.tube_frames", 3), "model.video.tube_frames"),
    "text_longer_than_decoder": (_set("data.text_length", 97), "data.text_length"),  # max_length is 96
    "modality_dropout_over_half": (_set("model.modality_dropout", 0.6), "model.modality_dropout"),
    "unknown_attention_impl": (_set("model.attention_impl", "flash"), "model.attention_impl"),
    "cudnn_attention_in_float32": (_set("model.attention_impl", "cudnn"), "model.attention_impl"),  # tiny is f32
    "unknown_ttm_write": (_set("model.ttm.write", "erase_add"), "model.ttm.write"),
    # tiny warms up for 100 steps: a 100-step run would leave the cosine decay no step (optax refuses).
    "all_warmup": (_set("train.num_steps", 100), "train.warmup_steps"),
    "microbatches_not_dividing_batch": (_set("train.microbatches", 3), "train.microbatches"),  # tiny: batch 32
    "non_causal_with_latent_loss": (_set("model.time_aligned.causal", False), "loss.latent_loss_weight"),
    "non_causal_with_window": (lambda cfg: (_set("model.time_aligned.causal", False)(cfg),
                                            _set("loss.latent_loss_weight", 0.0)(cfg),
                                            _set("model.time_aligned.window", 2)(cfg)), "model.time_aligned.window"),
}


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_bad_config_names_the_field(case):
    change, field = BAD_CONFIGS[case]
    cfg = tiny.get_config()
    change(cfg)
    with pytest.raises(configlib.ConfigError, match=f"config\\.{field}\\b") as err:
        configlib.validate(cfg)
    assert err.value.field == field


def test_every_microbatch_must_split_over_the_data_shards():
    cfg = tiny.get_config()
    cfg.train.microbatches = 2
    configlib.check_batch_fits_mesh(cfg, 16)  # tiny's 32 clips: slices of 16, one clip a shard
    with pytest.raises(configlib.ConfigError, match=r"config\.train\.microbatches\b.*data\.batch_size / 32"):
        configlib.check_batch_fits_mesh(cfg, 32)
    with pytest.raises(configlib.ConfigError, match=r"config\.data\.batch_size\b"):
        configlib.check_batch_fits_mesh(cfg, 3)


def test_paper_config_variants_for_the_latent_loss_and_the_non_causal_ablation():
    from configs import mirasol3b as paper

    base = paper.get_config()
    assert base.model.time_aligned.causal and base.loss.latent_loss == "contrastive"
    ablation = paper.get_config("noncausal,ttm")  # validated inside: the latent loss is off with it
    assert not ablation.model.time_aligned.causal and ablation.loss.latent_loss_weight == 0
    assert ablation.model.combiner == "ttm"
    assert paper.get_config("mse").loss.latent_loss == "mse"


def test_parse_arg_rejects_unknown_variants():
    assert tiny.get_config("ttm").model.combiner == "ttm"
    with pytest.raises(configlib.ConfigError, match="tmm"):
        tiny.get_config("tmm")
    with pytest.raises(configlib.ConfigError, match="ttm"):
        tiny.get_config("ttm=maybe")


def test_a_config_file_error_keeps_its_field_name_through_the_config_flag(tmp_path):
    # ml_collections re-raises an error of a config file as `type(e)(str(e))`.
    bad = tmp_path / "bad_config.py"
    bad.write_text("from configs import tiny\n\ndef get_config():\n    c = tiny.get_config()\n"
                   "    c.model.video_encoder.num_heads = 3\n    return __import__('mirasol3b').configlib.validate(c)\n")
    for argument, field in ((str(bad), "model.video_encoder.num_heads"), ("configs/tiny.py:tmm", "tmm")):
        flag_values = flags.FlagValues()
        config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values)
        with pytest.raises(flags.IllegalFlagValueError) as err:
            flag_values(["prog", f"--config={argument}"])
        assert field in str(err.value) and "positional argument" not in str(err.value), str(err.value)


def test_an_override_of_a_field_the_config_lacks_is_one_line_naming_it():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-m", "mirasol3b.summary", "--config=configs/tiny.py",
                           "--config.modle.dtype=float32"], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "names a field the config does not have" in done.stderr and 'Did you mean "model"' in done.stderr
    assert "--config.modle.dtype" in done.stderr
    nested = subprocess.run([sys.executable, "-m", "mirasol3b.summary", "--config=configs/tiny.py",
                             "--config.train.num_step=3"], cwd=root, capture_output=True, text=True, timeout=120)
    assert nested.returncode == 1 and "Traceback" not in nested.stderr, nested.stderr[-2000:]
    assert """: 'num_step'; Did you mean "num_steps" instead""" in nested.stderr, nested.stderr[-2000:]  # not a repr
    missing = subprocess.run([sys.executable, "-m", "mirasol3b.summary", "--config=configs/tinny.py"],
                             cwd=root, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr, missing.stderr[-2000:]
    assert "--config: Failed loading config file" in missing.stderr and "No such file" in missing.stderr


def _leaf_paths(cfg, prefix=""):
    for key in cfg.keys():
        value = cfg[key]
        if hasattr(value, "keys"):
            yield from _leaf_paths(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


@pytest.mark.parametrize("variant", [None, "ttm"])
def test_every_config_leaf_is_validated(variant):
    paths = list(_leaf_paths(tiny.get_config(variant)))
    assert len(paths) > 40
    assert sorted(paths) == sorted(configlib.RULES)  # a rule for every leaf and a leaf for every rule
    for path in paths:  # and every rule rejects a value of the wrong kind, naming its field
        cfg = tiny.get_config(variant)
        current = _get(path, cfg)
        _set(path, 12345 if isinstance(current, str) else "not a valid value")(cfg)
        with pytest.raises(configlib.ConfigError, match=f"config\\.{path}:"):
            configlib.validate(cfg)
    cfg = tiny.get_config(variant)
    with cfg.unlocked():
        del cfg.train["log_every"]
    with pytest.raises(configlib.ConfigError, match=r"config\.train\.log_every"):
        configlib.validate(cfg)


def test_latent_loss_decay_steps_take_the_latent_term_from_full_weight_to_zero_on_a_cosine():
    cfg, model, batch, boxed = _sharding_setup()
    params = numpy_params(boxed, seed=7)
    loss_config = copy.deepcopy(cfg.loss)  # the setup is shared: leave its config alone
    weight, decay = 0.5, 100
    loss_config.latent_loss_weight = weight
    loss_config.latent_loss_decay_steps = decay
    fn = jax.jit(train_step.make_loss_fn(model, loss_config))
    for step, expected in ((0, weight), (decay // 4, weight * 0.5 * (1 + np.cos(np.pi / 4))),
                           (decay // 2, weight / 2), (decay, 0.0), (3 * decay, 0.0)):
        loss, metrics = fn(params, batch, jax.random.key(0), step)
        np.testing.assert_allclose(metrics["latent_loss_weight"], expected, atol=1e-7)
        np.testing.assert_allclose(loss, metrics["text_loss"] + expected * metrics["latent_loss"], rtol=1e-6)
    assert metrics["latent_loss"] > 0  # the term is there to drop: 0 x a positive loss
    # Off (the default): the weight is constant and no schedule metric is logged.
    loss_config.latent_loss_decay_steps = 0
    loss, metrics = jax.jit(train_step.make_loss_fn(model, loss_config))(params, batch, jax.random.key(0), 10**6)
    np.testing.assert_allclose(loss, metrics["text_loss"] + weight * metrics["latent_loss"], rtol=1e-6)
    assert "latent_loss_weight" not in metrics


def test_combiner_outputs_only_gives_the_same_model_outputs():
    """`model.combiner_outputs_only` changes the work, not the values (unrolled: the same params)."""
    cfg, lean, params, _ = _setup("transformer")
    assert cfg.model.combiner_outputs_only and not cfg.model.scan_layers
    full = Mirasol3B(make_config(VARIANTS["transformer"], combiner_outputs_only=False).model)
    batch = make_batch(cfg.model)
    chex.assert_trees_all_equal_shapes_and_dtypes(
        params, nn.unbox(jax.eval_shape(full.init, jax.random.key(0), batch)["params"]))
    compiled = [jax.jit(m.apply).lower({"params": params}, batch).compile() for m in (full, lean)]
    want, got = (c({"params": params}, batch) for c in compiled)
    for key in ("logits", "latents", "predictions"):
        np.testing.assert_allclose(got[key], want[key], atol=1e-5, rtol=1e-5, err_msg=key)
    full_flops, lean_flops = (c.cost_analysis()["flops"] for c in compiled)
    assert lean_flops < 0.95 * full_flops  # and it is less work


def _with(batch: dict, **changes) -> dict:
    out = {k: v for k, v in batch.items() if k not in changes}
    out.update({k: v for k, v in changes.items() if v is not None})
    return out


def _sds(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype)


@pytest.mark.parametrize("change, message", [
    ({"video": None}, r"video must be \[batch=2, frames, H, W, 3\] \(RGB\), got None"),
    ({"video": _sds((2, 8, 32, 32), np.uint8)}, r"video must be .*got \(2, 8, 32, 32\)"),
    ({"video": _sds((3, 8, 32, 32, 3), np.uint8)}, r"video must be \[batch=2"),
    ({"video": _sds((2, 8, 32, 32, 3), np.int32)}, "video must be uint8 .* or float"),
    ({"audio": _sds((2, 16000, 2), np.float32)}, r"audio must be a mono waveform \[batch=2, samples\]"),
    ({"audio": _sds((2, 16000), np.int16)}, "int16 PCM: divide by 32768"),
    ({"media_mask": _sds((2, 4), np.float32)}, r"media_mask must be bool \[batch, snippets\]"),
    ({"text_inputs": _sds((2, 100), np.int32)}, r"text of 100 tokens is longer than model.text_decoder.max_length"),
])
def test_bad_inputs_name_the_field_before_anything_runs(change, message):
    cfg = tiny.get_config()
    batch = train_state.example_batch(cfg, 2)
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(lambda b: Mirasol3B(cfg.model).init(jax.random.key(0), b), _with(batch, **change))
