"""Config defaults, the `get_config(arg)` argument parser, and validation of every field.

Configs are `ml_collections` files in `configs/`; each starts from `base_config()`. `validate`
runs before anything is built or compiled and names the field and what was expected.
"""

from __future__ import annotations

import importlib
import math
import sys
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import ml_collections
from absl import app, flags
from etils import epath

from mirasol3b.layers.spec import ATTENTION_IMPLS, DTYPES, REMAT_POLICIES, fused_attention_fits
from mirasol3b.losses import LATENT_LOSSES, LATENT_NEGATIVES


class ConfigError(ValueError):
    """A config field holds an impossible value."""

    def __init__(self, field: str, expected: str | None = None, got: Any = None):
        if expected is None:  # a whole message: ml_collections re-raises an error of a config file
            super().__init__(field)  # as `type(e)(str(e))`, with the field's name in the text
            self.field = None
            return
        super().__init__(f"config.{field}: expected {expected}, got {got!r}")
        self.field = field


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing for `app.run(main, flags_parser=configlib.parse_flags)`, where an override
    of a field the config lacks (`--config.modle.dtype=...`) is one line naming it instead of a
    traceback from inside ml_collections (which raises AttributeError or KeyError there)."""
    try:
        rest = app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError) as e:
        overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
        reason = e
        while reason.args and isinstance(reason.args[0], BaseException):  # a nested field: AttributeError(KeyError)
            reason = reason.args[0]
        text = str(reason.args[0] if reason.args else reason).replace("\n", "; ")
        sys.exit(f"FATAL Flags parsing error: a --config override names a field the config does not have: "
                 f"{text} (overrides given: {', '.join(overrides)})")
    # A config file that could not be loaded (a wrong path, a bad `:variant` name) is a value
    # that raises on first use, a traceback from deep inside the program: say it here instead.
    config = flags.FLAGS["config"].value if "config" in flags.FLAGS else None
    if config is not None:
        try:
            getattr(config, "keys")
        except OSError as e:
            sys.exit(f"FATAL Flags parsing error: --config: {e.__cause__ or e}")
    return rest


def import_task_modules(config: ml_collections.ConfigDict) -> None:
    """Imports `config.data.task_modules` (comma-separated), so the user's SeqIO tasks register."""
    for name in filter(None, (m.strip() for m in config.data.task_modules.split(","))):
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if not e.name or not (name == e.name or name.startswith(e.name + ".")):
                raise  # the module is there; something it imports is not (its traceback says what)
            raise ConfigError("data.task_modules", f"importable modules; there is no {e.name!r} on the module path "
                              f"(run from the directory that holds {e.name}.py, or add it to PYTHONPATH)",
                              config.data.task_modules) from e


def _stack(width: int, depth: int, num_heads: int, mlp_dim: int, head_dim: int = 0) -> ml_collections.ConfigDict:
    """`head_dim` 0: width // num_heads (which must then divide)."""
    return ml_collections.ConfigDict(dict(width=width, depth=depth, num_heads=num_heads, mlp_dim=mlp_dim,
                                          head_dim=head_dim))


def base_config() -> ml_collections.ConfigDict:
    """Every field a run reads, at the tiny scale; configs change what they need."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    # ('data', 'fsdp', 'tensor'); -1 fills the remaining devices.
    c.mesh_shape = (-1, 1, 1)

    c.model = m = ml_collections.ConfigDict()
    m.vocab_size = 259  # seqio.ByteVocabulary: 256 bytes + pad/eos/unk
    m.dtype = "float32"  # compute dtype
    m.param_dtype = "float32"
    m.remat_policy = "none"
    m.scan_layers = True
    # "auto": cuDNN's fused attention where it applies (NVIDIA GPU, bf16/fp16, no dropout), else
    # XLA's einsums; "xla" | "cudnn" force one (layers/spec.py).
    m.attention_impl = "auto"
    m.dropout_rate = 0.0
    # Per example and modality, the chance that training hides that whole modality (never all).
    m.modality_dropout = 0.0
    m.combiner = "transformer"
    # Transformer Combiner outputs read every modality ("joint") or output j reads modality
    # j % 2 only ("per_modality"; the media tokens still attend across modalities).
    m.combiner_readout = "joint"
    # The Transformer Combiner's last layer computes its m outputs only (the same values; ~70% less
    # work in that layer). False: every token through every layer, then the last m are kept.
    m.combiner_outputs_only = True
    m.num_latents = 4  # m: combined tokens per snippet
    m.use_video = True
    m.use_audio = True
    m.video = ml_collections.ConfigDict(dict(fps=8.0, snippet_frames=2, image_size=32, tube_frames=2, patch_size=8))
    m.audio = ml_collections.ConfigDict(dict(
        sample_rate=16000, n_fft=400, win_length=400, hop_length=160, n_mels=32, fmin=0.0, fmax=8000.0,
        top_db=80.0, patch_frames=5, patch_mels=8,
        mean_db=-45.0, std_db=40.0,  # the log-mel is fed as (dB - mean_db) / std_db
        dft="matmul"))  # the STFT as "matmul" (TPU/GPU) or "fft" (cheaper on CPU)
    m.video_encoder = _stack(64, 1, 2, 128)
    m.audio_encoder = _stack(64, 1, 2, 128)
    m.combiner_transformer = _stack(64, 1, 2, 128)
    m.ttm = ml_collections.ConfigDict(dict(memory_size=8, token_learner_hidden=64))
    m.time_aligned = _stack(64, 1, 2, 128)
    # Snippets each snippet attends to (itself and the window - 1 before it; 0 = all earlier ones).
    # A window makes long videos cost linear time and memory; depth L reaches L * (window - 1) back.
    m.time_aligned.window = 0
    # False: an ablation, every snippet attends to every real snippet (not autoregressive); needs
    # window 0 and loss.latent_loss_weight 0 (each prediction would see the latents it predicts).
    m.time_aligned.causal = True
    m.text_decoder = _stack(64, 2, 2, 128)
    m.text_decoder.max_length = 64

    # latent_loss: "contrastive" (InfoNCE over the batch) or "mse" (see mirasol3b/losses.py for why
    # contrastive is the default); normalize_latent_target applies to "mse" only.
    c.loss = ml_collections.ConfigDict(dict(latent_loss_weight=1.0, latent_loss="contrastive",
                                            latent_temperature=0.1, normalize_latent_target=True,
                                            # InfoNCE negatives: "examples" (other clips, same snippet)
                                            # or "snippets" (also the clip's other snippets).
                                            latent_negatives="examples",
                                            # > 0: the latent weight falls to 0 on a cosine over
                                            # this many steps (train/step.py says why); 0: constant.
                                            latent_loss_decay_steps=0))

    c.data = ml_collections.ConfigDict(dict(
        num_frames=8, text_length=32, batch_size=8,
        task="synthetic_avqa_tiny",  # a registered SeqIO task or mixture (data/tasks.py, data/mixtures.py)
        task_modules="",  # comma-separated modules imported first, so user tasks register
        tfds_data_dir="",  # "" = $TFDS_DATA_DIR, else ~/tensorflow_datasets
        vocab_path="",  # "" = seqio.ByteVocabulary; else a SentencePiece model file
        mixture_rates="",  # "task:rate,...": registers `task` as that mixture
        # Examples (each holds a decoded clip), for the built-in tasks and a single task of yours; in
        # a mixture of your tasks each keeps its own (add_media_task's shuffle_buffer_size).
        shuffle_buffer=256,
        # Resuming with another input pipeline (task, batch size, host count, seed) than the one the
        # checkpoint saved the position of: True restarts the new pipeline from its beginning.
        reset_position=False,
    ))

    # Save every N steps, keep the latest K good ones; writes overlap the next steps.
    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=100, keep=3, async_save=True))
    # Fine-tuning: params only from another run's workdir; mismatches are errors unless allowed.
    c.init_from = ""
    c.init_from_allow = ml_collections.ConfigDict(dict(missing=False, unexpected=False, shape_mismatch=False))

    c.train = ml_collections.ConfigDict(dict(
        num_steps=200, learning_rate=1e-3, warmup_steps=20, end_learning_rate_fraction=0.1,
        weight_decay=0.01, grad_clip_norm=1.0, adam_b1=0.9, adam_b2=0.98, log_every=10,
        # Gradient accumulation: each batch runs as this many slices, one after another, whose
        # gradients are summed before the one update: activation memory of batch_size / microbatches
        # clips; the same update but for the contrastive latent loss's negatives, which come from
        # the slice (train/step.py's make_grad_fn).
        microbatches=1,
        # A jax.profiler trace of steps profile_from_step+1 .. profile_from_step+profile_steps into
        # WORKDIR/tensorboard (TensorBoard's Profile tab); 0 steps: none. Past the compile by default.
        profile_steps=0, profile_from_step=10))

    # Generation-based evaluation (mirasol3b/evaluate.py): exact match of generated answers.
    c.eval = ml_collections.ConfigDict(dict(
        max_new_tokens=8,  # answers are short; prompt (data.text_length) + these must fit the decoder
        decode_method="greedy",  # greedy | beam | sample
        beam_size=4,
        length_penalty=0.0,  # beam: alpha of ((5 + len) / 6) ** alpha; 0 = raw log-probability
        temperature=1.0,  # sample: 0 = greedy
        top_k=0,  # sample: 0 = no top-k filtering
        top_p=1.0,  # sample: 1 = no nucleus filtering
        split="validation",
        every_steps=0,  # during training; 0 = only at the end
        max_batches=0,  # 0 = the whole split
    ))
    return c


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


# ---- validation -------------------------------------------------------------------------------

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


_STACK_FIELDS = {"width": _pos_int, "depth": _pos_int, "num_heads": _pos_int, "mlp_dim": _pos_int,
                 "head_dim": _nonneg_int}
STACKS = ("video_encoder", "audio_encoder", "combiner_transformer", "time_aligned", "text_decoder")

RULES: dict[str, Callable] = {
    "seed": _nonneg_int,
    "mesh_shape": _mesh_shape,
    "model.vocab_size": _pos_int,
    "model.dtype": _one_of(*DTYPES),
    "model.param_dtype": _one_of(*DTYPES),
    "model.remat_policy": _one_of(*REMAT_POLICIES),
    "model.scan_layers": _bool,
    "model.attention_impl": _one_of(*ATTENTION_IMPLS),
    "model.dropout_rate": _number(0.0, 1.0),
    "model.modality_dropout": _number(0.0, 0.5),  # two modalities: each may be the one hidden
    "model.combiner": _one_of("transformer", "ttm"),
    "model.combiner_readout": _one_of("joint", "per_modality"),
    "model.combiner_outputs_only": _bool,
    "model.time_aligned.window": _nonneg_int,
    "model.time_aligned.causal": _bool,
    "model.num_latents": _pos_int,
    "model.use_video": _bool,
    "model.use_audio": _bool,
    "model.video.fps": _number(0.0, lo_open=True),
    "model.video.snippet_frames": _pos_int,
    "model.video.image_size": _pos_int,
    "model.video.tube_frames": _pos_int,
    "model.video.patch_size": _pos_int,
    "model.audio.sample_rate": _pos_int,
    "model.audio.n_fft": _pos_int,
    "model.audio.win_length": _pos_int,
    "model.audio.hop_length": _pos_int,
    "model.audio.n_mels": _pos_int,
    "model.audio.fmin": _number(0.0),
    "model.audio.fmax": _optional(_number(0.0, lo_open=True)),
    "model.audio.top_db": _optional(_number(0.0, lo_open=True)),
    "model.audio.dft": _one_of("matmul", "fft"),
    "model.audio.patch_frames": _pos_int,
    "model.audio.patch_mels": _pos_int,
    "model.audio.mean_db": _number(),
    "model.audio.std_db": _number(0.0, lo_open=True),
    "model.ttm.memory_size": _pos_int,
    "model.ttm.token_learner_hidden": _pos_int,
    "model.text_decoder.max_length": _pos_int,
    **{f"model.{s}.{f}": check for s in STACKS for f, check in _STACK_FIELDS.items()},
    "loss.latent_loss_weight": _number(0.0),
    "loss.normalize_latent_target": _bool,
    "loss.latent_loss": _one_of(*LATENT_LOSSES),
    "loss.latent_temperature": _number(0.0, lo_open=True),
    "loss.latent_negatives": _one_of(*LATENT_NEGATIVES),
    "loss.latent_loss_decay_steps": _nonneg_int,
    "data.num_frames": _pos_int,
    "data.text_length": _pos_int,
    "data.batch_size": _pos_int,
    "data.task": _nonempty_str,
    "data.task_modules": _str,
    "data.tfds_data_dir": _str,
    "data.vocab_path": _str,
    "data.mixture_rates": _rates,
    "data.shuffle_buffer": _pos_int,
    "data.reset_position": _bool,
    "checkpoint.every_steps": _pos_int,
    "checkpoint.keep": _pos_int,
    "checkpoint.async_save": _bool,
    "init_from": _str,
    "init_from_allow.missing": _bool,
    "init_from_allow.unexpected": _bool,
    "init_from_allow.shape_mismatch": _bool,
    "train.num_steps": _pos_int,
    "train.learning_rate": _number(0.0, lo_open=True),
    "train.warmup_steps": _nonneg_int,
    "train.end_learning_rate_fraction": _number(0.0, 1.0),
    "train.weight_decay": _number(0.0),
    "train.grad_clip_norm": _optional(_number(0.0, lo_open=True)),
    "train.adam_b1": _number(0.0, 1.0),
    "train.adam_b2": _number(0.0, 1.0),
    "train.log_every": _pos_int,
    "train.microbatches": _pos_int,
    "train.profile_steps": _nonneg_int,
    "train.profile_from_step": _nonneg_int,
    "eval.max_new_tokens": _pos_int,
    "eval.decode_method": _one_of("greedy", "beam", "sample"),
    "eval.beam_size": _pos_int,
    "eval.length_penalty": _number(0.0),
    "eval.temperature": _number(0.0),
    "eval.top_k": _nonneg_int,
    "eval.top_p": _number(0.0, 1.0, lo_open=True),
    "eval.split": _nonempty_str,
    "eval.every_steps": _nonneg_int,
    "eval.max_batches": _nonneg_int,
}


def leaves(cfg: ml_collections.ConfigDict, prefix: str = ""):
    """(dotted field name, value) of every leaf of `cfg`."""
    for key in cfg.keys():
        value = cfg[key]
        path = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            yield from leaves(value, path + ".")
        else:
            yield path, value


def from_saved(saved: dict) -> ml_collections.ConfigDict:
    """A config saved as JSON (with a checkpoint) over `base_config()`, so fields added since keep
    their defaults; not validated."""
    def merge(config: ml_collections.ConfigDict, values: dict) -> None:
        for key, value in values.items():
            if isinstance(value, dict) and isinstance(config.get(key), ml_collections.ConfigDict):
                merge(config[key], value)
            else:  # JSON has no tuples; keep the default's sequence type (mesh_shape)
                default = config.get(key)
                config[key] = type(default)(value) if isinstance(default, tuple) and isinstance(value, list) else value

    config = base_config()
    merge(config, saved)
    return config


# Fields of `model` that change how the model computes, not what it computes: evaluating with other
# values than training's is fine (params are cast to param_dtype; dropout is off when evaluating).
HOW_NOT_WHAT = frozenset({"model.dtype", "model.param_dtype", "model.remat_policy", "model.attention_impl",
                          "model.combiner_outputs_only", "model.audio.dft", "model.dropout_rate",
                          "model.modality_dropout"})


def model_differences(config: ml_collections.ConfigDict, saved: dict, also: frozenset = frozenset()) -> list[str]:
    """`config.FIELD: VALUE here, VALUE in the checkpoint` for each field that defines the trained
    model (`model.*` but `HOW_NOT_WHAT`, and `data.vocab_path`; plus the fields in `also`) where
    `config` and the checkpoint's saved config (a dict) differ."""
    here, differ = dict(leaves(config)), []
    for field, value in leaves(from_saved(saved)):
        if field not in also and (not (field.startswith("model.") or field == "data.vocab_path")
                                  or field in HOW_NOT_WHAT):
            continue
        ours = here.get(field)
        if ours != value and not (field == "data.vocab_path" and _same_file(ours, value)):
            differ.append(f"config.{field}: {ours!r} here, {value!r} in the checkpoint")
    return differ


def _same_file(a: str, b: str) -> bool:
    try:
        return bool(a and b) and epath.Path(a).read_bytes() == epath.Path(b).read_bytes()
    except OSError:
        return False


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
    _require(m.combiner_readout == "joint" or m.combiner == "transformer", "model.combiner_readout",
             "'joint' with model.combiner 'ttm' (the TTM Combiner reads its outputs through TokenLearner; "
             "'per_modality' is the Transformer Combiner's)", m.combiner_readout)
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
