"""Checkpoints: save every N steps (keep K, asynchronously), resume on any mesh, survive corruption
and preemption, and load params only for fine-tuning.

Layout: an Orbax `CheckpointManager` in `{workdir}/checkpoints`, one directory per step, items
  state        the `TrainState` (params, optimizer state, step)          StandardSave
  data         the data iterator's position (a JSON-able dict)             JsonSave
               several processes: {"per_process": [process 0's, process 1's, ...]}
  config       the run's config (`to_json_best_effort`)                    JsonSave
  fingerprint  two uint32 checksums per array of `state`                   JsonSave

Corrupt or half-written checkpoints. A crash mid-save leaves `<step>.orbax-checkpoint-tmp`, which
Orbax never lists as a step; a finalized step can still be damaged later (truncated or garbled
files, unreadable metadata). `restore_latest` tries the newest step first; when reading it fails
(Orbax or TensorStore raises, or the restored arrays do not match the fingerprint written at save
time, which also catches damage TensorStore reads without complaint), it logs a warning naming the
step and its path, records it in `self.problems` and in `{workdir}/corrupt_checkpoints.json`, and
falls back to the next older step. Nothing is moved, deleted or overwritten:
  * retention (keep K) counts only good steps, and never deletes a step recorded as corrupt;
  * a later save whose step directory (or a half-written temporary one) already exists is skipped
    with a warning: after falling back from a corrupt step 6 to step 4, the run's next save at
    step 6 is skipped and the one after goes ahead (a preemption exactly at step 6 therefore
    loses the steps since 4, as a crash would).
A checkpoint whose arrays are readable but do not fit the model (other shapes or parameter names)
is not corruption: `CheckpointMismatchError` names the paths instead of silently falling back.

Preemption. `PreemptionGuard` turns SIGTERM (and SIGINT) into a flag; the loop asks
`guard.should_stop(step)` after each step, force-saves, waits for the write and exits with
`PREEMPTED_EXIT_CODE` (143 = 128 + SIGTERM, what a process killed by SIGTERM reports, so a
scheduler restarts the job rather than marking it complete). With several processes a host's own
flag is not enough: every host must save at the same step, so `should_stop` then asks
`jax.experimental.multihost_utils.reached_preemption_sync_point(step)`, for which
`jax.distributed` (its preemption service, on by default) catches SIGTERM itself and agrees on the
step; the guard installs no Python handler there, as it would replace that one.

Remote workdirs. `workdir` may be a local path or a URI such as `gs://bucket/runs/x` (what TPU pod
slices use): Orbax reads and writes `gs://` itself (TensorStore's GCS driver), and every other file
this module touches (the corrupt-checkpoint record, the step listing) goes through
`etils.epath.Path` (`tf.io.gfile` when TensorFlow is installed). Local paths are made absolute;
URIs are kept as given (`os.path.abspath` would turn `gs://b/x` into `$PWD/gs:/b/x`). Orbax asks
google-cloud-storage whether a bucket has a hierarchical namespace before it lists steps there, a
package it does not require: `Checkpointer` says so up front (`require_gcs_client`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import linen as nn
from jax.experimental import multihost_utils

from mirasol3b import sharding

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM
CORRUPT_RECORD = "corrupt_checkpoints.json"
_TMP_STEP = re.compile(r"^(\d+)\.orbax-checkpoint-tmp")
_COMMIT_FILE = "commit_success.txt"  # Orbax writes it last into every step it finalizes


class CheckpointMismatchError(ValueError):
    """A checkpoint's arrays do not fit the model: missing, unexpected or differently shaped paths."""


class CheckpointCorruptError(RuntimeError):
    """A checkpoint could be read, but its arrays differ from what was written (or no checkpoint of
    a run could be restored)."""


# ---- helpers -----------------------------------------------------------------------------------

def is_remote(path: epath.PathLike) -> bool:
    """True for a URI (`gs://bucket/...`, `s3://...`): a path `os` functions cannot reach."""
    return "://" in os.fspath(path)


def as_path(path: epath.PathLike) -> epath.Path:
    """`path` as an `epath.Path`: local paths made absolute, URIs (`gs://...`) kept as they are."""
    return epath.Path(path) if is_remote(path) else epath.Path(os.path.abspath(path))


def require_gcs_client(directory: epath.PathLike) -> None:
    """Raises ImportError naming the package when `directory` is `gs://` and google-cloud-storage is
    missing (Orbax imports it to list checkpoint steps in a bucket; without it every call fails
    with a bare "cannot import name 'storage' from 'google.cloud'")."""
    if not os.fspath(directory).startswith("gs://"):
        return
    try:
        from google.cloud import storage  # noqa: F401
    except ImportError as e:
        raise ImportError(f"checkpoints in {os.fspath(directory)} need google-cloud-storage (Orbax lists a "
                          "bucket's checkpoint steps with it): pip install google-cloud-storage") from e


def write_text_atomically(path: epath.Path, text: str) -> None:
    """Writes `text` to `path` so that a reader sees the old file or the new one, never half of one.

    Local: a temporary file renamed over `path` (`os.replace`, atomic on POSIX). Remote (GCS):
    written directly, because an object becomes visible only once its upload completes, whole,
    while a "rename" there is a copy then a delete, with no atomicity of its own.
    """
    if is_remote(path):
        path.write_text(text)
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def with_shardings(abstract, shardings):
    """Restore target: `ShapeDtypeStruct(shape, dtype, sharding)` leaves from an abstract tree (boxed
    or not, e.g. `train/state.abstract_state(...)[0]`) and a matching tree of shardings (e.g.
    `train/state.state_shardings(abstract, mesh)` for the mesh to restore onto)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        nn.unbox(abstract), shardings)


def _path_str(path) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")


def _flat(tree) -> dict[str, Any]:
    """'a/b/c' -> leaf (arrays, ShapeDtypeStructs or Orbax array metadata: anything with `.shape`)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    return {_path_str(p): leaf for p, leaf in leaves}


def _leaf_fingerprint(x: jax.Array) -> jax.Array:
    """Two uint32 checksums of `x`'s bits: their sum, and their sum weighted by a hash of each
    element's position. Integer sums mod 2**32 are exact in any order, so the result does not
    depend on the sharding (a checkpoint restored onto another mesh checks against the same)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        words = x.astype(jnp.uint32)
    else:
        unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
        words = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)  # 8 bytes: a trailing (2,)
    index = jnp.zeros(words.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(words.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis) * jnp.uint32(stride % 2**32)
        stride *= words.shape[axis]
    weights = index * jnp.uint32(0x9E3779B1) + jnp.uint32(0x7F4A7C15)
    return jnp.stack([jnp.sum(words, dtype=jnp.uint32), jnp.sum(words * weights, dtype=jnp.uint32)])


# One program per leaf shape, dtype and sharding (20 for the tiny model's 456 state arrays), not one
# over the whole tree: that compiled in 7 s on CPU against 2 s for these, and every new sharding
# (a restore onto another mesh) compiled it again.
_leaf_fingerprint_fn = jax.jit(_leaf_fingerprint)


def fingerprint(tree) -> dict[str, list[int]]:
    """'path' -> [sum, weighted sum] for every array leaf of `tree` (computed where it lives)."""
    # One leaf at a time: hundreds of small collective programs in flight at once can starve
    # XLA:CPU's rendezvous of threads (it aborted the process after 40 s on 8 host devices).
    sums = jax.tree.map(lambda x: np.asarray(_leaf_fingerprint_fn(x)), tree)
    return {path: [int(v) for v in np.asarray(leaf)] for path, leaf in _flat(sums).items()}


def _verify(restored, expected: dict[str, list[int]], prefix: str = "") -> None:
    got = fingerprint(restored)
    bad = sorted(p for p, v in got.items() if expected.get(prefix + p) != v)
    if bad:
        raise CheckpointCorruptError(
            f"{len(bad)} of {len(got)} arrays differ from the fingerprint written at save time: "
            + ", ".join(prefix + p for p in bad[:5]) + (" ..." if len(bad) > 5 else ""))


def _shape_dtype(x) -> str:
    """'(shape) dtype' of an array, ShapeDtypeStruct or Orbax array metadata."""
    return f"{tuple(x.shape)} {jnp.dtype(x.dtype).name}"


def _all_agree(ok: bool) -> bool:
    """True only if every process says True (one process: itself)."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok, np.int32))))


def primary_decides(value: bool) -> bool:
    """Process 0's `value`, on every process (one process: itself)."""
    if jax.process_count() == 1:
        return value
    return bool(multihost_utils.broadcast_one_to_all(np.asarray(value, np.int32)))


PER_PROCESS = "per_process"


def _gather_data_states(data_state: dict):
    """What the `data` item holds: `data_state` itself with one process; with several, every
    process's (each host reads its own shard, so positions differ), because Orbax writes JSON items
    from the primary process only."""
    states = sharding.gather_json(data_state)
    return data_state if len(states) == 1 else {PER_PROCESS: states}


def own_data_state(saved, process_index: int):
    """This process's data state from a restored `data` item. Saved by another number of processes:
    entry `process_index` modulo their count (the iterator's `set_state` refuses a position saved for
    another sharding, as the SeqIO pipeline's does)."""
    if isinstance(saved, dict) and set(saved) == {PER_PROCESS}:
        entries = saved[PER_PROCESS]
        return entries[process_index % len(entries)]
    return saved


def _short(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def compare_trees(checkpoint: dict[str, Any], model: dict[str, Any]):
    """(missing, unexpected, mismatched) from 'path' -> what must agree (a shape tuple, or
    `_shape_dtype`'s text); mismatched as printable lines."""
    missing = sorted(set(model) - set(checkpoint))
    unexpected = sorted(set(checkpoint) - set(model))
    mismatched = sorted(f"{p}: checkpoint {checkpoint[p]} vs model {model[p]}"
                        for p in set(model) & set(checkpoint) if checkpoint[p] != model[p])
    return missing, unexpected, mismatched


MISMATCH_LINES = 25  # paths listed per kind of mismatch (a dtype change mismatches hundreds)


def _mismatch_message(what: str, missing, unexpected, mismatched) -> str:
    lines = [what]
    for title, items in (("missing from the checkpoint (in the model only)", missing),
                         ("unexpected (in the checkpoint only)", unexpected),
                         ("shape or dtype mismatch", mismatched)):
        if items:
            lines.append(f"  {title}: {len(items)}")
            lines += [f"    {p}" for p in items[:MISMATCH_LINES]]
            if len(items) > MISMATCH_LINES:
                lines.append(f"    ... and {len(items) - MISMATCH_LINES} more")
    return "\n".join(lines)


@dataclasses.dataclass
class _LatestGoodN:
    """Orbax preservation policy: the latest `n` steps not known to be corrupt, and every corrupt one."""
    n: int
    corrupt: dict

    def should_preserve(self, checkpoints: Sequence, *, context=None) -> Sequence[bool]:
        good = sorted(c.step for c in checkpoints if c.step not in self.corrupt)
        keep = set(good[-self.n:])
        return [c.step in self.corrupt or c.step in keep for c in checkpoints]


def _config_json(config) -> Any:
    if config is None:
        return None
    if hasattr(config, "to_json_best_effort"):
        return json.loads(config.to_json_best_effort())
    return json.loads(json.dumps(config, default=str))


# ---- the checkpointer ----------------------------------------------------------------------------

class Checkpointer:
    """Saves every `save_every` steps into `{workdir}/checkpoints`, keeping the latest `keep` good ones.

    Saves are asynchronous by default: `maybe_save` returns once the arrays are copied off the
    devices (the state may then be donated to the next step) and the files are written in the
    background; `wait()` blocks until they are complete, `close()` also releases the manager.
    Every process calls every method (Orbax synchronises them).
    """

    def __init__(self, workdir: epath.PathLike, *, save_every: int, keep: int, async_save: bool = True,
                 read_only: bool = False, _state_handler=None):
        if save_every < 1 or keep < 1:
            raise ValueError(f"save_every and keep must be >= 1, got {save_every} and {keep}")
        # Strings (absolute local paths, or URIs as given), for messages and callers; file
        # operations go through `epath.Path` (see "Remote workdirs" in the module docstring).
        workdir_path = as_path(workdir)
        self.workdir = os.fspath(workdir_path)
        self.directory = os.fspath(workdir_path / "checkpoints")
        self.save_every, self.keep, self.read_only = save_every, keep, read_only
        self.record_path = os.fspath(workdir_path / CORRUPT_RECORD)
        require_gcs_client(self.directory)
        self.corrupt: dict[int, str] = self._read_record()  # step -> why; shared with the policy
        self.problems: list[str] = []  # every warning this checkpointer reported
        self._saved: set[int] = set()
        handlers = {"state": _state_handler or ocp.StandardCheckpointHandler(),
                    "data": ocp.JsonCheckpointHandler(), "config": ocp.JsonCheckpointHandler(),
                    "fingerprint": ocp.JsonCheckpointHandler()}
        options = ocp.CheckpointManagerOptions(
            create=not read_only, read_only=read_only, enable_async_checkpointing=async_save,
            save_interval_steps=0 if read_only else 1,  # this class decides when to save (maybe_save)
            preservation_policy=_LatestGoodN(keep, self.corrupt), lightweight_initialize=True)
        # Orbax warns "Given directory is read only" on every evaluate and answer: what was asked for.
        with _absl_level(logging.ERROR) if read_only else contextlib.nullcontext():
            self._manager = ocp.CheckpointManager(self.directory, item_handlers=handlers, options=options)

    # -- bookkeeping --

    def step_path(self, step: int) -> str:
        return os.fspath(epath.Path(self.directory) / str(step))

    def _read_record(self) -> dict[int, str]:
        record = epath.Path(self.record_path)
        try:
            if not record.exists():
                return {}
            return {int(k): v for k, v in json.loads(record.read_text()).items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, AttributeError) as e:
            logging.warning("could not read %s (%s); treating no step as known-corrupt", self.record_path, e)
            return {}

    def _write_record(self) -> None:
        if self.read_only or jax.process_index() != 0:
            return
        text = json.dumps({str(k): v for k, v in sorted(self.corrupt.items())}, indent=1)
        write_text_atomically(epath.Path(self.record_path), text)

    def _report(self, message: str) -> None:
        logging.warning("%s", message)
        self.problems.append(message)

    def _half_written(self) -> dict[int, str]:
        """step -> path of a save that never finished: an Orbax temporary directory (local disks,
        which rename on commit) or a step directory without Orbax's commit file (`gs://`, where
        Orbax writes in place and commits by writing that file last)."""
        directory = epath.Path(self.directory)
        try:
            names = [p.name for p in directory.iterdir()] if directory.exists() else []
        except FileNotFoundError:
            return {}
        found, finalized = {}, set(self._manager.all_steps())
        for name in names:
            if m := _TMP_STEP.match(name):
                found[int(m.group(1))] = os.fspath(directory / name)
            elif name.isdigit() and int(name) not in finalized and not (directory / name / _COMMIT_FILE).exists():
                found[int(name)] = os.fspath(directory / name)
        return found

    def saved_config(self, step: int) -> dict | None:
        """The config saved with `step`, as a dict (None if it stores none)."""
        path = epath.Path(self.step_path(step)) / "config"
        if not path.exists():
            return None
        with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as reader:
            return reader.restore(path, args=ocp.args.JsonRestore()) or None

    def latest_step(self) -> int | None:
        """The newest finalized step not known to be corrupt (not yet verified: see restore_latest)."""
        self._manager.reload()
        steps = [s for s in self._manager.all_steps() if s not in self.corrupt]
        return max(steps) if steps else None

    def all_steps(self) -> list[int]:
        """Every finalized step directory, corrupt ones included."""
        self._manager.reload()
        return sorted(self._manager.all_steps())

    # -- saving --

    def maybe_save(self, step: int, state, data_state: dict, config=None, *, force: bool = False) -> bool:
        """Saves at every `save_every`-th step, or any step if `force`; True if `step` is saved.

        Never overwrites: if `step`'s directory already exists (a corrupt or half-written
        checkpoint this run fell back from) the save is skipped with a warning and False returned.
        """
        step = int(step)
        if step in self._saved:
            return True  # e.g. the periodic save already wrote the step a preemption stops at
        if not force and step % self.save_every:
            return False
        existing = self.step_path(step)
        blocker = existing if epath.Path(existing).exists() else self._half_written().get(step)
        if primary_decides(blocker is not None):
            self._report(f"checkpoint step {step}: not saved, because {blocker or existing} already exists "
                         "(a corrupt or half-written checkpoint, left untouched); the next save goes ahead")
            return False
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(_gather_data_states(data_state)),
            config=ocp.args.JsonSave(_config_json(config)),
            fingerprint=ocp.args.JsonSave(fingerprint(state)))
        self._manager.save(step, args=args, force=True)
        self._saved.add(step)
        return True

    def wait(self) -> None:
        """Blocks until every started save is on disk (and old steps are removed)."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- restoring --

    def _check_fits(self, step: int, abstract) -> None:
        """Raises CheckpointMismatchError if `step`'s state has other paths, shapes or dtypes than
        `abstract`. Dtypes count: Orbax would cast on restore, the fingerprint would then differ and
        every good step would be taken for corrupt (e.g. a run resumed with another param_dtype)."""
        meta = self._manager.item_metadata(step)["state"]
        if meta is None:
            raise FileNotFoundError(f"no readable state metadata in {self.step_path(step)}")
        saved = {p: _shape_dtype(m) for p, m in _flat(meta).items()}
        model = {p: _shape_dtype(a) for p, a in _flat(abstract).items()}
        missing, unexpected, mismatched = compare_trees(saved, model)
        if missing or unexpected or mismatched:
            raise CheckpointMismatchError(_mismatch_message(
                f"checkpoint step {step} at {self.step_path(step)} does not fit the model (a different "
                "config, e.g. model.param_dtype? resume with the config it was saved with, or start a new "
                "workdir with init_from to fine-tune):", missing, unexpected, mismatched))

    def _restore_first_good(self, attempt):
        """Runs `attempt(step)` from the newest step down; reports every failure; None if all fail."""
        self.wait()
        self._manager.reload()
        steps = sorted(self._manager.all_steps(), reverse=True)
        for step, path in sorted(self._half_written().items()):
            if step not in self._saved:
                self._report(f"checkpoint step {step} at {path} is half-written (its save never finished); "
                             "ignored and left untouched")
        for i, step in enumerate(steps):
            error = None
            try:
                result = attempt(step)
            except CheckpointMismatchError:
                raise
            except Exception as e:  # noqa: BLE001 - any failure to read means: not usable
                error, result = e, None
            if _all_agree(error is None):
                if step in self.corrupt:
                    logging.info("checkpoint step %d, recorded as corrupt, now reads correctly", step)
                    del self.corrupt[step]
                    self._write_record()
                return step, result
            fallback = f"falling back to step {steps[i + 1]}" if i + 1 < len(steps) else "no older checkpoint"
            why = _short(error) if error is not None else "another process could not read it"
            self._report(f"checkpoint step {step} at {self.step_path(step)} is corrupt or unreadable ({why}); "
                         f"left untouched; {fallback}")
            self.corrupt[step] = f"{self.step_path(step)}: {why} (found {time.strftime('%Y-%m-%d %H:%M:%S')})"
            self._write_record()
        return None

    def restore_latest(self, abstract_state) -> tuple[int, Any, dict] | None:
        """(step, state, data_state) from the newest readable checkpoint, or None if there is none.

        `abstract_state`: `jax.ShapeDtypeStruct` leaves carrying the shardings to restore onto
        (`with_shardings(abstract, state_shardings(abstract, mesh))`); any mesh works, Orbax reshards.
        Corrupt steps are reported and skipped (see the module docstring).
        """
        def attempt(step):
            self._check_fits(step, abstract_state)
            restored = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
                fingerprint=ocp.args.JsonRestore()))
            _verify(restored.state, restored.fingerprint)
            return restored.state, own_data_state(restored.data, jax.process_index())

        found = self._restore_first_good(attempt)
        if found is None:
            return None
        step, (state, data_state) = found
        logging.info("restored checkpoint step %d from %s", step, self.step_path(step))
        return step, state, data_state


# ---- fine-tuning -------------------------------------------------------------------------------

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
    return restore_params(init_from, abstract_params, fresh_params=fresh_params, allow_missing=allow_missing,
                          allow_unexpected=allow_unexpected, allow_shape_mismatch=allow_shape_mismatch,
                          what="init_from")[1]


def run_dir(workdir: epath.PathLike, what: str) -> epath.Path:
    """The run's workdir, given it or its `checkpoints` directory."""
    workdir = epath.Path(workdir)  # normalised: no trailing slash
    if not (workdir / "checkpoints").is_dir() and workdir.name == "checkpoints":
        workdir = workdir.parent
    if not (workdir / "checkpoints").is_dir():
        raise FileNotFoundError(f"{what}: no checkpoints directory at {workdir / 'checkpoints'}")
    return workdir


def latest_saved_config(workdir: epath.PathLike, what: str = "restore") -> tuple[int, dict | None] | None:
    """(step, the config saved with it as a dict, or None) of the newest step of the run in `workdir`
    (or its `checkpoints` directory); None when it has no step."""
    with Checkpointer(run_dir(workdir, what), save_every=1, keep=1, read_only=True) as source:
        step = source.latest_step()
        return None if step is None else (step, source.saved_config(step))


def restore_params(workdir: epath.PathLike, abstract_params, *, fresh_params=None, allow_missing: bool = False,
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
    model = _flat(abstract_params)
    report: dict = {}
    hint = ("config.init_from_allow.missing / unexpected / shape_mismatch accept the differences"
            if what == "init_from" else "use the config the run was trained with")

    def attempt(step):
        meta = source._manager.item_metadata(step)["state"]
        saved_meta = _flat(meta["params"])
        saved = {p: tuple(m.shape) for p, m in saved_meta.items()}
        missing, unexpected, mismatched = compare_trees(saved, {p: tuple(a.shape) for p, a in model.items()})
        refused = [(missing, allow_missing), (unexpected, allow_unexpected), (mismatched, allow_shape_mismatch)]
        load = {p: jax.ShapeDtypeStruct(a.shape, saved_meta[p].dtype, sharding=a.sharding)
                for p, a in model.items() if saved.get(p) == tuple(a.shape)}
        if any(items and not allowed for items, allowed in refused) or not load:
            sample = "" if load else (f"\n  no param fits; model names like {sorted(model)[:3]}, checkpoint "
                                      f"names like {sorted(saved)[:3]}")
            raise CheckpointMismatchError(_mismatch_message(
                f"{what}: params of checkpoint step {step} at {source.step_path(step)} do not fit the "
                f"model ({hint}):" + sample,
                missing, unexpected, mismatched))
        item = {"params": _unflatten_like(abstract_params, load)}
        restored = source._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                                         partial_restore=True),
            fingerprint=ocp.args.JsonRestore()))
        _verify(restored.state["params"], restored.fingerprint, prefix="params/")
        report.update(missing=missing, unexpected=unexpected, mismatched=mismatched)
        return _flat(restored.state["params"])

    try:
        found = source._restore_first_good(attempt)
    finally:
        source.close()
    if found is None:
        raise FileNotFoundError(f"{what}: no usable checkpoint in {source.directory}"
                                + "".join(f"\n  {p}" for p in source.problems))
    step, loaded = found
    cast = sorted(f"{p}: {loaded[p].dtype} -> {model[p].dtype}" for p in loaded if loaded[p].dtype != model[p].dtype)
    loaded = {p: x.astype(model[p].dtype) for p, x in loaded.items()}
    fresh = _flat(fresh_params) if fresh_params is not None else {}
    params = _unflatten_like(abstract_params, {p: loaded[p] if p in loaded else fresh[p] for p in model})
    kept_fresh = report["missing"] + [m.split(":")[0] for m in report["mismatched"]]
    logging.info("%s: loaded %d params from step %d of %s", what, len(loaded), step, source.directory)
    if cast:
        logging.info("%s: %d params cast to the model's dtype, e.g. %s", what, len(cast), cast[0])
    if kept_fresh or report["unexpected"]:
        logging.warning("%s", _mismatch_message(
            f"{what} step {step}: {len(kept_fresh)} params keep their fresh initialisation, "
            f"{len(report['unexpected'])} checkpoint params are dropped:",
            report["missing"], report["unexpected"], report["mismatched"]))
    return step, params


def _unflatten_like(template, flat: dict[str, Any]):
    """A tree shaped like `template` whose leaves at 'path' are `flat[path]`; other leaves dropped
    (dict entries removed) — `template` must be nested dicts, as Flax params are."""
    def build(node, prefix):
        if isinstance(node, Mapping):
            out = {}
            for key, child in node.items():
                sub = build(child, f"{prefix}{key}/")
                if sub is not None:
                    out[key] = sub
            return out or None
        path = prefix[:-1]
        return flat.get(path)
    return build(nn.unbox(template), "") or {}


# ---- preemption ----------------------------------------------------------------------------------

@contextlib.contextmanager
def _absl_level(level: int):
    previous = logging.get_verbosity()
    logging.set_verbosity(min(previous, level))
    try:
        yield
    finally:
        logging.set_verbosity(previous)


class PreemptionGuard:
    """`with PreemptionGuard() as guard:` SIGTERM/SIGINT only set a flag; the loop, after each step:

        if guard.should_stop(step):
            checkpointer.maybe_save(step, state, data_state, config, force=True)
            checkpointer.wait()
            ...leave the loop; the program exits with `guard.exit_code` (143 after SIGTERM)

    A second SIGINT raises KeyboardInterrupt (a person pressing Ctrl-C twice means now).
    Handlers can only be installed from the main thread; elsewhere the guard warns and only
    `request()` sets the flag. Several processes: see the module docstring.
    """

    def __init__(self, signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)):
        self.signals = tuple(signals)
        self.signal_received: int | None = None
        self._event = threading.Event()
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        if jax.process_count() > 1:
            logging.info("PreemptionGuard: %d processes; jax.distributed's preemption service catches "
                         "SIGTERM and should_stop() waits for its agreed step", jax.process_count())
        elif threading.current_thread() is not threading.main_thread():
            logging.warning("PreemptionGuard: not the main thread; no signal handler installed")
        else:
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, previous in self._previous.items():
            signal.signal(s, signal.SIG_DFL if previous is None else previous)  # None: set outside Python
        self._previous.clear()

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self._event.is_set():
            raise KeyboardInterrupt
        self.signal_received = signum
        self._event.set()
        # Not `logging`: a handler runs between two bytecodes of the main thread, which may hold its lock.
        with contextlib.suppress(Exception):  # no usable stderr: the flag is what matters
            os.write(sys.stderr.fileno(), f"received signal {signum}: will save a checkpoint and stop\n".encode())

    def request(self) -> None:
        """Asks the loop to save and stop, as a signal would."""
        self._event.set()

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    @property
    def exit_code(self) -> int:
        """What to exit with after the final save: 128 + the signal (143 for SIGTERM, 130 for SIGINT)."""
        return 128 + self.signal_received if self.signal_received else PREEMPTED_EXIT_CODE

    def should_stop(self, step: int) -> bool:
        """True when the loop should save `step` and stop; the same answer on every process."""
        if jax.process_count() > 1:
            return multihost_utils.reached_preemption_sync_point(int(step))
        return self.requested
