"""Mirasol3B: per-snippet encoders -> Combiner -> time-aligned AR model; text decoder cross-attends."""

from __future__ import annotations

from fractions import Fraction

import einops
import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from mirasol3b.combiner import ModalityFusion, TransformerCombiner, TTMCombiner
from mirasol3b.encoders.audio import AudioEncoder
from mirasol3b.encoders.spectrogram import LogMelSpec
from mirasol3b.encoders.video import VideoEncoder
from mirasol3b.layers import LayerNorm, TransformerSpec
from mirasol3b.layers.projection import dense
from mirasol3b.text_decoder import TextDecoder
from mirasol3b.time_aligned import TimeAlignedModel

COMBINERS = ("transformer", "ttm")
MODALITIES = ("video", "audio")


def stack_spec(model_config: ml_collections.ConfigDict, name: str) -> TransformerSpec:
    """The TransformerSpec of the stack `model_config[name]`, with the model-wide numerics."""
    c = model_config
    part = c[name]
    return TransformerSpec(
        width=part.width, depth=part.depth, num_heads=part.num_heads, mlp_dim=part.mlp_dim,
        head_dim=part.head_dim, dropout_rate=c.dropout_rate, dtype=c.dtype, param_dtype=c.param_dtype,
        remat_policy=c.remat_policy, scan_layers=c.scan_layers, attention_impl=c.attention_impl)


def samples_per_snippet(model_config: ml_collections.ConfigDict) -> int:
    """Audio samples covering exactly one snippet's frames (validated to be a whole number)."""
    v, a = model_config.video, model_config.audio
    samples = Fraction(v.snippet_frames) / Fraction(str(v.fps)) * a.sample_rate
    if samples.denominator != 1:
        raise ValueError(f"model.video.snippet_frames / model.video.fps * model.audio.sample_rate must be a "
                         f"whole number of samples, got {float(samples)}")
    return int(samples)


def tokens_per_snippet(model_config: ml_collections.ConfigDict) -> dict[str, int]:
    """Encoder tokens per snippet of each modality (whether or not it is used)."""
    v, a = model_config.video, model_config.audio
    return {"video": (v.snippet_frames // v.tube_frames) * (v.image_size // v.patch_size) ** 2,
            "audio": (samples_per_snippet(model_config) // a.hop_length // a.patch_frames) * (a.n_mels // a.patch_mels)}


def logmel_spec(model_config: ml_collections.ConfigDict) -> LogMelSpec:
    a = model_config.audio
    return LogMelSpec(sample_rate=a.sample_rate, n_fft=a.n_fft, win_length=a.win_length,
                      hop_length=a.hop_length, n_mels=a.n_mels, fmin=a.fmin, fmax=a.fmax, top_db=a.top_db,
                      dft=a.dft)


class Mirasol3B(nn.Module):
    """The whole model; `config` is `config.model` of a `configs/*.py` file.

    `apply(variables, batch, train=...)` -> dict with
      `logits [batch, length, vocab]` float32,
      `latents [batch, snippets, m, width]` (the Combiner's outputs) and
      `predictions [batch, snippets, m, width]` (the time-aligned model's guess of the next
      snippet's latents).
    """

    config: ml_collections.ConfigDict

    def setup(self):
        c = self.config
        if c.use_video:
            self.video_encoder = VideoEncoder(
                stack_spec(c, "video_encoder"), snippet_frames=c.video.snippet_frames,
                image_size=c.video.image_size, tube_frames=c.video.tube_frames, patch_size=c.video.patch_size)
        if c.use_audio:
            self.audio_encoder = AudioEncoder(
                stack_spec(c, "audio_encoder"), logmel=logmel_spec(c), samples_per_snippet=samples_per_snippet(c),
                patch_frames=c.audio.patch_frames, patch_mels=c.audio.patch_mels,
                mean_db=c.audio.mean_db, std_db=c.audio.std_db)
        combiner_spec = stack_spec(c, "combiner_transformer")
        self.fusion = ModalityFusion(combiner_spec.width, modality_dropout=c.modality_dropout,
                                     dtype=combiner_spec.compute_dtype,
                                     param_dtype=combiner_spec.weight_dtype)
        segments = None
        if c.combiner_readout == "per_modality" and c.use_video and c.use_audio:
            segments = tuple(tokens_per_snippet(c)[name] for name in sorted(MODALITIES))
        if c.combiner == "transformer":
            self.combiner = TransformerCombiner(combiner_spec, num_outputs=c.num_latents, segment_sizes=segments,
                                                outputs_only=c.combiner_outputs_only)
        elif c.combiner == "ttm":
            self.combiner = TTMCombiner(combiner_spec, num_outputs=c.num_latents, memory_size=c.ttm.memory_size,
                                        token_learner_hidden=c.ttm.token_learner_hidden, segment_sizes=segments,
                                        write=c.ttm.write, snippet_positions=c.ttm.snippet_positions)
        else:
            raise ValueError(f"model.combiner must be one of {COMBINERS}, got {c.combiner!r}")
        self.time_aligned = TimeAlignedModel(stack_spec(c, "time_aligned"), window=c.time_aligned.window,
                                             causal=c.time_aligned.causal)
        if c.text_decoder.read_memory:
            self.memory_norm = LayerNorm(dtype=combiner_spec.compute_dtype, param_dtype=combiner_spec.weight_dtype)
            self.memory_projection = dense(c.text_decoder.memory_read_tokens * c.time_aligned.width, ("embed", "mlp"),
                                           combiner_spec.compute_dtype, combiner_spec.weight_dtype, None)
        self.text_decoder = TextDecoder(stack_spec(c, "text_decoder"), vocab_size=c.vocab_size,
                                        max_length=c.text_decoder.max_length)

    def encode_media(self, video: jax.Array | None, audio: jax.Array | None, media_mask: jax.Array, *,
                     train: bool = False) -> dict[str, jax.Array]:
        """Encodes the media once: `video [batch, frames, H, W, 3]` uint8 (or float in [0, 1]; None
        when not `use_video`), `audio [batch, samples]` float waveform in [-1, 1] (None when not
        `use_audio`), `media_mask [batch, snippets]` bool. Returns `latents`, `predictions`,
        `features` ([batch, snippets, m, width]), and `media` ([batch, media_tokens, width], what the
        text decoder reads: see `model.text_decoder.context`) with its `media_token_mask`."""
        check_media(self.config, video, audio, media_mask)
        latents, memory = self.combine(video, audio, media_mask, train=train)
        features, predictions = self.time_aligned(latents, media_mask, deterministic=not train)
        media, media_token_mask = self.decoder_context(features, media_mask, memory)
        return {"latents": latents, "predictions": predictions, "features": features, "media": media,
                "media_token_mask": media_token_mask}

    def combine(self, video: jax.Array | None, audio: jax.Array | None, media_mask: jax.Array, *,
                memory: jax.Array | None = None, first_snippet: jax.Array | int = 0,
                train: bool = False) -> tuple[jax.Array, jax.Array | None]:
        """Encoders and Combiner: (`latents [batch, snippets, m, width]`, the TTM memory after the
        last snippet `[batch, memory_size, width]` or None). `memory`: the TTM memory before the
        first snippet (default zeros), and `first_snippet` that snippet's index, for a stream
        carried from its last call."""
        c = self.config
        tokens = {}
        if c.use_video:
            tokens["video"] = self.video_encoder(video, deterministic=not train)
        if c.use_audio:
            tokens["audio"] = self.audio_encoder(audio, deterministic=not train)
        fused = self.fusion(tokens, deterministic=not train)
        if c.combiner == "ttm":
            return self.combiner(fused, media_mask, memory=memory, first_snippet=first_snippet, return_memory=True,
                                 deterministic=not train)
        return self.combiner(fused, media_mask, deterministic=not train), None

    def decoder_context(self, features: jax.Array, media_mask: jax.Array,
                        memory: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        """What the text decoder reads of `features [batch, snippets, m, width]`: (`media
        [batch, tokens, width]`, `media_token_mask [batch, tokens]`). With context "recent" only
        the last `recent_snippets` real snippets are unmasked; with `read_memory` the projected TTM
        memory follows them (`memory_read_tokens` tokens per slot)."""
        c = self.config.text_decoder
        valid = media_mask.astype(bool)
        if c.context == "recent":
            later_real = jnp.cumsum(valid[:, ::-1], axis=1)[:, ::-1]  # real snippets at or after each
            valid = valid & (later_real <= c.recent_snippets)
        media = einops.rearrange(features, "b t m d -> b (t m) d")
        mask = jnp.repeat(valid, features.shape[2], axis=1)
        if c.read_memory:
            read = self.memory_projection(self.memory_norm(memory)).astype(media.dtype)
            read = einops.rearrange(read, "b s (k d) -> b (s k) d", k=c.memory_read_tokens)
            media = jnp.concatenate([media, read], axis=1)
            mask = jnp.concatenate([mask, jnp.ones(read.shape[:2], bool)], axis=1)
        return media, mask

    def time_aligned_step(self, latents: jax.Array, first_snippet: jax.Array, cache_mask: jax.Array | None,
                          cache_index: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The time-aligned model over the next snippets of a stream, `latents [batch, n, m, width]`,
        its keys and values cached (the `cache` collection; see `TimeAlignedModel`)."""
        return self.time_aligned(latents, None, decode=True, first_snippet=first_snippet, cache_mask=cache_mask,
                                 cache_index=cache_index)

    def decode_text(self, tokens: jax.Array, media: jax.Array | None, media_token_mask: jax.Array, *,
                    positions=None, mask=None, cache_index=None, decode: bool = False,
                    train: bool = False) -> jax.Array:
        """Text logits `[batch, length, vocab]`; see `TextDecoder` for the decode-mode arguments."""
        return self.text_decoder(tokens, media, media_token_mask, positions=positions, mask=mask,
                                 cache_index=cache_index, decode=decode, deterministic=not train)

    def __call__(self, batch: dict[str, jax.Array], *, train: bool = False) -> dict[str, jax.Array]:
        media = self.encode_media(batch.get("video"), batch.get("audio"), batch["media_mask"], train=train)
        logits = self.decode_text(batch["text_inputs"], media["media"], media["media_token_mask"], train=train)
        return {"logits": logits, "latents": media["latents"], "predictions": media["predictions"]}


def check_media(c: ml_collections.ConfigDict, video, audio, media_mask) -> None:
    """Shape and dtype errors naming the input, before they surface as an unpacking or
    broadcasting error deep in an encoder (shapes are static, so this costs nothing under jit)."""
    if media_mask is None or len(media_mask.shape) != 2 or not (
            jnp.issubdtype(media_mask.dtype, jnp.bool_) or jnp.issubdtype(media_mask.dtype, jnp.integer)):
        raise ValueError("media_mask must be bool [batch, snippets], got "
                         f"{None if media_mask is None else (media_mask.shape, media_mask.dtype)}")
    batch, snippets = media_mask.shape
    if c.use_video:
        if video is None or len(video.shape) != 5 or video.shape[-1] != 3 or video.shape[0] != batch:
            raise ValueError(f"video must be [batch={batch}, frames, H, W, 3] (RGB), got "
                             f"{None if video is None else video.shape}")
        if not (video.dtype == jnp.uint8 or jnp.issubdtype(video.dtype, jnp.floating)):
            raise ValueError(f"video must be uint8 (0..255) or float (0..1), got {video.dtype}")
        if video.shape[1] != snippets * c.video.snippet_frames:
            raise ValueError(f"video has {video.shape[1]} frames; media_mask says {snippets} snippets of "
                             f"{c.video.snippet_frames} frames")
    if c.use_audio:
        if audio is None or len(audio.shape) != 2 or audio.shape[0] != batch:
            raise ValueError(f"audio must be a mono waveform [batch={batch}, samples], got "
                             f"{None if audio is None else audio.shape}")
        if not jnp.issubdtype(audio.dtype, jnp.floating):
            # int16 PCM read as it is would sit ~90 dB above the spectrogram's normalisation.
            raise ValueError(f"audio must be a float waveform in [-1, 1], got {audio.dtype} (int16 PCM: "
                             "divide by 32768)")
        if audio.shape[1] != snippets * samples_per_snippet(c):
            raise ValueError(f"audio has {audio.shape[1]} samples; media_mask says {snippets} snippets of "
                             f"{samples_per_snippet(c)} samples")
