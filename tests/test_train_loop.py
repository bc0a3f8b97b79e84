"""The training loop as `main` runs it: resume, nothing to do when finished, NaN stops at its step,
SIGTERM saves and exits."""

import glob
import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from mirasol3b import configlib
from mirasol3b.errors import CheckpointCorruptError, CheckpointMismatchError
from mirasol3b.train.checkpointer import Checkpointer
from mirasol3b.train.preemption import PREEMPTED_EXIT_CODE
from mirasol3b.train import loop
from mirasol3b.train.random_batches import RandomBatches

# Orbax leaves a callback behind when TensorStore fails to read (the corrupt checkpoints here):
# "Event loop is closed", raised in whichever test runs next; harmless.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _config(num_steps: int):
    cfg = tiny.get_config()
    for name in ("video_encoder", "audio_encoder", "combiner_transformer", "time_aligned", "text_decoder"):
        cfg.model[name].update(width=32, depth=1, num_heads=2, mlp_dim=64)
    cfg.mesh_shape = (2, -1, 1)  # 2 x 4 over the 8 fake devices
    cfg.data.update(batch_size=8, text_length=16)
    cfg.train.update(num_steps=num_steps, warmup_steps=1, log_every=2)
    cfg.checkpoint.update(every_steps=2, keep=2, async_save=False)
    return cfg


class _EventAt(RandomBatches):
    """Random batches; fetching the `at`-th one (1-based) goes through `event(batch) -> batch`."""

    def __init__(self, cfg, at, event):
        super().__init__(cfg, cfg.data.batch_size)
        self.at, self.event = at, event

    def __next__(self):
        batch = super().__next__()
        return self.event(batch) if self.position == self.at else batch


class _BeforeTheFirstStep(Exception):
    pass


class _StopAtFirstStep(RandomBatches):
    """Random batches that stop the run when its first step asks for one (after the loop's peek)."""

    calls = 0

    def __next__(self):
        self.calls += 1
        if self.calls == 2:
            raise _BeforeTheFirstStep
        return super().__next__()


def _nan_in_waveform(batch):
    return dict(batch, audio=np.where(np.arange(batch["audio"].shape[1]) == 7, np.nan, batch["audio"]))


def _sigterm(batch):  # as a preemption would, while the step's input is read
    signal.raise_signal(signal.SIGTERM)
    return batch


def test_second_run_resumes_and_a_finished_run_does_nothing(tmp_path, capsys):
    workdir = str(tmp_path / "run")
    cfg = _config(4)
    cfg.train.update(profile_from_step=2, profile_steps=1)
    loop.train(cfg, workdir, data_iter=RandomBatches(cfg, cfg.data.batch_size))
    assert "profile of steps 3-3 in " in capsys.readouterr().out
    (trace,) = glob.glob(os.path.join(workdir, "tensorboard", "plugins", "profile", "*", "*.xplane.pb"))
    assert os.path.getsize(trace) > 0
    # Resuming under another model config: the fields first, then the params that do not fit.
    other = _config(6)
    other.model.scan_layers = not cfg.model.scan_layers
    with pytest.raises(CheckpointMismatchError, match=r"(?s)differs from the one checkpoint step 4 was trained "
                       rf"with .*config\.model\.scan_layers: {other.model.scan_layers} here, "
                       rf"{cfg.model.scan_layers} in the checkpoint.*does not fit"):
        loop.train(other, workdir, data_iter=RandomBatches(other, other.data.batch_size))
    # Another param dtype: every param and both Adam moments mismatch; the field says why, and the
    # paths are cut short.
    other = _config(6)
    other.model.param_dtype = "bfloat16"
    with pytest.raises(CheckpointMismatchError, match=r"(?s)config\.model\.param_dtype: 'bfloat16' here, "
                       r"'float32' in the checkpoint.*shape or dtype mismatch: \d+\n(    .*\n){25}    \.\.\. and \d+ more"):
        loop.train(other, workdir, data_iter=RandomBatches(other, other.data.batch_size))
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:  # a run that died after logging step 6
        f.write(json.dumps({"step": 6, "split": "train", "loss": 1.0}) + '\n{"step": 8, "spl')  # ...while writing
    cfg = _config(6)
    cfg.train.update(profile_from_step=2, profile_steps=1)  # step 3 is behind this run: said, not traced
    data = RandomBatches(cfg, cfg.data.batch_size)
    loop.train(cfg, workdir, data_iter=data)
    out = capsys.readouterr().out
    assert "resumed from step 4" in out and "dropped 2 lines of steps after 4" in out
    assert "note: no profile: train.profile_steps asks for steps 3-3 and this run starts after step 4" in out
    assert glob.glob(os.path.join(workdir, "tensorboard", "plugins", "profile", "*", "*.xplane.pb")) == [trace]
    # The cosine spans num_steps: raising it moves the rate at the resumed step, and the run says so.
    assert "learning-rate schedule is not the checkpoint's run's (train.num_steps 4 -> 6): at step 4" in out
    assert data.position == 6, "the data position was restored with the state"
    steps = [json.loads(line)["step"] for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert steps == [2, 4, 6]
    assert os.listdir(os.path.join(workdir, "tensorboard")), "TensorBoard event files are written"
    assert loop.train(cfg, workdir, data_iter=RandomBatches(cfg, cfg.data.batch_size)) == {}
    out = capsys.readouterr().out
    assert "nothing to do" in out and "learning-rate schedule" not in out
    # Another input pipeline than the checkpoint's (here: one that refuses its saved position, as
    # the SeqIO pipeline does for another task, batch size, host count or seed).
    class OtherPipeline(RandomBatches):
        def get_state(self):
            return {**super().get_state(), "pipeline": "other"}

        def set_state(self, state):
            if state.get("pipeline") != "other":
                raise ValueError("the saved data position does not apply to this input pipeline")
            super().set_state(state)

    with pytest.raises(configlib.ConfigError, match=r"config\.data\.reset_position: expected True to resume "
                                                     r"checkpoint step 6 .*does not apply"):
        loop.train(cfg, workdir, data_iter=OtherPipeline(cfg, cfg.data.batch_size))
    cfg.data.reset_position = True
    assert loop.train(cfg, workdir, data_iter=OtherPipeline(cfg, cfg.data.batch_size)) == {}
    assert "resumed from step 6" in capsys.readouterr().out
    cfg.data.reset_position = False

    # Fine-tuning from it under another model config names the fields too (allowing the param
    # differences of a scan_layers change would load almost nothing) ...
    tune = _config(2)
    tune.init_from = workdir
    tune.model.scan_layers = not cfg.model.scan_layers
    with pytest.raises(CheckpointMismatchError, match=r"(?s)init_from: this config differs from .* in fields "
                       rf"that define the model:\n  config\.model\.scan_layers: {tune.model.scan_layers} here.*"
                       r"init_from_allow"):
        loop.train(tune, str(tmp_path / "tune"), data_iter=RandomBatches(tune, tune.data.batch_size))
    # ... and says so when the params fit all the same (a vocabulary's table is padded to 128 rows).
    tune = _config(2)
    tune.init_from = workdir
    tune.model.vocab_size = cfg.model.vocab_size + 20
    with pytest.raises(_BeforeTheFirstStep):  # what is checked is said by then; training would only compile
        loop.train(tune, str(tmp_path / "tune"), data_iter=_StopAtFirstStep(tune, tune.data.batch_size))
    out = capsys.readouterr().out
    assert f"params initialised from {workdir}" in out
    assert (f"note: this config differs from init_from's in fields that define the model:\n  config.model.vocab_size: "
            f"{tune.model.vocab_size} here, {cfg.model.vocab_size} in the checkpoint") in out

    # The run died during its final evaluation: a rerun evaluates the last step, once.
    calls = []

    def evaluate_fn(config, params, mesh):
        calls.append(int(jax.tree.leaves(params)[0].shape[0]))
        return {"split": "validation", "exact_match": 0.5, "samples": [{"prediction": "red"}]}

    for _ in range(2):
        assert loop.train(cfg, workdir, data_iter=RandomBatches(cfg, cfg.data.batch_size), evaluate_fn=evaluate_fn) == {}
    assert len(calls) == 1 and "its final evaluation is missing: evaluating" in capsys.readouterr().out
    lines = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [(m["step"], m["split"]) for m in lines][-1] == (6, "eval") and lines[-1]["exact_match"] == 0.5
    written = json.loads(open(os.path.join(workdir, "eval_validation_step6.json")).read())
    assert written["samples"] == [{"prediction": "red"}], "the whole result, beside metrics.jsonl's numbers"

    # Every checkpoint unreadable: the run refuses to start over (its new steps 2, 4 and 6 would
    # be refused next to the old ones, or mistaken for them), naming each one.
    for step in Checkpointer(workdir, save_every=2, keep=2, read_only=True).all_steps():
        state_dir = os.path.join(workdir, "checkpoints", str(step), "state")
        for root, _, files in os.walk(state_dir):
            for name in files:
                if "/d" in root[len(state_dir):]:  # the array store's data files
                    os.truncate(os.path.join(root, name), 0)
    with pytest.raises(CheckpointCorruptError, match=r"(?s)no checkpoint in .* could be restored, so the run does not "
                                           r"start over.*step 6 at .*corrupt.*step 4 at .*corrupt"):
        loop.train(_config(8), workdir, data_iter=RandomBatches(cfg, cfg.data.batch_size))


def test_a_contrastive_loss_without_negatives_is_noted():
    cfg = _config(2)
    cfg.loss.update(latent_loss="contrastive", latent_negatives="examples")
    assert loop.config_notes(cfg) == []
    cfg.data.batch_size = 1
    (note,) = loop.config_notes(cfg)
    assert "no negatives, so it is 0" in note
    cfg.loss.latent_negatives = "snippets"
    assert loop.config_notes(cfg) == []
    cfg.data.batch_size, cfg.train.microbatches, cfg.loss.latent_negatives = 8, 8, "examples"
    (note,) = loop.config_notes(cfg)  # negatives come from the microbatch
    assert "1 example per microbatch" in note
    cfg.train.microbatches = 2
    (note,) = loop.config_notes(cfg)
    assert "negatives from each microbatch of 4 clips, not from the batch of 8" in note


def test_microbatches_that_do_not_split_over_the_mesh_stop_before_compiling(tmp_path):
    cfg = _config(2)
    cfg.train.microbatches = 2  # 4 clips a slice over the 2 x 4 data shards
    with pytest.raises(configlib.ConfigError, match=r"train\.microbatches.*data\.batch_size / 8.*got 2"):
        loop.train(cfg, str(tmp_path / "run"), data_iter=RandomBatches(cfg, cfg.data.batch_size))


def test_nan_loss_stops_at_its_step_and_keeps_the_last_good_checkpoint(tmp_path):
    workdir = str(tmp_path / "run")
    cfg = _config(8)
    with pytest.raises(loop.NonFiniteLossError, match=r"at step 3\b.*step 2"):
        loop.train(cfg, workdir, data_iter=_EventAt(cfg, 3, _nan_in_waveform))
    checkpointer = Checkpointer(workdir, save_every=2, keep=2, read_only=True)
    assert checkpointer.all_steps() == [2]


def test_infinite_gradient_norm_stops_before_that_step_is_saved(tmp_path, monkeypatch):
    # A finite loss whose gradients overflow: clipping would turn the params into NaN. The step's
    # reported norm is made infinite at step 4, a step the checkpoint schedule saves.
    real = loop.make_train_step

    def overflowing(*args):
        step_fn = real(*args)

        def train_step(state, batch, rng):
            state, metrics = step_fn(state, batch, rng)
            metrics["grad_norm"] = jnp.where(state.step == 4, jnp.inf, metrics["grad_norm"])
            metrics["step_done"] = state.step.astype(jnp.float32)  # 1, 2, ...: its logged mean tells the window
            return state, metrics
        return train_step

    monkeypatch.setattr(loop, "make_train_step", overflowing)
    workdir = str(tmp_path / "run")
    cfg = _config(8)
    with pytest.raises(loop.NonFiniteLossError, match=r"loss is [0-9.]+ \(gradient norm inf\) at step 4\b.*step 2"):
        loop.train(cfg, workdir, data_iter=RandomBatches(cfg, cfg.data.batch_size))
    assert Checkpointer(workdir, save_every=2, keep=2, read_only=True).all_steps() == [2]
    # The line of step 2 (log_every 2): means over steps 1-2, the rate of update 2, and the speed of
    # the timed steps (step 1 compiles: none of them at step 2).
    (line,) = [json.loads(row) for row in open(os.path.join(workdir, "metrics.jsonl"))]
    assert line["step"] == 2 and line["step_done"] == 1.5
    assert line["learning_rate"] == pytest.approx(float(loop.learning_rate_schedule(cfg.train)(1)))
    assert line["learning_rate"] != pytest.approx(float(loop.learning_rate_schedule(cfg.train)(2)))
    assert line["steps_per_second"] > 0


def test_sigterm_saves_its_step_and_exits_143_or_says_it_could_not_save(tmp_path, capsys):
    workdir = str(tmp_path / "run")
    cfg = _config(8)
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stopped:
        loop.train(cfg, workdir, data_iter=_EventAt(cfg, 3, _sigterm))
    assert stopped.value.code == PREEMPTED_EXIT_CODE
    assert "preempted: saved step 3 in" in capsys.readouterr().out
    assert Checkpointer(workdir, save_every=2, keep=2, read_only=True).all_steps() == [2, 3]

    # Step 5's directory already exists (a corrupt checkpoint is never overwritten): the
    # preemption at step 5 cannot save it, says so, and names the step the next run resumes from.
    os.makedirs(os.path.join(workdir, "checkpoints", "5"))
    with pytest.raises(SystemExit) as stopped:
        loop.train(cfg, workdir, data_iter=_EventAt(cfg, 5, _sigterm))
    out = capsys.readouterr().out
    assert stopped.value.code == PREEMPTED_EXIT_CODE
    assert "resumed from step 3" in out
    assert "preempted at step 5, which could not be saved" in out and "the next run resumes from step 4" in out
    assert signal.getsignal(signal.SIGTERM) == handler, "the loop's guard put the previous handler back"

    # Resumed once more, to the end: the same training as a run never stopped (state, optimizer
    # moments, data position and dropout keys all restored), so the same logged means.
    loop.train(cfg, workdir, data_iter=RandomBatches(cfg, cfg.data.batch_size))
    straight = str(tmp_path / "straight")
    loop.train(cfg, straight, data_iter=RandomBatches(cfg, cfg.data.batch_size))
    logged = [{r["step"]: r for r in map(json.loads, open(os.path.join(w, "metrics.jsonl"))) if r["step"] > 4}
              for w in (workdir, straight)]
    assert sorted(logged[0]) == sorted(logged[1]) == [6, 8]
    for step in (6, 8):
        for key in ("loss", "text_loss", "latent_loss", "grad_norm"):
            assert logged[0][step][key] == pytest.approx(logged[1][step][key], rel=1e-6), (step, key)


def test_a_dataset_of_another_geometry_is_a_config_error_before_compiling(tmp_path):
    cfg, built_at = _config(2), _config(2)
    built_at.model.video.image_size = 16
    with pytest.raises(configlib.ConfigError, match=r"'video' is \(8, 16, 16, 3\) per example, the config's model "
                                                     r"takes \(8, 32, 32, 3\).*another geometry"):
        loop.train(cfg, str(tmp_path / "run"), data_iter=RandomBatches(built_at, built_at.data.batch_size))
