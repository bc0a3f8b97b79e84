"""Answer generation over the KV cache: greedy, temperature/top-k/top-p sampling, beam search.

Per request the media is encoded once (`Mirasol3B.encode_media`), the cross-attention keys and
values are computed once at prefill, and each new token costs one cached decoder step.

Prompts come right-padded (`prompts [batch, prompt_len]` with `prompt_lengths [batch]`). They are
moved to the right end of the prompt window, so every row writes its next token to the same cache
slot; the padding slots on the left are masked out and positions restart at 0 for each row, so a
row decodes exactly as it would alone.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from mirasol3b.layers import masks
from mirasol3b.model import Mirasol3B

METHODS = ("greedy", "sample", "beam")
NEG_INF = -1e30


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """How to generate. `temperature == 0` with method 'sample' is greedy."""

    max_new_tokens: int = 32
    eos_id: int = 1
    pad_id: int = 0
    method: str = "greedy"
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k filtering
    top_p: float = 1.0  # 1: no nucleus filtering
    beam_size: int = 4
    length_penalty: float = 0.0  # alpha of ((5 + len) / 6) ** alpha; 0: raw log-probability

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"DecodeConfig.method must be one of {METHODS}, got {self.method!r}")
        if self.max_new_tokens <= 0:
            raise ValueError(f"DecodeConfig.max_new_tokens must be positive, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"DecodeConfig.temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"DecodeConfig.top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"DecodeConfig.top_p must be in (0, 1], got {self.top_p}")
        if self.beam_size <= 0:
            raise ValueError(f"DecodeConfig.beam_size must be positive, got {self.beam_size}")
        if self.length_penalty < 0:
            # Beam search stops early on the bound alive_logp / penalty(max_len), which holds only
            # for penalties that grow with length.
            raise ValueError(f"DecodeConfig.length_penalty must be >= 0, got {self.length_penalty}")


# ---- the cached decoder, step by step ---------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PromptWindow:
    """Prompts moved to the right end of a `[batch, prompt_len]` window."""

    tokens: jax.Array  # [batch, prompt_len]
    positions: jax.Array  # [batch, prompt_len]; 0 at each row's first real token
    slot_valid: jax.Array  # [batch, cache_len]; False for the padding slots left of each prompt


def right_align(prompts: jax.Array, prompt_lengths: jax.Array, cache_length: int) -> PromptWindow:
    """Moves each right-padded prompt to end at slot `prompt_len - 1`."""
    batch, prompt_len = prompts.shape
    shift = prompt_len - prompt_lengths.astype(jnp.int32)  # [batch]
    tokens = jax.vmap(jnp.roll)(prompts, shift)
    slots = jnp.arange(prompt_len)[None, :]
    positions = jnp.maximum(slots - shift[:, None], 0)
    slot_valid = jnp.arange(cache_length)[None, :] >= shift[:, None]
    return PromptWindow(tokens, positions, slot_valid)


def init_cache(model: Mirasol3B, params, media: dict, batch: int, cache_length: int):
    """Zeros for every decoder cache (self-attention `[batch, ..., cache_length, ...]`, cross-attention)."""
    def shapes():
        dummy = jnp.zeros((batch, cache_length), jnp.int32)
        return model.apply({"params": params}, dummy, media["media"], media["media_token_mask"], decode=True,
                           method=Mirasol3B.decode_text, mutable=["cache"])[1]["cache"]
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(shapes))


def decoder_step(model: Mirasol3B, params, cache, tokens: jax.Array, positions: jax.Array, slot: jax.Array | int,
                 slot_valid: jax.Array, media_token_mask: jax.Array, media: jax.Array | None = None):
    """Runs `tokens [batch, n]` written at cache slots `slot .. slot + n - 1`.

    Pass `media` on the first (prefill) call only: its cross-attention keys/values are cached then.
    Returns (logits [batch, n, vocab], new cache).
    """
    n = tokens.shape[1]
    query_slots = jnp.broadcast_to(slot + jnp.arange(n), tokens.shape)
    mask = masks.cached_causal(query_slots, slot_valid.shape[1], slot_valid)
    logits, updated = model.apply(
        {"params": params, "cache": cache}, tokens, media, media_token_mask, positions=positions, mask=mask,
        cache_index=jnp.asarray(slot, jnp.int32), decode=True, method=Mirasol3B.decode_text, mutable=["cache"])
    return logits, updated["cache"]


# ---- choosing tokens --------------------------------------------------------------------------

def filter_logits(logits: jax.Array, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """Keeps the top-k tokens and the smallest set whose probability reaches top_p; others -> -inf."""
    if 0 < top_k < logits.shape[-1]:  # a k of the vocabulary or more keeps every token
        # Exactly k (the lowest ids among ties): a threshold on the k-th value would keep every
        # token tied with it, and bf16 logits tie often; top_k=1 must be greedy.
        chosen = jax.lax.top_k(logits, top_k)[1]
        keep = jnp.any(chosen[..., None] == jnp.arange(logits.shape[-1]), axis=-2)
        logits = jnp.where(keep, logits, NEG_INF)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        # The token that crosses top_p is kept; at least one token always is.
        keep = mass_before < top_p
        threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, NEG_INF, logits)
    return logits


def choose_token(logits: jax.Array, rng: jax.Array, config: DecodeConfig) -> jax.Array:
    """`logits [batch, vocab]` -> `[batch]` int32."""
    if config.method == "greedy" or config.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = filter_logits(logits / config.temperature, config.top_k, config.top_p)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def length_penalty(length: jax.Array, alpha: float) -> jax.Array:
    return ((5.0 + length.astype(jnp.float32)) / 6.0) ** alpha


# ---- generation -------------------------------------------------------------------------------

def _prefill(model, params, batch, config: DecodeConfig, encoded: bool):
    media = batch if encoded else model.apply({"params": params}, batch.get("video"), batch.get("audio"),
                                              batch["media_mask"], method=Mirasol3B.encode_media)
    prompts = batch["prompts"]
    cache_length = prompts.shape[1] + config.max_new_tokens
    if cache_length > model.config.text_decoder.max_length:
        raise ValueError(f"prompt length {prompts.shape[1]} + max_new_tokens {config.max_new_tokens} exceeds "
                         f"model.text_decoder.max_length ({model.config.text_decoder.max_length})")
    window = right_align(prompts, batch["prompt_lengths"], cache_length)
    cache = init_cache(model, params, media, prompts.shape[0], cache_length)
    logits, cache = decoder_step(model, params, cache, window.tokens, window.positions, 0, window.slot_valid,
                                 media["media_token_mask"], media["media"])
    return logits[:, -1], cache, window, media["media_token_mask"]


def _sample_loop(model, params, batch, rng, config: DecodeConfig, encoded: bool):
    logits, cache, window, media_mask = _prefill(model, params, batch, config, encoded)
    b, prompt_len = window.tokens.shape
    lengths = batch["prompt_lengths"].astype(jnp.int32)

    def cond(state):
        i, _, _, done, _, _, _ = state
        return jnp.logical_and(i < config.max_new_tokens, ~jnp.all(done))

    def body(state):
        i, logits, cache, done, out, logprob, rng = state
        rng, step_rng = jax.random.split(rng)
        token = choose_token(logits, step_rng, config)
        token_logprob = jnp.take_along_axis(jax.nn.log_softmax(logits), token[:, None], axis=-1)[:, 0]
        token = jnp.where(done, config.pad_id, token)
        logprob = logprob + jnp.where(done, 0.0, token_logprob)
        out = out.at[:, i].set(token)
        done = jnp.logical_or(done, token == config.eos_id)
        logits, cache = decoder_step(model, params, cache, token[:, None], (lengths + i)[:, None],
                                     prompt_len + i, window.slot_valid, media_mask)
        return i + 1, logits[:, 0], cache, done, out, logprob, rng

    out = jnp.full((b, config.max_new_tokens), config.pad_id, jnp.int32)
    state = (jnp.int32(0), logits, cache, jnp.zeros((b,), bool), out, jnp.zeros((b,), jnp.float32), rng)
    _, _, _, _, out, logprob, _ = jax.lax.while_loop(cond, body, state)
    return {"tokens": out, "scores": logprob}


def _beam_loop(model, params, batch, config: DecodeConfig, encoded: bool):
    logits, cache, window, media_mask = _prefill(model, params, batch, config, encoded)
    b, prompt_len = window.tokens.shape
    k, steps, vocab = config.beam_size, config.max_new_tokens, logits.shape[-1]
    lengths = jnp.repeat(batch["prompt_lengths"].astype(jnp.int32), k)
    expand = lambda x: jnp.repeat(x, k, axis=0)  # noqa: E731  [b, ...] -> [b * k, ...]
    cache, slot_valid, media_mask = jax.tree.map(expand, (cache, window.slot_valid, media_mask))
    logits = expand(logits)

    alive_seqs = jnp.full((b, k, steps), config.pad_id, jnp.int32)
    alive_logp = jnp.tile(jnp.array([0.0] + [NEG_INF] * (k - 1)), (b, 1))  # only beam 0 starts
    fin_seqs = jnp.full((b, k, steps), config.pad_id, jnp.int32)
    fin_scores = jnp.full((b, k), NEG_INF)

    def cond(state):
        i, _, _, alive_logp, _, _, fin_scores = state
        # Log-probabilities only fall and alpha >= 0 penalties only grow, so this bounds any alive beam.
        best_possible = alive_logp[:, 0] / length_penalty(jnp.int32(steps), config.length_penalty)
        hopeless = jnp.all(fin_scores[:, -1] > best_possible)
        return jnp.logical_and(i < steps, ~hopeless)

    def body(state):
        i, logits, cache, alive_logp, alive_seqs, fin_seqs, fin_scores = state
        logp = jax.nn.log_softmax(logits).reshape(b, k, vocab)
        scores = (alive_logp[:, :, None] + logp).reshape(b, k * vocab)
        top_scores, top_idx = jax.lax.top_k(scores, 2 * k)
        beam, token = top_idx // vocab, (top_idx % vocab).astype(jnp.int32)
        seqs = jnp.take_along_axis(alive_seqs, beam[:, :, None], axis=1).at[:, :, i].set(token)
        is_eos = token == config.eos_id

        normalised = top_scores / length_penalty(i + 1, config.length_penalty)
        all_fin_scores = jnp.concatenate([fin_scores, jnp.where(is_eos, normalised, NEG_INF)], axis=1)
        fin_scores, pick = jax.lax.top_k(all_fin_scores, k)
        fin_seqs = jnp.take_along_axis(jnp.concatenate([fin_seqs, seqs], axis=1), pick[:, :, None], axis=1)

        alive_logp, pick = jax.lax.top_k(jnp.where(is_eos, NEG_INF, top_scores), k)
        alive_seqs = jnp.take_along_axis(seqs, pick[:, :, None], axis=1)
        parent = jnp.take_along_axis(beam, pick, axis=1)  # [b, k]
        rows = (jnp.arange(b)[:, None] * k + parent).reshape(-1)
        cache = jax.tree.map(lambda x: x[rows], cache)
        tokens = jnp.take_along_axis(token, pick, axis=1).reshape(-1, 1)
        logits, cache = decoder_step(model, params, cache, tokens, (lengths + i)[:, None], prompt_len + i,
                                     slot_valid, media_mask)
        return i + 1, logits[:, 0], cache, alive_logp, alive_seqs, fin_seqs, fin_scores

    state = (jnp.int32(0), logits, cache, alive_logp, alive_seqs, fin_seqs, fin_scores)
    i, _, _, alive_logp, alive_seqs, fin_seqs, fin_scores = jax.lax.while_loop(cond, body, state)
    # Beams that ran to the length limit without EOS compete with the finished ones.
    alive_scores = alive_logp / length_penalty(i, config.length_penalty)
    all_scores = jnp.concatenate([fin_scores, alive_scores], axis=1)
    all_seqs = jnp.concatenate([fin_seqs, alive_seqs], axis=1)
    best = jnp.argmax(all_scores, axis=1)
    return {"tokens": all_seqs[jnp.arange(b), best], "scores": all_scores[jnp.arange(b), best]}


def make_generate_fn(model: Mirasol3B, config: DecodeConfig, *, encoded: bool = False) -> Callable:
    """A jitted `generate(params, batch, rng) -> {'tokens': [batch, max_new_tokens], 'scores': [batch]}`.

    `batch` holds `video`, `audio`, `media_mask` (as in training), `prompts [batch, prompt_len]`
    int32 right-padded and `prompt_lengths [batch]`. With `encoded`, it holds the media already
    encoded instead: `media [batch, media_tokens, width]` and `media_token_mask` (as
    `Mirasol3B.encode_media` or a stream gives them). Tokens after EOS are `pad_id`; `scores` are
    summed log-probabilities (length-normalised for beam search).
    """
    if config.method == "beam":
        fn = lambda params, batch, rng: _beam_loop(model, params, batch, config, encoded)  # noqa: E731
    else:
        fn = functools.partial(_sample_loop, model, config=config, encoded=encoded)
    return jax.jit(fn)


def generate(model: Mirasol3B, params, batch: dict, config: DecodeConfig = DecodeConfig(),
             rng: jax.Array | None = None) -> dict:
    """One-off generation (compiles each call; keep `make_generate_fn`'s result to reuse it)."""
    rng = jax.random.key(0) if rng is None else rng
    return make_generate_fn(model, config)(params, batch, rng)
