"""Generation over the KV cache behaves exactly like the teacher-forced model."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from configs import tiny
from mirasol3b import decoding
from mirasol3b.model import Mirasol3B, samples_per_snippet

# Cached decoding reorders no arithmetic that matters in float32: measured max |diff| ~1e-6.
DECODE_ATOL = 1e-5
BATCH, SNIPPETS, PROMPT_LEN, NEW = 3, 4, 6, 5
PROMPT_LENGTHS = np.array([6, 3, 4])


_GENERATE_FNS = {}


def _generate(model, params, batch, config, rng=None):
    """Reuses one compiled function per (model, config): compiles dominate this file's run time."""
    key = (id(model), config)
    if key not in _GENERATE_FNS:
        _GENERATE_FNS[key] = decoding.make_generate_fn(model, config)
    return _GENERATE_FNS[key](params, batch, jax.random.key(0) if rng is None else rng)


def _setup(arg):
    cfg = tiny.get_config(arg)
    # Smaller than tiny (compile time), but a two-layer decoder so the stacked caches are exercised.
    for name in ("video_encoder", "audio_encoder", "combiner_transformer", "time_aligned", "text_decoder"):
        cfg.model[name].update(width=32, depth=1, num_heads=2, mlp_dim=64)
    cfg.model.text_decoder.depth = 2
    model = Mirasol3B(cfg.model)
    rng = np.random.default_rng(0)
    frames = SNIPPETS * cfg.model.video.snippet_frames
    size = cfg.model.video.image_size
    seq = jnp.asarray(rng.integers(3, cfg.model.vocab_size, (BATCH, PROMPT_LEN + NEW + 1)), jnp.int32)
    batch = {
        "video": jnp.asarray(rng.integers(0, 256, (BATCH, frames, size, size, 3)), jnp.uint8),
        "audio": jnp.asarray(rng.normal(size=(BATCH, SNIPPETS * samples_per_snippet(cfg.model))), jnp.float32),
        # Rows with padded snippets: decoding must mask them like the forward pass does.
        "media_mask": jnp.array([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]], bool),
        "text_inputs": seq,
    }
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), batch)["params"])
    prompts = jnp.where(jnp.arange(PROMPT_LEN)[None] < PROMPT_LENGTHS[:, None], seq[:, :PROMPT_LEN], 0)
    gen_batch = {k: batch[k] for k in ("video", "audio", "media_mask")}
    gen_batch.update(prompts=prompts, prompt_lengths=jnp.asarray(PROMPT_LENGTHS, jnp.int32))
    return model, params, batch, gen_batch


@pytest.fixture(scope="module", params=["", "ttm"], ids=["transformer", "ttm"])
def setup(request):
    return _setup(request.param)


@pytest.fixture(scope="module")
def transformer_setup():
    return _setup("")


def test_cached_decoding_equals_full_forward(setup):
    model, params, batch, gen = setup
    full = model.apply({"params": params}, batch)["logits"]
    media = model.apply({"params": params}, batch["video"], batch["audio"], batch["media_mask"],
                        method=Mirasol3B.encode_media)
    window = decoding.right_align(gen["prompts"], gen["prompt_lengths"], PROMPT_LEN + NEW)
    cache = decoding.init_cache(model, params, media, BATCH, PROMPT_LEN + NEW)
    step = jax.jit(functools.partial(decoding.decoder_step, model))  # one compile for all 5 steps
    logits, cache = step(params, cache, window.tokens, window.positions, 0, window.slot_valid,
                         media["media_token_mask"], media["media"])
    rows = np.arange(BATCH)
    np.testing.assert_allclose(logits[:, -1], full[rows, PROMPT_LENGTHS - 1], atol=DECODE_ATOL)
    for j in range(NEW):
        # Teacher forcing: feed each row's true next token at its own position.
        tokens = batch["text_inputs"][rows, PROMPT_LENGTHS + j][:, None]
        logits, cache = step(params, cache, tokens, (PROMPT_LENGTHS + j)[:, None], PROMPT_LEN + j,
                             window.slot_valid, media["media_token_mask"])
        np.testing.assert_allclose(logits[:, 0], full[rows, PROMPT_LENGTHS + j], atol=DECODE_ATOL)


def test_prompts_of_different_lengths_decode_as_if_alone(transformer_setup):
    model, params, _, gen = transformer_setup
    config = decoding.DecodeConfig(max_new_tokens=NEW, eos_id=-1)
    together = _generate(model, params, gen, config)["tokens"]
    for row in range(BATCH):
        alone = _generate(model, params, jax.tree.map(lambda x, r=row: x[r:r + 1], gen), config)["tokens"]
        np.testing.assert_array_equal(alone[0], together[row])


def _with_answers(batch, gen, answers):
    """The batch whose text is each row's prompt followed by `answers`, right-padded to one shape."""
    rows = []
    for row in range(BATCH):
        n = PROMPT_LENGTHS[row]
        seq = jnp.concatenate([gen["prompts"][row, :n], answers[row]])
        rows.append(jnp.pad(seq, (0, PROMPT_LEN + NEW - seq.shape[0])))
    return batch | {"text_inputs": jnp.stack(rows)}


def _answer_logits(model, params, batch, gen, answers):
    """`[batch, NEW, vocab]`: the teacher-forced logits that predict each answer token."""
    logits = model.apply({"params": params}, _with_answers(batch, gen, answers))["logits"]
    idx = PROMPT_LENGTHS[:, None] - 1 + np.arange(NEW)[None]
    return jnp.take_along_axis(logits, jnp.asarray(idx)[:, :, None], axis=1)


def test_greedy_is_the_argmax_of_the_teacher_forced_model(transformer_setup):
    model, params, batch, gen = transformer_setup
    out = _generate(model, params, gen, decoding.DecodeConfig(max_new_tokens=NEW, eos_id=-1))["tokens"]
    np.testing.assert_array_equal(jnp.argmax(_answer_logits(model, params, batch, gen, out), -1), out)


def test_beam_one_equals_greedy(setup):
    model, params, _, gen = setup
    greedy = _generate(model, params, gen, decoding.DecodeConfig(max_new_tokens=NEW, eos_id=-1))
    beam = _generate(model, params, gen,
                             decoding.DecodeConfig(max_new_tokens=NEW, eos_id=-1, method="beam", beam_size=1))
    np.testing.assert_array_equal(beam["tokens"], greedy["tokens"])
    np.testing.assert_allclose(beam["scores"], greedy["scores"], rtol=1e-5)


def _sequence_logprob(model, params, batch, gen, tokens):
    """Summed log-probability of `tokens` after each prompt, from the full forward pass."""
    logp = jax.nn.log_softmax(_answer_logits(model, params, batch, gen, tokens))
    return np.asarray(jnp.take_along_axis(logp, tokens[:, :, None], axis=-1)[..., 0].sum(-1))


def test_beam_search_scores_are_sequence_log_probabilities(transformer_setup):
    model, params, batch, gen = transformer_setup
    config = decoding.DecodeConfig(max_new_tokens=NEW, eos_id=-1, method="beam", beam_size=4)
    beam = _generate(model, params, gen, config)
    np.testing.assert_allclose(beam["scores"], _sequence_logprob(model, params, batch, gen, beam["tokens"]),
                               rtol=1e-4)
    greedy = _generate(model, params, gen, decoding.DecodeConfig(max_new_tokens=NEW, eos_id=-1))
    # Not guaranteed in general, but a wider beam never loses to greedy on these rows: a regression
    # in the beam bookkeeping shows up here first.
    assert np.all(np.asarray(beam["scores"]) >= np.asarray(greedy["scores"]) - 1e-4)


def test_beam_scores_with_a_length_penalty_are_log_probabilities_over_the_penalty(transformer_setup):
    """Each answer's score is its full-forward log-probability over ((5 + length) / 6) ** alpha."""
    model, params, batch, gen = transformer_setup
    alpha = 0.6
    out = _generate(model, params, gen, decoding.DecodeConfig(max_new_tokens=NEW, eos_id=-1, method="beam",
                                                              beam_size=4, length_penalty=alpha))
    np.testing.assert_allclose(out["scores"], _sequence_logprob(model, params, batch, gen, out["tokens"])
                               / ((5 + NEW) / 6) ** alpha, rtol=1e-4)


def test_generation_stops_at_eos(transformer_setup):
    model, params, _, gen = transformer_setup
    free = _generate(model, params, gen, decoding.DecodeConfig(max_new_tokens=NEW, eos_id=-1))["tokens"]
    eos = int(free[0, 2])
    stops = []
    for method in ("greedy", "beam"):
        out = _generate(model, params, gen, decoding.DecodeConfig(
            max_new_tokens=NEW, eos_id=eos, pad_id=0, method=method, beam_size=1))["tokens"]
        for row in range(BATCH):
            hits = np.flatnonzero(np.asarray(free[row]) == eos)
            stop = hits[0] + 1 if hits.size else NEW
            if method == "greedy":
                stops.append(stop)
                np.testing.assert_array_equal(out[row, :stop], free[row, :stop])
            else:  # beam keeps finished hypotheses: an early EOS can beat greedy's longer answer
                own = np.flatnonzero(np.asarray(out[row]) == eos)
                stop = own[0] + 1 if own.size else NEW
            assert np.all(np.asarray(out[row, stop:]) == 0), f"{method}: tokens after EOS must be padding"
    assert min(stops) < NEW, "the chosen EOS must cut at least one row short, or this test proves nothing"


def test_sampling_is_seeded_and_top_k_one_is_greedy(transformer_setup):
    model, params, _, gen = transformer_setup
    greedy = _generate(model, params, gen, decoding.DecodeConfig(max_new_tokens=NEW, eos_id=-1))
    sample = decoding.DecodeConfig(max_new_tokens=NEW, eos_id=-1, method="sample", temperature=2.0)
    a, b, c = (_generate(model, params, gen, sample, jax.random.key(s))["tokens"] for s in (1, 1, 2))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c), "different seeds at temperature 2 should differ somewhere"
    top1 = _generate(model, params, gen, decoding.DecodeConfig(
        max_new_tokens=NEW, eos_id=-1, method="sample", temperature=2.0, top_k=1), jax.random.key(3))
    np.testing.assert_array_equal(top1["tokens"], greedy["tokens"])


def test_sampling_draws_from_the_softmax_at_its_temperature():
    logits = jnp.log(jnp.array([0.6, 0.3, 0.1]))
    n = 40_000
    for temperature in (0.5, 1.0, 2.0):
        config = decoding.DecodeConfig(method="sample", temperature=temperature)
        tokens = decoding.choose_token(jnp.tile(logits, (n, 1)), jax.random.key(7), config)
        frequencies = np.bincount(np.asarray(tokens), minlength=3) / n
        expected = np.asarray(jax.nn.softmax(logits / temperature))
        np.testing.assert_allclose(frequencies, expected, atol=0.01)  # 4 standard errors at most
    assert int(decoding.choose_token(logits[None], jax.random.key(0), decoding.DecodeConfig(
        method="sample", temperature=0.0))[0]) == 0  # temperature 0: greedy


def test_filter_logits_top_k_and_top_p():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda x: np.flatnonzero(np.asarray(x[0]) > decoding.NEG_INF / 2).tolist()  # noqa: E731
    assert kept(decoding.filter_logits(logits, top_k=2)) == [0, 1]
    assert kept(decoding.filter_logits(logits, top_p=0.75)) == [0, 1]
    assert kept(decoding.filter_logits(logits, top_p=0.85)) == [0, 1, 2]
    assert kept(decoding.filter_logits(logits, top_p=0.1)) == [0]
    assert kept(decoding.filter_logits(logits[:, ::-1], top_k=1)) == [3]
    # Ties (common in bf16): exactly k tokens, the lowest ids first, as argmax would pick.
    tied = jnp.array([[1.0, 2.0, 2.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
    assert kept(decoding.filter_logits(tied, top_k=1)) == [1]
    assert kept(decoding.filter_logits(tied, top_k=2)[1:]) == [0, 1]


def test_cross_attention_keys_values_come_from_the_cache(transformer_setup):
    """Decode steps get no media at all; the cached cross-attention keys/values are what they read."""
    model, params, _, gen = transformer_setup
    media = model.apply({"params": params}, gen["video"], gen["audio"], gen["media_mask"],
                        method=Mirasol3B.encode_media)
    window = decoding.right_align(gen["prompts"], gen["prompt_lengths"], PROMPT_LEN + 1)
    cache = decoding.init_cache(model, params, media, BATCH, PROMPT_LEN + 1)
    _, cache = decoding.decoder_step(model, params, cache, window.tokens, window.positions, 0, window.slot_valid,
                                     media["media_token_mask"], media["media"])
    step = lambda c: decoding.decoder_step(  # noqa: E731
        model, params, c, window.tokens[:, -1:], gen["prompt_lengths"][:, None], PROMPT_LEN, window.slot_valid,
        media["media_token_mask"])[0]
    wiped = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.zeros_like(x) if "cross_attention" in jax.tree_util.keystr(path) else x, cache)
    assert not np.allclose(step(cache), step(wiped))


def test_decode_config_and_length_are_checked(transformer_setup):
    model, params, _, gen = transformer_setup
    with pytest.raises(ValueError, match="method"):
        decoding.DecodeConfig(method="nucleus")
    with pytest.raises(ValueError, match="top_p"):
        decoding.DecodeConfig(top_p=0.0)
    with pytest.raises(ValueError, match="length_penalty"):
        decoding.DecodeConfig(method="beam", length_penalty=-0.5)
    # A top-k of the vocabulary or more keeps every token (no error from lax.top_k).
    logits = jnp.array([[0.0, 1.0, 2.0]])
    np.testing.assert_array_equal(decoding.filter_logits(logits, top_k=5), logits)
    with pytest.raises(ValueError, match="max_length"):
        _generate(model, params, gen, decoding.DecodeConfig(max_new_tokens=1000))
