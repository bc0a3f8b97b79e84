"""Config defaults, the `get_config(arg)` argument parser, and validation of every field.

Configs are `ml_collections` files in `configs/`; each starts from `base_config()`. `validate`
runs before anything is built or compiled and names the field and what was expected.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import ml_collections

from mirasol3b.errors import ConfigError
from mirasol3b.layers.spec import (
    ATTENTION_IMPLS,
    DTYPES,
    REMAT_POLICIES,
    fused_attention_fits,
)
from mirasol3b.losses import LATENT_LOSSES, LATENT_NEGATIVES

# ---- checks of one field ----------------------------------------------------------------------

def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _pos_int(v) -> str | None:
    return None if _is_int(v) and v > 0 else "a positive integer"


def _nonneg_int(v) -> str | None:
    return None if _is_int(v) and v >= 0 else "a non-negative integer"


def _number(lo: float = -math.inf, hi: float = math.inf, lo_open: bool = False) -> Callable:
    def check(v):
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (
            (v > lo if lo_open else v >= lo) and v <= hi)
        return None if ok else f"a number in {'(' if lo_open else '['}{lo}, {hi}]"
    return check


def _optional(check: Callable) -> Callable:
    return lambda v: None if v is None else check(v)


def _bool(v) -> str | None:
    return None if isinstance(v, bool) else "True or False"


def _one_of(*choices) -> Callable:
    return lambda v: None if v in choices else f"one of {list(choices)}"


def _str(v) -> str | None:
    return None if isinstance(v, str) else "a string"


def _nonempty_str(v) -> str | None:
    return None if isinstance(v, str) and v.strip() else "a non-empty string"


def _rates(v) -> str | None:
    if not isinstance(v, str):
        return "a string 'task:rate,...'"
    for item in filter(None, (x.strip() for x in v.split(","))):
        name, _, rate = item.rpartition(":")
        try:
            ok = bool(name) and float(rate) > 0 and math.isfinite(float(rate))
        except ValueError:
            ok = False
        if not ok:
            return f"'task:rate,...' with positive rates (bad item {item!r})"
    return None


def _mesh_shape(v) -> str | None:
    ok = (isinstance(v, (tuple, list)) and len(v) == 3 and all(_is_int(s) and (s > 0 or s == -1) for s in v)
          and list(v).count(-1) <= 1)
    return None if ok else "3 positive integers for ('data', 'fsdp', 'tensor'), at most one -1"


@dataclasses.dataclass(frozen=True)
class Field:
    """One config field: its default and its check (None, or what was expected)."""

    default: Any
    check: Callable[[Any], str | None]


def _stack(width: int, depth: int, num_heads: int, mlp_dim: int, **more: Field) -> dict:
    """A transformer stack's fields; `head_dim` 0: width // num_heads (which must then divide)."""
    return {"width": Field(width, _pos_int), "depth": Field(depth, _pos_int), "num_heads": Field(num_heads, _pos_int),
            "mlp_dim": Field(mlp_dim, _pos_int), "head_dim": Field(0, _nonneg_int), **more}


STACKS = ("video_encoder", "audio_encoder", "combiner_transformer", "time_aligned", "text_decoder")

# Every field a run reads, at the tiny scale (configs change what they need), with its check.
FIELDS: dict[str, Any] = {
    "seed": Field(0, _nonneg_int),
    # ('data', 'fsdp', 'tensor'); -1 fills the remaining devices.
    "mesh_shape": Field((-1, 1, 1), _mesh_shape),
    "model": {
        "vocab_size": Field(259, _pos_int),  # seqio.ByteVocabulary: 256 bytes + pad/eos/unk
        "dtype": Field("float32", _one_of(*DTYPES)),  # compute dtype
        "param_dtype": Field("float32", _one_of(*DTYPES)),
        "remat_policy": Field("none", _one_of(*REMAT_POLICIES)),
        "scan_layers": Field(True, _bool),
        # "auto": cuDNN's fused attention where it applies (NVIDIA GPU, bf16/fp16, no dropout), else
        # XLA's einsums; "xla" | "cudnn" force one (layers/spec.py).
        "attention_impl": Field("auto", _one_of(*ATTENTION_IMPLS)),
        "dropout_rate": Field(0.0, _number(0.0, 1.0)),
        # Per example and modality, the chance that training hides that whole modality (never all);
        # at most 0.5: with two modalities, each may be the one hidden.
        "modality_dropout": Field(0.0, _number(0.0, 0.5)),
        "combiner": Field("transformer", _one_of("transformer", "ttm")),
        # Combiner outputs read every modality ("joint") or output j reads modality j % 2 only
        # ("per_modality"; in the Transformer Combiner the media tokens still attend across
        # modalities; in the TTM the memory slots are written per modality too).
        "combiner_readout": Field("joint", _one_of("joint", "per_modality")),
        # The Transformer Combiner's last layer computes its m outputs only (the same values; ~70% less
        # work in that layer). False: every token through every layer, then the last m are kept.
        "combiner_outputs_only": Field(True, _bool),
        "num_latents": Field(4, _pos_int),  # m: combined tokens per snippet
        "use_video": Field(True, _bool),
        "use_audio": Field(True, _bool),
        "video": {"fps": Field(8.0, _number(0.0, lo_open=True)), "snippet_frames": Field(2, _pos_int),
                  "image_size": Field(32, _pos_int), "tube_frames": Field(2, _pos_int),
                  "patch_size": Field(8, _pos_int)},
        "audio": {
            "sample_rate": Field(16000, _pos_int), "n_fft": Field(400, _pos_int), "win_length": Field(400, _pos_int),
            "hop_length": Field(160, _pos_int), "n_mels": Field(32, _pos_int), "fmin": Field(0.0, _number(0.0)),
            "fmax": Field(8000.0, _optional(_number(0.0, lo_open=True))),
            "top_db": Field(80.0, _optional(_number(0.0, lo_open=True))),
            "patch_frames": Field(5, _pos_int), "patch_mels": Field(8, _pos_int),
            # the log-mel is fed as (dB - mean_db) / std_db
            "mean_db": Field(-45.0, _number()), "std_db": Field(40.0, _number(0.0, lo_open=True)),
            # the STFT as "matmul" (TPU/GPU) or "fft" (cheaper on CPU)
            "dft": Field("matmul", _one_of("matmul", "fft"))},
        "video_encoder": _stack(64, 1, 2, 128),
        "audio_encoder": _stack(64, 1, 2, 128),
        "combiner_transformer": _stack(64, 1, 2, 128),
        "ttm": {"memory_size": Field(8, _pos_int), "token_learner_hidden": Field(64, _pos_int),
                # "replace": the paper's write (the memory is what TokenLearner selects); "gated": a
                # learnt update gate between the old memory and that selection (combiner/ttm.py).
                "write": Field("replace", _one_of("replace", "gated")),
                # Add each snippet's index (sinusoidal, no parameters) to its tokens before the
                # memory reads and writes them, so the memory can record when (the paper's TTM has
                # no time: only an order it must infer).
                "snippet_positions": Field(False, _bool)},
        "time_aligned": _stack(
            64, 1, 2, 128,
            # Snippets each snippet attends to (itself and the window - 1 before it; 0 = all earlier
            # ones). A window makes long videos cost linear time and memory; depth L reaches
            # L * (window - 1) back.
            window=Field(0, _nonneg_int),
            # False: an ablation, every snippet attends to every real snippet (not autoregressive);
            # needs window 0 and loss.latent_loss_weight 0 (each prediction would see the latents it
            # predicts).
            causal=Field(True, _bool)),
        "text_decoder": _stack(
            64, 2, 2, 128, max_length=Field(64, _pos_int),
            # What the cross-attention reads: "all" snippets' time-aligned features (the paper), or
            # "recent": the last `recent_snippets` real snippets' only, so that a stream's answers
            # cost the same at any length (docs/streaming.md). Trained as it is used.
            context=Field("all", _one_of("all", "recent")),
            recent_snippets=Field(4, _pos_int),
            # Also the TTM Combiner's memory after the last snippet (projected to the features' width):
            # what the clip held before the recent snippets reaches the answer through it.
            read_memory=Field(False, _bool),
            # Tokens each memory slot is read as (a learnt linear expansion). A slot superposes
            # what it holds (one slot held both shapes' colours, linearly decodable at 94-95%); as
            # several tokens a question can attend to the one it asks about (docs/streaming.md).
            memory_read_tokens=Field(1, _pos_int)),
    },
    # latent_loss: "contrastive" (InfoNCE over the batch) or "mse" (see mirasol3b/losses.py for why
    # contrastive is the default); normalize_latent_target applies to "mse" only.
    "loss": {
        "latent_loss_weight": Field(1.0, _number(0.0)),
        "latent_loss": Field("contrastive", _one_of(*LATENT_LOSSES)),
        "latent_temperature": Field(0.1, _number(0.0, lo_open=True)),
        "normalize_latent_target": Field(True, _bool),
        # InfoNCE negatives: "examples" (other clips, same snippet) or "snippets" (also the clip's
        # other snippets).
        "latent_negatives": Field("examples", _one_of(*LATENT_NEGATIVES)),
        # > 0: the latent weight falls to 0 on a cosine over this many steps (train/step.py says
        # why); 0: constant.
        "latent_loss_decay_steps": Field(0, _nonneg_int),
    },
    "data": {
        "num_frames": Field(8, _pos_int), "text_length": Field(32, _pos_int), "batch_size": Field(8, _pos_int),
        # a registered SeqIO task or mixture (data/tasks.py, data/mixtures.py)
        "task": Field("synthetic_avqa_tiny", _nonempty_str),
        "task_modules": Field("", _str),  # comma-separated modules imported first, so user tasks register
        "tfds_data_dir": Field("", _str),  # "" = $TFDS_DATA_DIR, else ~/tensorflow_datasets
        "vocab_path": Field("", _str),  # "" = seqio.ByteVocabulary; else a SentencePiece model file
        "mixture_rates": Field("", _rates),  # "task:rate,...": registers `task` as that mixture
        # Examples (each holds a decoded clip), for the built-in tasks and a single task of yours; in
        # a mixture of your tasks each keeps its own (add_media_task's shuffle_buffer_size).
        "shuffle_buffer": Field(256, _pos_int),
        # Resuming with another input pipeline (task, batch size, host count, seed) than the one the
        # checkpoint saved the position of: True restarts the new pipeline from its beginning.
        "reset_position": Field(False, _bool),
    },
    # Save every N steps, keep the latest K good ones; writes overlap the next steps.
    "checkpoint": {"every_steps": Field(100, _pos_int), "keep": Field(3, _pos_int), "async_save": Field(True, _bool)},
    # Fine-tuning: params only from another run's workdir; mismatches are errors unless allowed.
    "init_from": Field("", _str),
    "init_from_allow": {"missing": Field(False, _bool), "unexpected": Field(False, _bool),
                        "shape_mismatch": Field(False, _bool)},
    "train": {
        "num_steps": Field(200, _pos_int), "learning_rate": Field(1e-3, _number(0.0, lo_open=True)),
        "warmup_steps": Field(20, _nonneg_int), "end_learning_rate_fraction": Field(0.1, _number(0.0, 1.0)),
        "weight_decay": Field(0.01, _number(0.0)), "grad_clip_norm": Field(1.0, _optional(_number(0.0, lo_open=True))),
        "adam_b1": Field(0.9, _number(0.0, 1.0)), "adam_b2": Field(0.98, _number(0.0, 1.0)),
        "log_every": Field(10, _pos_int),
        # Gradient accumulation: each batch runs as this many slices, one after another, whose
        # gradients are summed before the one update: activation memory of batch_size / microbatches
        # clips; the same update but for the contrastive latent loss's negatives, which come from
        # the slice (train/step.py's make_grad_fn).
        "microbatches": Field(1, _pos_int),
        # A jax.profiler trace of steps profile_from_step+1 .. profile_from_step+profile_steps into
        # WORKDIR/tensorboard (TensorBoard's Profile tab); 0 steps: none. Past the compile by default.
        "profile_steps": Field(0, _nonneg_int), "profile_from_step": Field(10, _nonneg_int),
    },
    # Generation-based evaluation (mirasol3b/evaluate.py): exact match of generated answers.
    "eval": {
        # answers are short; prompt (data.text_length) + these must fit the decoder
        "max_new_tokens": Field(8, _pos_int),
        "decode_method": Field("greedy", _one_of("greedy", "beam", "sample")),
        "beam_size": Field(4, _pos_int),
        "length_penalty": Field(0.0, _number(0.0)),  # beam: alpha of ((5 + len) / 6) ** alpha; 0 = raw log-probability
        "temperature": Field(1.0, _number(0.0)),  # sample: 0 = greedy
        "top_k": Field(0, _nonneg_int),  # sample: 0 = no top-k filtering
        "top_p": Field(1.0, _number(0.0, 1.0, lo_open=True)),  # sample: 1 = no nucleus filtering
        "split": Field("validation", _nonempty_str),
        "every_steps": Field(0, _nonneg_int),  # during training; 0 = only at the end
        "max_batches": Field(0, _nonneg_int),  # 0 = the whole split
        # Where each answer's evidence is computed (mirasol3b/evidence.py; "off": none, and no
        # grounding metrics). "context" is what a stream can compute too.
        "evidence": Field("context", _one_of("off", "context", "latents")),
    },
}


def _flatten(fields: dict, prefix: str = ""):
    for key, value in fields.items():
        if isinstance(value, Field):
            yield prefix + key, value
        else:
            yield from _flatten(value, f"{prefix}{key}.")


# 'model.video.fps' -> its check, for `validate`.
RULES: dict[str, Callable] = {path: f.check for path, f in _flatten(FIELDS)}


def base_config() -> ml_collections.ConfigDict:
    """Every field's default (`FIELDS`): the tiny scale; configs change what they need."""
    def build(fields: dict) -> ml_collections.ConfigDict:
        return ml_collections.ConfigDict({k: v.default if isinstance(v, Field) else build(v) for k, v in fields.items()})
    return build(FIELDS)


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """Parses `get_config`'s argument `"key=value,flag"` against typed defaults.

    A bare name sets a bool default to True; unknown names fail (no silent typos).
    """
    out = ml_collections.ConfigDict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, _, value = item.partition("=")
        if key not in defaults:
            raise ConfigError(f"<arg>.{key}", f"one of {sorted(defaults)}", item)
        kind = type(defaults[key])
        if not _:
            if kind is not bool:
                raise ConfigError(f"<arg>.{key}", f"{key}=<{kind.__name__}>", item)
            out[key] = True
        elif kind is bool:
            if value.lower() not in ("true", "false", "1", "0"):
                raise ConfigError(f"<arg>.{key}", "true or false", value)
            out[key] = value.lower() in ("true", "1")
        else:
            try:
                out[key] = kind(value)
            except ValueError:
                raise ConfigError(f"<arg>.{key}", kind.__name__, value) from None
    return out


def leaves(cfg: ml_collections.ConfigDict, prefix: str = ""):
    """(dotted field name, value) of every leaf of `cfg`."""
    for key in cfg.keys():
        value = cfg[key]
        path = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            yield from leaves(value, path + ".")
        else:
            yield path, value


def _require(ok: bool, field: str, expected: str, got: Any) -> None:
    if not ok:
        raise ConfigError(field, expected, got)


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Checks every field and every cross-field constraint; raises `ConfigError` naming the field."""
    seen = set()
    for path, value in leaves(config):
        if path not in RULES:
            raise ConfigError(path, f"a known field (misspelt? known: {sorted(RULES)[:8]}...)", value)
        problem = RULES[path](value)
        if problem:
            raise ConfigError(path, problem, value)
        seen.add(path)
    missing = sorted(set(RULES) - seen)
    if missing:
        raise ConfigError(missing[0], "to be set (it has no default in this config)", None)

    m = config.model
    v, a = m.video, m.audio
    _require(m.use_video or m.use_audio, "model.use_video", "at least one of use_video/use_audio True", False)
    _require(config.data.num_frames % v.snippet_frames == 0, "data.num_frames",
             f"a multiple of model.video.snippet_frames ({v.snippet_frames})", config.data.num_frames)
    _require(v.snippet_frames % v.tube_frames == 0, "model.video.tube_frames",
             f"a divisor of model.video.snippet_frames ({v.snippet_frames})", v.tube_frames)
    _require(v.image_size % v.patch_size == 0, "model.video.patch_size",
             f"a divisor of model.video.image_size ({v.image_size})", v.patch_size)
    samples = Fraction(v.snippet_frames) / Fraction(str(v.fps)) * a.sample_rate
    _require(samples.denominator == 1, "model.video.fps",
             f"a rate at which a snippet of {v.snippet_frames} frames spans a whole number of audio samples "
             f"at {a.sample_rate} Hz", v.fps)
    samples = int(samples)
    _require(a.win_length <= a.n_fft, "model.audio.win_length", f"<= model.audio.n_fft ({a.n_fft})", a.win_length)
    _require(samples % a.hop_length == 0, "model.audio.hop_length",
             f"a divisor of the {samples} samples per snippet", a.hop_length)
    frames = samples // a.hop_length
    _require(frames % a.patch_frames == 0, "model.audio.patch_frames",
             f"a divisor of the {frames} spectrogram frames per snippet", a.patch_frames)
    _require(a.n_mels % a.patch_mels == 0, "model.audio.patch_mels",
             f"a divisor of model.audio.n_mels ({a.n_mels})", a.patch_mels)
    nyquist = a.sample_rate / 2
    _require(a.fmax is None or a.fmax <= nyquist, "model.audio.fmax", f"<= sample_rate / 2 ({nyquist})", a.fmax)
    _require(a.fmax is None or a.fmin < a.fmax, "model.audio.fmin", f"< model.audio.fmax ({a.fmax})", a.fmin)
    for s in STACKS:
        _require(m[s].head_dim or m[s].width % m[s].num_heads == 0, f"model.{s}.num_heads",
                 f"a divisor of model.{s}.width ({m[s].width}) when model.{s}.head_dim is 0", m[s].num_heads)
        _require(m[s].width % 2 == 0 or s != "time_aligned", f"model.{s}.width", "an even number", m[s].width)
    _require(m.attention_impl != "cudnn" or fused_attention_fits(m.dtype, m.dropout_rate), "model.attention_impl",
             "'xla' unless model.dtype is bfloat16/float16 and model.dropout_rate is 0 (cuDNN's fused kernel)",
             m.attention_impl)
    _require(not m.text_decoder.read_memory or m.combiner == "ttm", "model.text_decoder.read_memory",
             "False unless model.combiner is 'ttm' (only the TTM Combiner has a memory)", m.text_decoder.read_memory)
    _require(m.time_aligned.causal or m.time_aligned.window == 0, "model.time_aligned.window",
             "0 with model.time_aligned.causal False (the window's chunks are causal)", m.time_aligned.window)
    _require(m.time_aligned.causal or config.loss.latent_loss_weight == 0, "loss.latent_loss_weight",
             "0 with model.time_aligned.causal False (every prediction would attend to the latents it predicts)",
             config.loss.latent_loss_weight)
    _require(config.data.text_length <= m.text_decoder.max_length, "data.text_length",
             f"<= model.text_decoder.max_length ({m.text_decoder.max_length})", config.data.text_length)
    _require(config.data.batch_size % config.train.microbatches == 0, "train.microbatches",
             f"a divisor of data.batch_size ({config.data.batch_size})", config.train.microbatches)
    # The cosine decay needs at least one step after the warm-up (optax refuses zero decay steps).
    _require(config.train.warmup_steps < config.train.num_steps, "train.warmup_steps",
             f"< train.num_steps ({config.train.num_steps}); lower it for a short run", config.train.warmup_steps)
    return config


def check_batch_fits_mesh(config: ml_collections.ConfigDict, data_shards: int) -> None:
    """The batch, and each of its `train.microbatches` slices, split evenly over `data_shards`
    (the mesh's data x fsdp size)."""
    batch, micro = config.data.batch_size, config.train.microbatches
    if batch % data_shards:
        raise ConfigError("data.batch_size", f"a multiple of the data x fsdp mesh size ({data_shards})", batch)
    if batch // micro % data_shards:
        raise ConfigError("train.microbatches", f"a divisor of data.batch_size / {data_shards} (the data x fsdp mesh "
                          f"size), so every microbatch spreads over the mesh ({batch // data_shards} examples a shard)",
                          micro)


def validate_eval(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """What generation-based evaluation needs beyond `validate` (kept apart so a config that is
    only trained, e.g. with a decoder as long as its text, stays valid)."""
    limit = config.model.text_decoder.max_length - config.data.text_length
    # Generation caches the whole prompt window (data.text_length) plus the new tokens.
    _require(config.eval.max_new_tokens <= limit, "eval.max_new_tokens",
             f"<= model.text_decoder.max_length - data.text_length ({limit})", config.eval.max_new_tokens)
    return config
