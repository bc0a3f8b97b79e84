"""The checkpointer: save every N steps (keep K, asynchronously), resume on any mesh, survive
corruption. Params-only restores (fine-tuning, evaluation) are `restore.py`'s, preemption
`preemption.py`'s, remote paths `mirasol3b/paths.py`'s.

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
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import time
from collections.abc import Sequence
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import linen as nn

from mirasol3b import distributed, errors, sharding
from mirasol3b.errors import CheckpointMismatchError
from mirasol3b.paths import as_path, require_gcs_client, write_text_atomically
from mirasol3b.train.fingerprint import fingerprint, verify
from mirasol3b.train.tree_diff import compare_trees, flat, mismatch_message, shape_dtype

CORRUPT_RECORD = "corrupt_checkpoints.json"
_TMP_STEP = re.compile(r"^(\d+)\.orbax-checkpoint-tmp")
_COMMIT_FILE = "commit_success.txt"  # Orbax writes it last into every step it finalizes


def with_shardings(abstract, shardings):
    """Restore target: `ShapeDtypeStruct(shape, dtype, sharding)` leaves from an abstract tree (boxed
    or not, e.g. `train/state.abstract_state(...)[0]`) and a matching tree of shardings (e.g.
    `train/state.state_shardings(abstract, mesh)` for the mesh to restore onto)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        nn.unbox(abstract), shardings)


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

    def state_metadata(self, step: int):
        """Orbax's metadata of `step`'s state item (array shapes and dtypes), or None if unreadable."""
        return self._manager.item_metadata(step)["state"]

    def restore_step(self, step: int, args: ocp.args.Composite):
        """Orbax's restore of `step` with `args` (the items to read and how)."""
        return self._manager.restore(step, args=args)

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
        if distributed.primary_decides(blocker is not None):
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
        meta = self.state_metadata(step)
        if meta is None:
            raise errors.NotFoundError(f"no readable state metadata in {self.step_path(step)}")
        saved = {p: shape_dtype(m) for p, m in flat(meta).items()}
        model = {p: shape_dtype(a) for p, a in flat(abstract).items()}
        missing, unexpected, mismatched = compare_trees(saved, model)
        if missing or unexpected or mismatched:
            raise CheckpointMismatchError(mismatch_message(
                f"checkpoint step {step} at {self.step_path(step)} does not fit the model (a different "
                "config, e.g. model.param_dtype? resume with the config it was saved with, or start a new "
                "workdir with init_from to fine-tune):", missing, unexpected, mismatched))

    def restore_first_good(self, attempt):
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
            if distributed.all_agree(error is None):
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
            verify(restored.state, restored.fingerprint)
            return restored.state, own_data_state(restored.data, jax.process_index())

        found = self.restore_first_good(attempt)
        if found is None:
            return None
        step, (state, data_state) = found
        logging.info("restored checkpoint step %d from %s", step, self.step_path(step))
        return step, state, data_state


@contextlib.contextmanager
def _absl_level(level: int):
    previous = logging.get_verbosity()
    logging.set_verbosity(min(previous, level))
    try:
        yield
    finally:
        logging.set_verbosity(previous)
