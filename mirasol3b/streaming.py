"""Streaming: encode a live stream once, one snippet at a time, and question it at any moment.

    stream = Stream(model, params)            # batch 1 unless asked
    stream.push(video, audio)                 # one snippet: [batch, snippet_frames, H, W, 3], [batch, samples]
    stream.ask(prompts, prompt_lengths)       # {'tokens', 'scores'}, as `decoding.make_generate_fn` gives

A push runs the encoders and the Combiner on the new snippet only (the TTM memory carried in the
state) and the time-aligned model on its m tokens against the cached keys and values of earlier
snippets. The time-aligned model is block-causal and the Combiner's memory flows forward only, so
after snippets 0..t the features, and the answers, are those of `encode_media` and generation on the
clip cut after snippet t (tests/test_streaming.py checks both, to 1e-5 and token for token).

What the state holds, and so what a push and a question cost:
- the time-aligned keys and values of every layer: with `model.time_aligned.window = W > 0`, a ring of
  the last W snippets (all that a snippet's tokens read): constant. With window 0 (the paper), every
  snippet's: it grows with the stream, its capacity doubling when full.
- what the text decoder reads (`model.text_decoder.context`): "recent", a ring of the last
  `recent_snippets` real snippets' features per row: constant. "all": every snippet's: it grows.
- the TTM Combiner's memory: constant.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from mirasol3b import decoding, evidence
from mirasol3b.model import Mirasol3B, check_media


@struct.dataclass
class StreamState:
    """The whole state of a stream; a pytree (its shapes change only when a growing part doubles)."""

    snippets: jax.Array  # int32 []: snippets pushed
    real: jax.Array  # int32 [batch]: real (unmasked) snippets pushed per row
    memory: jax.Array | None  # [batch, memory_size, width]: the TTM memory (None: Transformer Combiner)
    cache: dict  # the time-aligned model's keys and values, `cache_valid.shape[1] * m` token slots a layer
    cache_valid: jax.Array  # bool [batch, cache_snippets]: which cached snippets hold real media
    features: jax.Array  # [batch, context_snippets, m, width]: what the text decoder reads
    features_valid: jax.Array  # bool [batch, context_snippets]
    features_time: jax.Array  # int32 [batch, context_snippets]: the snippet each slot holds (for evidence)

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for x in jax.tree.leaves(self))


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Which parts of the state are rings (of a fixed number of snippets) and which grow."""

    window: int  # time-aligned window: the cache's ring size (0: the cache grows)
    recent: int  # decoder context ring size (0: context "all", it grows)

    @property
    def grows(self) -> bool:
        return not (self.window and self.recent)


class Stream:
    """A stream being encoded, `batch` rows at once (each row its own stream, pushed together)."""

    def __init__(self, model: Mirasol3B, params, *, batch: int = 1, capacity: int = 16):
        c = model.config
        if not c.time_aligned.causal:
            raise ValueError("streaming needs model.time_aligned.causal=True: a non-causal model's features change "
                             "as later snippets arrive")
        self.model, self.params, self.batch = model, params, batch
        self.layout = _Layout(c.time_aligned.window,
                              c.text_decoder.recent_snippets if c.text_decoder.context == "recent" else 0)
        self.capacity = capacity  # snippets the growing parts hold before they double
        self.pushed = 0
        self._dtype = jnp.dtype(c.dtype)
        self._push = jax.jit(self._push_fn)
        self._media = jax.jit(self._media_fn)
        self._generate = {}
        self._evidence = {}
        self.state = self._init(capacity)

    # ---- state --------------------------------------------------------------------------------

    def _init(self, capacity: int) -> StreamState:
        c, b, m = self.model.config, self.batch, self.model.config.num_latents
        cache_snippets = self.layout.window or capacity
        context_snippets = self.layout.recent or capacity
        width = c.combiner_transformer.width

        def cache_shapes():
            latents = jnp.zeros((b, cache_snippets, m, width), self._dtype)
            return self.model.apply({"params": self.params}, latents, 0, None, 0, method=Mirasol3B.time_aligned_step,
                                    mutable=["cache"])[1]["cache"]

        cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(cache_shapes))
        memory = jnp.zeros((b, c.ttm.memory_size, width), self._dtype) if c.combiner == "ttm" else None
        return StreamState(
            snippets=jnp.int32(0), real=jnp.zeros((b,), jnp.int32), memory=memory, cache=cache,
            cache_valid=jnp.zeros((b, cache_snippets), bool),
            features=jnp.zeros((b, context_snippets, m, c.time_aligned.width), self._dtype),
            features_valid=jnp.zeros((b, context_snippets), bool),
            features_time=jnp.zeros((b, context_snippets), jnp.int32))

    def reset(self) -> None:
        """Starts a new stream (the compiled functions are kept): the state after no snippet."""
        self.pushed = 0
        self.state = self._init(self.capacity)

    def _grow(self) -> None:
        """Doubles the growing parts, the snippets so far kept at the same slots."""
        self.capacity *= 2
        bigger = self._init(self.capacity)
        self.state = jax.tree.map(lambda new, old: new.at[tuple(slice(0, n) for n in old.shape)].set(old),
                                  bigger, self.state)

    # ---- pushing ------------------------------------------------------------------------------

    def push(self, video: jax.Array | None, audio: jax.Array | None, valid: jax.Array | None = None) -> jax.Array:
        """Adds one snippet to every row: `video [batch, snippet_frames, H, W, 3]` (None without video),
        `audio [batch, samples_per_snippet]` (None without audio), `valid [batch]` bool (default
        all True; False: padding, as a masked snippet in training). Returns the snippet's
        time-aligned features `[batch, m, width]`."""
        valid = jnp.ones((self.batch,), bool) if valid is None else jnp.asarray(valid, bool)
        if valid.shape != (self.batch,):
            raise ValueError(f"valid must be bool [batch={self.batch}], got shape {valid.shape}")
        check_media(self.model.config, video, audio, valid[:, None])
        if self.layout.grows and self.pushed >= self.capacity:
            self._grow()
        self.state, features = self._push(self.params, self.state, video, audio, valid)
        self.pushed += 1
        return features

    def _push_fn(self, params, state: StreamState, video, audio, valid):
        model, m = self.model, self.model.config.num_latents
        t = state.snippets
        latents, memory = model.apply({"params": params}, video, audio, valid[:, None], memory=state.memory,
                                      first_snippet=t, method=Mirasol3B.combine)
        slots = state.cache_valid.shape[1]
        slot = t % slots if self.layout.window else t
        cache_valid = jnp.where(jnp.arange(slots) == slot, valid[:, None], state.cache_valid)
        cache_mask = jnp.repeat(cache_valid, m, axis=1)[:, None, None, :]
        (features, _), updated = model.apply(
            {"params": params, "cache": state.cache}, latents, t, cache_mask, slot * m,
            method=Mirasol3B.time_aligned_step, mutable=["cache"])

        context = jnp.arange(state.features_valid.shape[1])[None]
        if self.layout.recent:  # the row's next ring slot, taken only by a real snippet
            write = (context == (state.real % self.layout.recent)[:, None]) & valid[:, None]
            features_valid = state.features_valid | write
        else:
            write = jnp.broadcast_to(context == t, state.features_valid.shape)
            features_valid = jnp.where(write, valid[:, None], state.features_valid)
        new = StreamState(
            snippets=t + 1, real=state.real + valid.astype(jnp.int32), memory=memory, cache=updated["cache"],
            cache_valid=cache_valid,
            features=jnp.where(write[:, :, None, None], features.astype(self._dtype), state.features),
            features_valid=features_valid, features_time=jnp.where(write, t, state.features_time))
        return new, features[:, 0]

    # ---- asking -------------------------------------------------------------------------------

    def media(self) -> tuple[jax.Array, jax.Array]:
        """What the text decoder reads now: (`media [batch, tokens, width]`, `media_token_mask`)."""
        return self._media(self.params, self.state)

    def _media_fn(self, params, state: StreamState):
        return self.model.apply({"params": params}, state.features, state.features_valid, state.memory,
                                method=Mirasol3B.decoder_context)

    def ask(self, prompts, prompt_lengths, config: decoding.DecodeConfig = decoding.DecodeConfig(),
            rng: jax.Array | None = None) -> dict:
        """Generates answers to `prompts [batch, prompt_len]` (right-padded, BOS first) about the
        stream so far; see `decoding.make_generate_fn`."""
        if self.pushed == 0:
            raise ValueError("ask: nothing has been pushed to the stream yet")
        media, mask = self.media()
        if config not in self._generate:
            self._generate[config] = decoding.make_generate_fn(self.model, config, encoded=True)
        batch = {"media": media, "media_token_mask": mask, "prompts": jnp.asarray(prompts, jnp.int32),
                 "prompt_lengths": jnp.asarray(prompt_lengths, jnp.int32)}
        return self._generate[config](self.params, batch, jax.random.key(0) if rng is None else rng)


    def evidence(self, prompts, prompt_lengths, tokens, *, eos_id: int) -> dict[str, np.ndarray]:
        """The evidence of answers `tokens [batch, n]` (as `ask` gave them) to `prompts`, from what the
        decoder reads now (`mirasol3b/evidence.py`, level "context"): `scores [batch, snippets pushed]`
        by stream snippet (0 for snippets the state no longer holds: a bounded context reads only the
        recent ones) and `memory_share [batch]`."""
        if eos_id not in self._evidence:
            def fn(params, state, prompts, prompt_lengths, tokens):
                media, mask = self.model.apply({"params": params}, state.features, state.features_valid,
                                               state.memory, method=Mirasol3B.decoder_context)
                return evidence.context_scores(self.model, params, media, mask, state.features.shape[1], prompts,
                                               prompt_lengths, tokens, eos_id)
            self._evidence[eos_id] = jax.jit(fn)
        out = self._evidence[eos_id](self.params, self.state, jnp.asarray(prompts, jnp.int32),
                                     jnp.asarray(prompt_lengths, jnp.int32), jnp.asarray(tokens, jnp.int32))
        slot_scores, held = np.asarray(out["scores"]), np.asarray(self.state.features_valid)
        times = np.asarray(self.state.features_time)
        scores = np.zeros((self.batch, self.pushed), np.float32)
        for r in range(self.batch):
            scores[r, times[r, held[r]]] = slot_scores[r, held[r]]
        return {"scores": scores, "memory_share": np.asarray(out["memory_share"])}


def prompt_row(tokens: list[int], length: int, bos_id: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """One question as `ask` takes it: (`prompts [1, length]` = BOS + its last `length - 1` tokens,
    right-padded, as the feature converter makes them; `prompt_lengths [1]`)."""
    kept = [bos_id] + list(tokens)[len(tokens) - min(len(tokens), length - 1):]
    row = np.full((1, length), pad_id, np.int32)
    row[0, :len(kept)] = kept
    return row, np.array([len(kept)], np.int32)
