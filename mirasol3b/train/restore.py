"""Restoring params only (no optimizer state, no step) from a run's checkpoints: what fine-tuning
(`init_from`), evaluation and answering read; and the config a run was trained with.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import linen as nn

from mirasol3b import configlib, errors, sharding
from mirasol3b.errors import CheckpointMismatchError
from mirasol3b.model import Mirasol3B
from mirasol3b.paths import run_dir
from mirasol3b.train.checkpointer import Checkpointer, with_shardings
from mirasol3b.train.fingerprint import verify
from mirasol3b.train.optimizer import make_optimizer
from mirasol3b.train.state import abstract_state, example_batch, state_shardings
from mirasol3b.train.tree_diff import compare_trees, flat, mismatch_message, unflatten_like


def load_params_for_finetuning(init_from: epath.PathLike, abstract_params, *, fresh_params=None,
                               allow_missing: bool = False, allow_unexpected: bool = False,
                               allow_shape_mismatch: bool = False):
    """Params only (no optimizer state, no step) from the newest good checkpoint of another run.

    `init_from`: that run's workdir (or its `checkpoints` directory), local or a URI such as
    `gs://bucket/runs/x`. `abstract_params`:
    `ShapeDtypeStruct` leaves with the shardings to load onto. Paths in the model but not in the
    checkpoint (missing), in the checkpoint but not in the model (unexpected), and shapes that
    differ raise `CheckpointMismatchError` listing them, unless allowed: then missing and
    mismatched params keep their value from `fresh_params` (the new run's initialisation),
    unexpected ones are dropped, and the lists are logged. Params are read at the dtype they were
    saved in, checked against the checkpoint's fingerprint, then cast to the model's (fine-tuning
    in bfloat16 from a float32 run). Corrupt steps fall back as in `Checkpointer.restore_latest`.
    """
    return params_from_checkpoint(init_from, abstract_params, fresh_params=fresh_params, allow_missing=allow_missing,
                          allow_unexpected=allow_unexpected, allow_shape_mismatch=allow_shape_mismatch,
                          what="init_from")[1]


def latest_saved_config(workdir: epath.PathLike, what: str = "restore") -> tuple[int, dict | None] | None:
    """(step, the config saved with it as a dict, or None) of the newest step of the run in `workdir`
    (or its `checkpoints` directory); None when it has no step."""
    with Checkpointer(run_dir(workdir, what), save_every=1, keep=1, read_only=True) as source:
        step = source.latest_step()
        return None if step is None else (step, source.saved_config(step))


def params_from_checkpoint(workdir: epath.PathLike, abstract_params, *, fresh_params=None, allow_missing: bool = False,
                   allow_unexpected: bool = False, allow_shape_mismatch: bool = False,
                   what: str = "restore") -> tuple[int, Any]:
    """(step, params) of `workdir`'s newest good checkpoint, without its optimizer state: what
    fine-tuning (`load_params_for_finetuning`), evaluation and answering read. Arguments as
    `load_params_for_finetuning`'s; `what` names the caller in messages."""
    if (allow_missing or allow_shape_mismatch) and fresh_params is None:
        raise ValueError(f"{what}: allow_missing / allow_shape_mismatch need `fresh_params`, the values that "
                         "params missing from the checkpoint or of another shape keep")
    source = Checkpointer(run_dir(workdir, what), save_every=1, keep=1, read_only=True,
                          _state_handler=ocp.PyTreeCheckpointHandler())
    abstract_params = nn.unbox(abstract_params)
    model = flat(abstract_params)
    report: dict = {}
    hint = ("config.init_from_allow.missing / unexpected / shape_mismatch accept the differences"
            if what == "init_from" else "use the config the run was trained with")

    def attempt(step):
        meta = source.state_metadata(step)
        saved_meta = flat(meta["params"])
        saved = {p: tuple(m.shape) for p, m in saved_meta.items()}
        missing, unexpected, mismatched = compare_trees(saved, {p: tuple(a.shape) for p, a in model.items()})
        refused = [(missing, allow_missing), (unexpected, allow_unexpected), (mismatched, allow_shape_mismatch)]
        load = {p: jax.ShapeDtypeStruct(a.shape, saved_meta[p].dtype, sharding=a.sharding)
                for p, a in model.items() if saved.get(p) == tuple(a.shape)}
        if any(items and not allowed for items, allowed in refused) or not load:
            sample = "" if load else (f"\n  no param fits; model names like {sorted(model)[:3]}, checkpoint "
                                      f"names like {sorted(saved)[:3]}")
            raise CheckpointMismatchError(mismatch_message(
                f"{what}: params of checkpoint step {step} at {source.step_path(step)} do not fit the "
                f"model ({hint}):" + sample,
                missing, unexpected, mismatched))
        item = {"params": unflatten_like(abstract_params, load)}
        restored = source.restore_step(step, ocp.args.Composite(
            state=ocp.args.PyTreeRestore(item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                                         partial_restore=True),
            fingerprint=ocp.args.JsonRestore()))
        verify(restored.state["params"], restored.fingerprint, prefix="params/")
        report.update(missing=missing, unexpected=unexpected, mismatched=mismatched)
        return flat(restored.state["params"])

    try:
        found = source.restore_first_good(attempt)
    finally:
        source.close()
    if found is None:
        raise errors.NotFoundError(f"{what}: no usable checkpoint in {source.directory}"
                                + "".join(f"\n  {p}" for p in source.problems))
    step, loaded = found
    cast = sorted(f"{p}: {loaded[p].dtype} -> {model[p].dtype}" for p in loaded if loaded[p].dtype != model[p].dtype)
    loaded = {p: x.astype(model[p].dtype) for p, x in loaded.items()}
    fresh = flat(fresh_params) if fresh_params is not None else {}
    params = unflatten_like(abstract_params, {p: loaded[p] if p in loaded else fresh[p] for p in model})
    kept_fresh = report["missing"] + [m.split(":")[0] for m in report["mismatched"]]
    logging.info("%s: loaded %d params from step %d of %s", what, len(loaded), step, source.directory)
    if cast:
        logging.info("%s: %d params cast to the model's dtype, e.g. %s", what, len(cast), cast[0])
    if kept_fresh or report["unexpected"]:
        logging.warning("%s", mismatch_message(
            f"{what} step {step}: {len(kept_fresh)} params keep their fresh initialisation, "
            f"{len(report['unexpected'])} checkpoint params are dropped:",
            report["missing"], report["unexpected"], report["mismatched"]))
    return step, params


# ---- evaluation and answering: a run's params and the config it was trained with ------------------------

def workdir_of(workdir: epath.PathLike) -> epath.Path:
    """The training run's workdir, given it or its `checkpoints` directory."""
    try:
        return run_dir(workdir, f"workdir {os.fspath(workdir)!r}")
    except errors.NotFoundError as e:
        raise errors.NotFoundError(f"{e}; train there first with `python -m mirasol3b.main --workdir=...`") from None


def _read_only(workdir: epath.PathLike) -> Checkpointer:
    return Checkpointer(workdir_of(workdir), save_every=1, keep=1, read_only=True)


def restore_params(config: ml_collections.ConfigDict, workdir: epath.PathLike,
                   mesh: jax.sharding.Mesh | None = None):
    """(step, params) of `workdir`'s (or its `checkpoints` directory's) latest good checkpoint,
    sharded over `mesh` (default: this process's first device).

    Params only: the optimizer state (twice their size) is never read, so the optimizer config need
    not match training's, and params saved in another dtype are cast to `config.model.param_dtype`.
    Corrupt steps are reported and skipped (`Checkpointer.restore_latest`).
    """
    workdir = workdir_of(workdir)
    if mesh is None:
        mesh = sharding.make_mesh((1, 1, 1), devices=jax.local_devices()[:1])
    model, optimizer = Mirasol3B(config.model), make_optimizer(config.train)
    boxed, _ = abstract_state(model, optimizer, example_batch(config, 1))
    target = with_shardings(boxed.params, state_shardings(boxed, mesh).params)
    return params_from_checkpoint(workdir, target, what=f"workdir {os.fspath(workdir)!r}")


def stored_config(workdir: epath.PathLike) -> tuple[dict | None, epath.Path]:
    """(the config saved with `workdir`'s latest checkpoint as a dict, or None if it stores none; its path)."""
    with _read_only(workdir) as ckpt:
        step = ckpt.latest_step()
        if step is None:
            raise errors.NotFoundError(f"no checkpoint in workdir {workdir!r} ({ckpt.directory})")
        return ckpt.saved_config(step), epath.Path(ckpt.step_path(step)) / "config"


def config_from_workdir(workdir: epath.PathLike, stored: tuple | None = None) -> ml_collections.ConfigDict:
    """The config stored with `workdir`'s latest checkpoint, over `base_config()` defaults (so fields
    added since it was saved get theirs), validated. `stored`: `stored_config(workdir)` if already read."""
    saved, path = stored or stored_config(workdir)
    if saved is None:
        raise errors.NotFoundError(f"checkpoint {path.parent} stores no config; pass --config")
    return configlib.validate(from_saved(saved))  # a field the code no longer knows is an error naming it


def check_config_matches_checkpoint(config: ml_collections.ConfigDict, workdir: epath.PathLike,
                                    stored: tuple | None = None) -> None:
    """Raises `ConfigError` naming each field that defines the trained model
    (`model_differences`) whose value differs from the config stored with `workdir`'s
    checkpoint. Params of the same shapes restore under another window, readout or geometry, and
    would be scored as another model without a word. `stored`: `stored_config(workdir)` if read."""
    saved, path = stored or stored_config(workdir)
    differ = model_differences(config, saved) if saved is not None else []
    if differ:
        raise errors.ConfigError(
            f"the config given differs from the one the checkpoint was trained with ({path}) in fields that "
            "define the model:" + "".join(f"\n  {d}" for d in differ) + "\nOmit --config to use the checkpoint's "
            "own, give the training run's overrides too, or pass --noconfig_check to use these values on purpose.")


# ---- comparing a config with a checkpoint's ---------------------------------------------------------

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

    config = configlib.base_config()
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
    here, differ = dict(configlib.leaves(config)), []
    for field, value in configlib.leaves(from_saved(saved)):
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


def eval_config(config: ml_collections.ConfigDict | None, workdir: str, *, check: bool,
                stored: tuple | None = None) -> ml_collections.ConfigDict:
    """The config to evaluate or answer with, validated: `config` (if `check`, refused where it
    differs from the checkpoint's in what the model is), or else the one the checkpoint stores.
    `stored`: `stored_config(workdir)`, when the caller has read it."""
    if config is None:
        config = config_from_workdir(workdir, stored)
    elif check:
        check_config_matches_checkpoint(config, workdir, stored)
    return configlib.validate_eval(configlib.validate(config))
