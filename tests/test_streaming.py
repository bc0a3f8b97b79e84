"""Streaming == offline: after snippets 0..t a stream's features, answers and their evidence are those
of the clip cut after snippet t, for both Combiners, with and without a time-aligned window, with masked snippets;
the bounded state stays bounded."""

import chex
import jax
import numpy as np
import pytest

from configs import tiny
from mirasol3b import configlib, decoding, evidence
from mirasol3b.model import Mirasol3B, samples_per_snippet
from mirasol3b.streaming import Stream, prompt_row

SNIPPETS = 6
ASKED_AFTER = (2, SNIPPETS - 1)


def make_config(combiner="transformer", window=0, context="all", read_memory=False):
    cfg = tiny.get_config("ttm=True" if combiner == "ttm" else None)
    with cfg.unlocked():
        for stack in configlib.STACKS:  # compile time
            cfg.model[stack].update(width=32, depth=1, num_heads=2, mlp_dim=64)
        cfg.model.time_aligned.depth = 2  # a window's reach grows with depth: two layers test it
        cfg.model.ttm.token_learner_hidden = 16
        if combiner == "ttm":  # configs/tiny.py:long's TTM options, and snippet positions
            cfg.model.combiner_readout = "per_modality"
            cfg.model.ttm.update(write="gated", snippet_positions=True)
            cfg.model.text_decoder.memory_read_tokens = 2
        cfg.model.time_aligned.window = window
        cfg.model.text_decoder.update(context=context, recent_snippets=2, read_memory=read_memory)
    return configlib.validate(cfg)


def clip(cfg, batch=2, snippets=SNIPPETS, seed=0):
    rng = np.random.default_rng(seed)
    frames, samples = cfg.model.video.snippet_frames, samples_per_snippet(cfg.model)
    size = cfg.model.video.image_size
    return (rng.integers(0, 256, (batch, snippets * frames, size, size, 3), dtype=np.uint8),
            rng.uniform(-0.5, 0.5, (batch, snippets * samples)).astype(np.float32))


def init(cfg, video, audio, mask):
    model = Mirasol3B(cfg.model)
    batch = {"video": video, "audio": audio, "media_mask": mask, "text_inputs": np.zeros((video.shape[0], 4), np.int32)}
    return model, jax.jit(model.init)(jax.random.key(0), batch)["params"]


CASES = {  # combiner, window, decoder context, read_memory
    "transformer, no window, all": ("transformer", 0, "all", False),
    "transformer, window 3, recent": ("transformer", 3, "recent", False),
    "ttm, window 2, recent + memory": ("ttm", 2, "recent", True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_stream_equals_the_clip_cut_after_each_snippet(case):
    cfg = make_config(*CASES[case])
    video, audio = clip(cfg)
    mask = np.ones((2, SNIPPETS), bool)
    mask[0, 4] = mask[1, 1] = mask[1, 2] = False  # padded snippets: one row's two in a row
    model, params = init(cfg, video, audio, mask)
    frames, samples, m = cfg.model.video.snippet_frames, samples_per_snippet(cfg.model), cfg.model.num_latents
    prompts = np.zeros((2, cfg.data.text_length), np.int32)
    prompts[:, 1:6] = [[72, 101, 108, 108, 111], [119, 104, 97, 116, 0]]
    lengths = np.array([6, 5], np.int32)
    greedy = decoding.DecodeConfig(max_new_tokens=4)
    offline_generate = decoding.make_generate_fn(model, greedy)
    encode = jax.jit(lambda p, v, a, k: model.apply({"params": p}, v, a, k, method=Mirasol3B.encode_media))
    logits = jax.jit(lambda p, media, media_mask: model.apply({"params": p}, prompts, media, media_mask,
                                                             method=Mirasol3B.decode_text))

    # Features: every push against the whole clip (block-causal: the same as each cut's, which the
    # asks below check too); answers: asked after snippet 2, and after the last.
    whole = encode(params, video, audio, mask)["features"]
    stream = Stream(model, params, batch=2, capacity=4)  # capacity 4: window 0 doubles its state at push 5
    pushed = []
    for t in range(SNIPPETS):
        features = stream.push(video[:, t * frames:(t + 1) * frames], audio[:, t * samples:(t + 1) * samples], mask[:, t])
        chex.assert_shape(features, (2, m, cfg.model.time_aligned.width))
        pushed.append(np.asarray(features))
        real = mask[:, t]  # a padded snippet's features are never read (its keys are masked)
        np.testing.assert_allclose(pushed[t][real], np.asarray(whole[:, t])[real], atol=1e-5, rtol=0)
        if t not in ASKED_AFTER:
            continue
        cut = (video[:, :(t + 1) * frames], audio[:, :(t + 1) * samples], mask[:, :t + 1])
        offline = encode(params, *cut)
        np.testing.assert_allclose(np.stack(pushed, 1)[cut[2]], np.asarray(offline["features"])[cut[2]],
                                   atol=1e-5, rtol=0)
        media, media_mask = stream.media()
        np.testing.assert_allclose(logits(params, media, media_mask),
                                   logits(params, offline["media"], offline["media_token_mask"]), atol=1e-5, rtol=0)
        streamed = stream.ask(prompts, lengths, greedy)["tokens"]
        expected = offline_generate(params, {"video": cut[0], "audio": cut[1], "media_mask": cut[2], "prompts": prompts,
                                             "prompt_lengths": lengths}, jax.random.key(0))["tokens"]
        np.testing.assert_array_equal(streamed, expected)
    # The answer's evidence: the stream's, mapped from its slots to snippets, is the clip's.
    streamed_evidence = stream.evidence(prompts, lengths, streamed, eos_id=greedy.eos_id)
    offline_evidence = jax.jit(lambda *args: evidence.context_scores(model, params, args[0], args[1], SNIPPETS,
                                                                     *args[2:], greedy.eos_id))(
        offline["media"], offline["media_token_mask"], prompts, lengths, expected)
    np.testing.assert_allclose(streamed_evidence["scores"], offline_evidence["scores"], atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(streamed_evidence["memory_share"], offline_evidence["memory_share"], atol=1e-5)
    assert np.all(streamed_evidence["scores"][~mask] == 0)
    assert stream.pushed == SNIPPETS and int(stream.state.snippets) == SNIPPETS
    np.testing.assert_array_equal(stream.state.real, mask.sum(1))


def test_stream_beam_and_sampling_equal_offline():
    cfg = make_config("ttm", 2, "recent", True)
    video, audio = clip(cfg, batch=1, snippets=4)
    mask = np.ones((1, 4), bool)
    model, params = init(cfg, video, audio, mask)
    stream = Stream(model, params)
    frames, samples = cfg.model.video.snippet_frames, samples_per_snippet(cfg.model)
    for t in range(4):
        stream.push(video[:, t * frames:(t + 1) * frames], audio[:, t * samples:(t + 1) * samples])
    prompts, lengths = prompt_row([104, 105], cfg.data.text_length, 0, 0)
    for method in (decoding.DecodeConfig(method="beam", beam_size=3, max_new_tokens=4),
                   decoding.DecodeConfig(method="sample", temperature=2.0, top_k=20, max_new_tokens=4)):
        rng = jax.random.key(3)
        expected = decoding.make_generate_fn(model, method)(
            params, {"video": video, "audio": audio, "media_mask": mask, "prompts": prompts, "prompt_lengths": lengths},
            rng)
        got = stream.ask(prompts, lengths, method, rng)
        np.testing.assert_array_equal(got["tokens"], expected["tokens"])
        np.testing.assert_allclose(got["scores"], expected["scores"], atol=1e-5)


def _state_sizes(cfg, pushes=9):
    """(the stream after `pushes` snippets, its state's bytes after each)."""
    video, audio = clip(cfg, batch=1, snippets=1)
    model, params = init(cfg, video, audio, np.ones((1, 1), bool))
    stream = Stream(model, params, capacity=2)
    sizes = []
    for _ in range(pushes):
        stream.push(video, audio)
        sizes.append(stream.state.nbytes)
    return stream, sizes


def test_bounded_state_stays_bounded_and_window_zero_grows():
    bounded, sizes = _state_sizes(make_config("ttm", 2, "recent", True))
    assert len(set(sizes)) == 1 and bounded.capacity == 2  # nothing doubled
    assert bounded.state.cache_valid.shape == (1, 2) and bounded.state.features.shape[1] == 2
    growing, sizes = _state_sizes(make_config("ttm", 0, "all", False))
    assert growing.capacity == 16 and sizes[-1] > 4 * sizes[0]  # 2 -> 4 -> 8 -> 16 snippets


def test_recent_context_reads_the_last_real_snippets_only():
    cfg = make_config("transformer", 0, "recent")
    video, audio = clip(cfg, batch=2, snippets=5)
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], bool)
    model, params = init(cfg, video, audio, mask)
    out = model.apply({"params": params}, video, audio, mask, method=Mirasol3B.encode_media)
    m = cfg.model.num_latents
    read = np.asarray(out["media_token_mask"]).reshape(2, 5, m)[:, :, 0]
    np.testing.assert_array_equal(read, [[0, 0, 0, 1, 1], [0, 1, 1, 0, 0]])  # recent_snippets = 2


def test_stream_errors_name_what_is_wrong():
    cfg = make_config()
    video, audio = clip(cfg, batch=1, snippets=1)
    model, params = init(cfg, video, audio, np.ones((1, 1), bool))
    stream = Stream(model, params)
    with pytest.raises(ValueError, match="nothing has been pushed"):
        stream.ask(*prompt_row([1], 8, 0, 0))
    with pytest.raises(ValueError, match=r"video has 4 frames; media_mask says 1 snippets of 2 frames"):
        stream.push(np.concatenate([video, video], 1), audio)
    with pytest.raises(ValueError, match=r"valid must be bool \[batch=1\]"):
        stream.push(video, audio, np.ones((2,), bool))
    with cfg.unlocked():
        cfg.model.time_aligned.causal = False
    with pytest.raises(ValueError, match="causal=True"):
        Stream(Mirasol3B(cfg.model), params)
    with pytest.raises(configlib.ConfigError, match="model.text_decoder.read_memory"):
        make_config("transformer", read_memory=True)


def test_prompt_row_matches_the_feature_converter():
    from mirasol3b_data import feature_converter as fc

    import tensorflow as tf

    question = list(b"which colour came first?")
    prompts, lengths = prompt_row(question, 12, fc.BOS_ID, fc.PAD_ID)
    text = fc.build_text(tf.constant(question, tf.int32), tf.constant([65], tf.int32), 12)
    np.testing.assert_array_equal(prompts[0], text["prompts"].numpy())
    assert lengths[0] == int(text["prompt_lengths"])
