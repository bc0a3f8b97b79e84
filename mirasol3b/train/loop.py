"""The training loop: sharded state, jitted step, checkpoints and resume, progress a person can read.

    state = resume (latest good checkpoint) | init_from (params only) | fresh sharded init
    every step:   global batch -> train_step (donated) -> stop with the step named on a NaN/Inf loss
    every N:      progress line, metrics.jsonl, TensorBoard events; checkpoint; evaluation
    on SIGTERM:   save at the step reached and exit with PREEMPTED_EXIT_CODE

`workdir` may be local or a URI (`gs://bucket/runs/x` on TPU pod slices): its files are written
through `etils.epath.Path`, TensorBoard's through TensorFlow, checkpoints through Orbax, all of
which reach `gs://`.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Iterator

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from flax import linen as nn

from mirasol3b import configlib, distributed, sharding
from mirasol3b.errors import CheckpointCorruptError, CheckpointMismatchError
from mirasol3b.model import Mirasol3B
from mirasol3b.train import restore
from mirasol3b.train.batches import global_batch, model_batch
from mirasol3b.train.checkpointer import Checkpointer, with_shardings
from mirasol3b.train.logs import MetricsLog, write_metrics
from mirasol3b.train.optimizer import SCHEDULE_FIELDS, learning_rate_schedule, make_optimizer
from mirasol3b.train.preemption import PreemptionGuard
from mirasol3b.train.state import abstract_state, check_batch_shapes, state_shardings
from mirasol3b.train.step import make_train_step

class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or Inf; the last good checkpoint is kept."""


def _format_eta(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _initial_state(config, model, optimizer, example, mesh, checkpointer, data_iter):
    """(state, shardings, first step): resumed, fine-tuned from `init_from`, or fresh."""
    boxed, init = abstract_state(model, optimizer, example)
    shardings = state_shardings(boxed, mesh)
    abstract = with_shardings(nn.unbox(boxed), shardings)
    try:
        restored = checkpointer.restore_latest(abstract)
    except CheckpointMismatchError as e:
        latest = checkpointer.latest_step()
        saved = checkpointer.saved_config(latest) if latest is not None else None
        # Resuming restores the optimizer state too, whose dtypes are the params'.
        differ = restore.model_differences(config, saved, also=frozenset({"model.param_dtype"})) if saved else []
        if not differ:
            raise
        raise _fields_first(e, f"this run's config differs from the one checkpoint step {latest} was trained "
                            f"with ({checkpointer.step_path(latest)})", differ,
                            "Resume with the run's values, or train in a new workdir (config.init_from takes the "
                            "params that still fit). The checkpoint's params") from e
    if restored is not None:
        step, state, data_state = restored
        try:
            data_iter.set_state(data_state)
        except ValueError as e:  # another task, batch size, host count or seed than the saved position's
            if not config.data.reset_position:
                raise configlib.ConfigError(
                    "data.reset_position", f"True to resume checkpoint step {step} ({checkpointer.step_path(step)}) "
                    f"with another input pipeline than the one whose position it saved ({e}); the data then "
                    "restarts from its beginning", False) from e
            logging.warning("checkpoint step %d: %s; data.reset_position: the input pipeline starts from its "
                            "beginning", step, e)
        print(f"resumed from step {step} ({checkpointer.step_path(step)})", flush=True)
        _note_schedule_change(config, checkpointer.saved_config(step), step)
        return state, shardings, step
    if checkpointer.all_steps():  # starting over would bury them under new steps of the same numbers
        raise CheckpointCorruptError(
            f"no checkpoint in {checkpointer.directory} could be restored, so the run does not start over; "
            "fix or move them away (or use a new workdir):" + "".join(f"\n  {p}" for p in checkpointer.problems))
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        state = jax.jit(lambda r: nn.unbox(init(r)), out_shardings=shardings)(jax.random.key(config.seed))
    if config.init_from:
        allow = config.init_from_allow
        differ = _source_differences(config)
        try:
            params = restore.load_params_for_finetuning(
                config.init_from, abstract.params, fresh_params=state.params, allow_missing=allow.missing,
                allow_unexpected=allow.unexpected, allow_shape_mismatch=allow.shape_mismatch)
        except CheckpointMismatchError as e:
            if not differ:
                raise
            # Allowing the param differences of, say, a scan_layers change would load almost nothing.
            raise _fields_first(e, f"init_from: this config differs from {config.init_from}'s", differ,
                                "If that is meant, config.init_from_allow decides what happens to the params "
                                "that then do not fit (they start fresh)") from e
        state = state.replace(params=params)
        print(f"params initialised from {config.init_from}", flush=True)
        if differ:  # params that still fit load as they are, e.g. a vocabulary's padded table
            print(f"note: this config differs from init_from's{_field_lines(differ)}", flush=True)
    return state, shardings, 0


def _field_lines(differ: list[str]) -> str:
    return " in fields that define the model:" + "".join(f"\n  {d}" for d in differ)


def _fields_first(e: CheckpointMismatchError, head: str, differ: list[str],
                  advice: str) -> CheckpointMismatchError:
    """`e` (hundreds of param paths for, say, a scan_layers change) after the config fields that
    explain it in a line each."""
    return CheckpointMismatchError(f"{head}{_field_lines(differ)}\n{advice}:\n{e}")


def _source_differences(config: ml_collections.ConfigDict) -> list[str]:
    """`restore.model_differences` between `config` and the config saved with init_from's run."""
    found = restore.latest_saved_config(config.init_from, what="init_from")
    saved = found[1] if found else None
    return restore.model_differences(config, saved) if saved else []


def _note_schedule_change(config: ml_collections.ConfigDict, saved: dict | None, step: int) -> None:
    """Says so when the learning-rate schedule is not the one of the run that saved `step`: the
    cosine spans train.num_steps, so raising it to train on moves the rate at the resumed step."""
    before = dict(saved.get("train", {})) if saved else {}
    changed = [f for f in SCHEDULE_FIELDS if f in before and before[f] != config.train[f]]
    if not changed:
        return
    then = config.train.copy_and_resolve_references()
    then.update({f: before[f] for f in changed})
    rate, was = (float(learning_rate_schedule(t)(step)) for t in (config.train, then))
    print("note: the learning-rate schedule is not the checkpoint's run's ("
          + ", ".join(f"train.{f} {before[f]} -> {config.train[f]}" for f in changed)
          + f"): at step {step} the rate is {rate:.3g} (that run's: {was:.3g}), and follows the new schedule",
          flush=True)


def config_notes(config: ml_collections.ConfigDict) -> list[str]:
    """Valid settings that train less than they seem to (printed at the start of a run)."""
    loss, notes = config.loss, []
    # Negatives come from the microbatch (train/step.py's make_grad_fn), the whole batch when 1.
    batch, micro = config.data.batch_size, config.train.microbatches
    if loss.latent_loss == "contrastive" and loss.latent_loss_weight > 0:
        if batch // micro == 1 and loss.latent_negatives == "examples":
            size = ("data.batch_size 1" if micro == 1 else
                    "1 example per microbatch (data.batch_size / train.microbatches)")
            notes.append(f"loss.latent_negatives='examples' with {size}: the contrastive latent loss has "
                         "no negatives, so it is 0 and trains nothing; loss.latent_negatives='snippets' takes them "
                         "from the clip's other snippets")
        elif micro > 1:
            notes.append(f"train.microbatches {micro}: the contrastive latent loss takes its negatives from each "
                         f"microbatch of {batch // micro} clips, not from the batch of {batch}: a lower loss than "
                         "one pass, and an easier task; the text loss and the rest of the update are the batch's")
    return notes


def train(config: ml_collections.ConfigDict, workdir: epath.PathLike, *, data_iter: Iterator | None = None,
          evaluate_fn=None) -> dict:
    """Trains to `config.train.num_steps`, resuming from `workdir` if it holds a checkpoint.

    `workdir` may be local or `gs://...`. `data_iter` (default: the SeqIO pipeline of
    `config.data.task`) yields host-local batches and has `get_state`/`set_state`.
    `evaluate_fn(config, params, mesh) -> metrics` runs every `config.eval.every_steps` and at the
    end. Returns the last logged train metrics.
    """
    configlib.validate(config)
    for note in config_notes(config):
        print(f"note: {note}", flush=True)
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    distributed.check_shared_directory(workdir, "the workdir")
    try:
        mesh = sharding.make_mesh(config.mesh_shape)
    except ValueError as e:
        raise configlib.ConfigError("mesh_shape", f"a shape for the {jax.device_count()} devices here ({e})",
                                    tuple(config.mesh_shape)) from e
    data_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    configlib.check_batch_fits_mesh(config, data_shards)
    if data_iter is None:
        from mirasol3b_data import pipeline  # TensorFlow and SeqIO load only when the pipeline is used
        data_iter = pipeline.make_input_iterator(config, "train")

    model = Mirasol3B(config.model)
    optimizer = make_optimizer(config.train)
    first = model_batch(_peek(data_iter), config)
    check_batch_shapes(first, config)
    example = global_batch(first, mesh)
    c = config.checkpoint
    checkpointer = Checkpointer(workdir, save_every=c.every_steps, keep=c.keep, async_save=c.async_save)
    state, shardings, start_step = _initial_state(config, model, optimizer, example, mesh, checkpointer, data_iter)
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    num_steps = config.train.num_steps
    print(f"model: {num_params:,} parameters, combiner={config.model.combiner}, mesh={dict(mesh.shape)}, "
          f"steps {start_step}->{num_steps}", flush=True)
    if start_step >= num_steps:
        checkpointer.close()
        log = MetricsLog(workdir, resumed_from=start_step)
        if evaluate_fn is None or log.has_eval(start_step):
            print(f"already trained to step {start_step} (train.num_steps={num_steps}); nothing to do", flush=True)
        else:  # the run that trained it died during its final evaluation
            print(f"already trained to step {start_step}; its final evaluation is missing: evaluating", flush=True)
            with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
                _evaluate(evaluate_fn, config, state.params, mesh, log, start_step)
        log.close()
        return {}

    batch_shardings = jax.tree.map(lambda x: x.sharding, example)
    log = MetricsLog(workdir, resumed_from=start_step)
    last: dict = {}
    eval_every = config.eval.every_steps
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES), PreemptionGuard() as guard:
        step_fn = jax.jit(make_train_step(model, optimizer, config.loss, config.train.microbatches),
                          in_shardings=(shardings, batch_shardings, None),
                          out_shardings=(shardings, None), donate_argnums=0)
        rng = jax.random.key(config.seed + 1)
        schedule = learning_rate_schedule(config.train)
        # Logged: each metric's mean over the steps since the last log line (`window`), the rate of
        # the update that ended it, and the speed over those steps (not the compile, not evaluations).
        window: list[dict] = []
        t0, timed_from = time.time(), start_step
        profiler = _StepProfiler(config.train, log.tensorboard_dir, start_step)
        try:
            for step in range(start_step, num_steps):
                batch = global_batch(model_batch(next(data_iter), config), mesh)
                done = step + 1
                profiler.before(done)
                with jax.profiler.StepTraceAnnotation("train", step_num=done):  # to the step's results
                    state, metrics = step_fn(state, batch, rng)
                    # Two scalars a step: a NaN is caught at the step it appears, and a finite loss with
                    # infinite gradients (which clipping turns into NaN params) before its state is saved.
                    loss, grad_norm = map(float, jax.device_get((metrics["loss"], metrics["grad_norm"])))
                profiler.after(done)
                if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                    raise NonFiniteLossError(
                        f"loss is {loss} (gradient norm {grad_norm}) at step {done}; stopping. The last good "
                        f"checkpoint is kept (step {checkpointer.latest_step()} in {checkpointer.directory}).")
                window.append(metrics)
                if step == start_step:  # the first step compiles; time the rest
                    t0, timed_from = time.time(), done
                if done % config.train.log_every == 0 or done == num_steps:
                    steps = jax.device_get(window)
                    last = {k: float(np.mean([m[k] for m in steps])) for k in steps[0]}
                    last["learning_rate"] = float(schedule(done - 1))  # optax counts updates from 0
                    window = []
                    if done > timed_from:
                        last["steps_per_second"] = rate = (done - timed_from) / max(time.time() - t0, 1e-9)
                        speed = f"{rate:.2f} steps/s  ETA {_format_eta((num_steps - done) / rate)}"
                    else:
                        speed = "(compiled)"
                    print(f"step {done}/{num_steps}  loss {last['loss']:.4f}  text {last['text_loss']:.4f}  "
                          f"latent {last['latent_loss']:.4f}  tok_acc {last['token_accuracy']:.3f}  "
                          f"lr {last['learning_rate']:.3g}  {speed}", flush=True)
                    log.write(done, last)
                    t0, timed_from = time.time(), done
                checkpointer.maybe_save(done, state, data_iter.get_state(), config, force=done == num_steps)
                if guard.should_stop(done):
                    saved = checkpointer.maybe_save(done, state, data_iter.get_state(), config, force=True)
                    checkpointer.wait()
                    print(f"preempted: saved step {done} in {checkpointer.directory}; exiting" if saved else
                          f"preempted at step {done}, which could not be saved (see the warning above); the "
                          f"next run resumes from step {checkpointer.latest_step()}; exiting", flush=True)
                    log.close()
                    checkpointer.close()
                    sys.exit(guard.exit_code)
                if evaluate_fn is not None and ((eval_every and done % eval_every == 0) or done == num_steps):
                    paused = time.time()
                    _evaluate(evaluate_fn, config, state.params, mesh, log, done)
                    t0 += time.time() - paused  # the speed is training's
        finally:
            profiler.stop()
            checkpointer.wait()
    log.close()
    checkpointer.close()
    return last


class _StepProfiler:
    """Traces steps `profile_from_step + 1 .. profile_from_step + profile_steps` (those this run
    reaches) with `jax.profiler` into `log_dir`, beside the metrics, for TensorBoard's Profile tab."""

    def __init__(self, train: ml_collections.ConfigDict, log_dir: epath.Path, start_step: int = 0):
        self.first, self.last = train.profile_from_step + 1, train.profile_from_step + train.profile_steps
        self.log_dir, self.active, self.steps = log_dir, False, []
        if train.profile_steps and start_step >= self.first:  # a resumed run: its first step compiles
            print(f"note: no profile: train.profile_steps asks for steps {self.first}-{self.last} and this run "
                  f"starts after step {start_step}; set train.profile_from_step to {start_step + 10} or more to "
                  "trace this run (past its compile)", flush=True)
            self.first = self.last + 1

    def before(self, step: int) -> None:
        if not self.active and self.first <= step <= self.last:
            jax.profiler.start_trace(os.fspath(self.log_dir))
            self.active = True

    def after(self, step: int) -> None:  # the step's results are on the host: its work is done
        if self.active:
            self.steps.append(step)
            if step == self.last:
                self.stop()

    def stop(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
            print(f"profile of steps {self.steps[0]}-{self.steps[-1]} in {self.log_dir} (TensorBoard's Profile "
                  "tab)" if self.steps else f"profile in {self.log_dir}", flush=True)


def _evaluate(evaluate_fn, config, params, mesh, log: MetricsLog, step: int) -> None:
    results = evaluate_fn(config, params, mesh)
    log.write(step, results, prefix="eval")  # the numbers; the whole result (samples too) beside, as evaluate's
    if "split" in results and jax.process_index() == 0:
        write_metrics(log.workdir, {"step": step, **results})
    print(f"eval at step {step}: " + json.dumps({k: v for k, v in results.items() if isinstance(v, (int, float))}),
          flush=True)


def _peek(data_iter):
    """The first batch without losing it: iterators here restart from their saved position."""
    state = data_iter.get_state()
    batch = next(data_iter)
    data_iter.set_state(state)
    return batch
