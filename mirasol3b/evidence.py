"""Evidence: which snippets a generated answer rests on, and the time spans they make.

A snippet's score is gradient x input: the gradient of the answer's log-probability (the prompt and
the generated tokens, teacher-forced through the text decoder) with respect to that snippet's
tokens, times the tokens, summed over width (|.|) and over the snippet's tokens, then normalised to
sum 1 over the row's real snippets. It needs no training and no change to the model, it follows the
generated answer whichever way it was decoded (greedy, beam, sampling), and a stream computes it
from the state it holds.

Where the tokens are taken (`level`):
  "context"  what the text decoder reads (`Mirasol3B.decoder_context`: the time-aligned features,
             and the TTM memory when it is read). The same in evaluation and in a stream.
  "latents"  the Combiner's outputs, before the time-aligned model: a snippet's features also
             carry what earlier snippets told them (the model is block-causal), its latents only
             its own media. Offline only: a bounded stream no longer holds old latents.
docs/evaluation.md ("Grounding") gives the measurement that chose the default.

Spans (`top_spans`): from the highest-scoring snippet, grow while the neighbours score at least
`threshold` times its score; repeat on what is left; order by the spans' total score.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mirasol3b.model import Mirasol3B

LEVELS = ("context", "latents")
DEFAULT_LEVEL = "context"
SPAN_THRESHOLD = 0.5
MAX_SPANS = 3


def teacher_forced(prompts: jax.Array, prompt_lengths: jax.Array, tokens: jax.Array, eos_id: int,
                   length: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(`inputs [b, length]`, `targets [b, length]`, `weights [b, length]`) of the prompt followed by
    the generated `tokens [b, n]` up to and including their first EOS; `weights` are 1 on the
    answer's targets. `prompts [b, L]` are right-padded and start with BOS, as generation takes them."""
    b, n = tokens.shape
    full = jnp.zeros((b, prompts.shape[1] + n), jnp.int32).at[:, :prompts.shape[1]].set(prompts)
    slots = prompt_lengths[:, None] + jnp.arange(n)[None]
    full = full.at[jnp.arange(b)[:, None], slots].set(tokens)
    is_eos = tokens == eos_id
    answer_length = jnp.where(is_eos.any(axis=1), jnp.argmax(is_eos, axis=1) + 1, n)
    if full.shape[1] - 1 > length:
        full = full[:, :length + 1]
    inputs, targets = full[:, :-1], full[:, 1:]
    target_slot = jnp.arange(1, full.shape[1])[None]
    weights = ((target_slot >= prompt_lengths[:, None]) &
               (target_slot < (prompt_lengths + answer_length)[:, None])).astype(jnp.float32)
    return inputs, targets, weights


def _log_probability(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> jax.Array:
    """Summed over rows: each row's gradient is its own (rows do not interact)."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(picked * weights)


def _relevance(grad: jax.Array, x: jax.Array) -> jax.Array:
    """|gradient . input| per token: `[..., width]` -> `[...]`."""
    return jnp.abs(jnp.sum(grad.astype(jnp.float32) * x.astype(jnp.float32), axis=-1))


def _normalise(scores: jax.Array, valid: jax.Array) -> jax.Array:
    scores = jnp.where(valid, scores, 0.0)
    return scores / jnp.maximum(scores.sum(axis=1, keepdims=True), 1e-30)


def context_scores(model: Mirasol3B, params, media: jax.Array, media_token_mask: jax.Array, snippets: int,
                   prompts, prompt_lengths, tokens, eos_id: int) -> dict[str, jax.Array]:
    """Scores from what the decoder reads, `media [b, K, width]`: its first `snippets * m` tokens are
    snippets' (in order), any after them the TTM memory's. Returns `scores [b, snippets]` (summing to
    1 over snippets with unmasked tokens) and `memory_share [b]` (the fraction of all relevance that
    reached the answer through the memory, which has no time)."""
    m = model.config.num_latents
    inputs, targets, weights = teacher_forced(prompts, prompt_lengths, tokens, eos_id,
                                              model.config.text_decoder.max_length)

    def logp(media):
        logits = model.apply({"params": params}, inputs, media, media_token_mask, method=Mirasol3B.decode_text)
        return _log_probability(logits, targets, weights)

    relevance = _relevance(jax.grad(logp)(media), media) * media_token_mask
    per_snippet = relevance[:, :snippets * m].reshape(relevance.shape[0], snippets, m).sum(axis=2)
    valid = media_token_mask[:, :snippets * m].reshape(-1, snippets, m).any(axis=2)
    memory = relevance[:, snippets * m:].sum(axis=1)
    share = memory / jnp.maximum(per_snippet.sum(axis=1) + memory, 1e-30)
    return {"scores": _normalise(per_snippet, valid), "memory_share": share}


def latent_scores(model: Mirasol3B, params, latents: jax.Array, media_mask: jax.Array, memory: jax.Array | None,
                  prompts, prompt_lengths, tokens, eos_id: int) -> dict[str, jax.Array]:
    """Scores from the Combiner's outputs `latents [b, T, m, width]` (see the module docstring)."""
    inputs, targets, weights = teacher_forced(prompts, prompt_lengths, tokens, eos_id,
                                              model.config.text_decoder.max_length)

    def forward(module: Mirasol3B, latents):
        features, _ = module.time_aligned(latents, media_mask, deterministic=True)
        media, mask = module.decoder_context(features, media_mask, memory)
        return module.decode_text(inputs, media, mask)

    def logp(latents):
        return _log_probability(model.apply({"params": params}, latents, method=forward), targets, weights)

    per_snippet = _relevance(jax.grad(logp)(latents), latents).sum(axis=2)
    return {"scores": _normalise(per_snippet, media_mask.astype(bool)),
            "memory_share": jnp.zeros(latents.shape[0], jnp.float32)}


def make_evidence_fn(model: Mirasol3B, eos_id: int, level: str = DEFAULT_LEVEL):
    """A jitted `fn(params, batch, tokens) -> {'scores' [b, T], 'memory_share' [b]}` for a batch as
    generation takes it (`video`, `audio`, `media_mask`, `prompts`, `prompt_lengths`) and the tokens
    generated for it."""
    if level not in LEVELS:
        raise ValueError(f"evidence level must be one of {LEVELS}, got {level!r}")

    def fn(params, batch, tokens):
        mask = batch["media_mask"]
        args = (batch["prompts"], batch["prompt_lengths"], tokens, eos_id)
        if level == "latents":
            latents, memory = model.apply({"params": params}, batch.get("video"), batch.get("audio"), mask,
                                          method=Mirasol3B.combine)
            return latent_scores(model, params, latents, mask, memory, *args)
        encoded = model.apply({"params": params}, batch.get("video"), batch.get("audio"), mask,
                              method=Mirasol3B.encode_media)
        return context_scores(model, params, encoded["media"], encoded["media_token_mask"], mask.shape[1], *args)
    return jax.jit(fn)


def top_spans(scores: np.ndarray, valid: np.ndarray, snippet_seconds: float, *, threshold: float = SPAN_THRESHOLD,
              max_spans: int = MAX_SPANS) -> list[tuple[float, float, float]]:
    """[(start s, end s, score)] of one row's `scores [T]` over its `valid [T]` snippets, the
    strongest first (see the module docstring). Empty when no snippet scores above 0."""
    scores = np.where(np.asarray(valid, bool), np.asarray(scores, np.float64), -np.inf)
    free = np.isfinite(scores)
    spans = []
    while len(spans) < max_spans and free.any():
        peak = int(np.argmax(np.where(free, scores, -np.inf)))
        if not scores[peak] > 0:
            break
        floor = threshold * scores[peak]
        start, end = peak, peak + 1
        while start > 0 and free[start - 1] and scores[start - 1] >= floor:
            start -= 1
        while end < len(scores) and free[end] and scores[end] >= floor:
            end += 1
        free[start:end] = False
        spans.append((start * snippet_seconds, end * snippet_seconds, float(scores[start:end].sum())))
    return sorted(spans, key=lambda s: -s[2])
