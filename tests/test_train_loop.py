"""The training loop as `main` runs it: resume, nothing to do when finished, NaN stops at its step."""

import json
import os

import jax
import numpy as np
import pytest

from configs import tiny
from mirasol3b import configlib
from mirasol3b.train import checkpoints as ckpt
from mirasol3b.train import loop
from mirasol3b.train.random_batches import RandomBatches


def _config(num_steps: int):
    cfg = tiny.get_config()
    for name in ("video_encoder", "audio_encoder", "combiner_transformer", "time_aligned", "text_decoder"):
        cfg.model[name].update(width=32, depth=1, num_heads=2, mlp_dim=64)
    cfg.mesh_shape = (2, -1, 1)  # 2 x 4 over the 8 fake devices
    cfg.data.update(batch_size=8, text_length=16)
    cfg.train.update(num_steps=num_steps, warmup_steps=1, log_every=2)
    cfg.checkpoint.update(every_steps=2, keep=2, async_save=False)
    return cfg


class _Poisoned(RandomBatches):
    """Random batches whose `bad_step`-th batch (1-based) has a NaN in the waveform."""

    def __init__(self, cfg, bad_step):
        super().__init__(cfg, cfg.data.batch_size)
        self.bad_step = bad_step

    def __next__(self):
        batch = super().__next__()
        if self.position == self.bad_step:
            batch = dict(batch, audio=np.where(np.arange(batch["audio"].shape[1]) == 7, np.nan, batch["audio"]))
        return batch


# Orbax leaves a callback behind when TensorStore fails to read: "Event loop is closed", harmless.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_second_run_resumes_and_a_finished_run_does_nothing(tmp_path, capsys):
    workdir = str(tmp_path / "run")
    cfg = _config(4)
    loop.train(cfg, workdir, data_iter=RandomBatches(cfg, cfg.data.batch_size))
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:  # a run that died after logging step 6
        f.write(json.dumps({"step": 6, "split": "train", "loss": 1.0}) + '\n{"step": 8, "spl')  # ...while writing
    cfg = _config(6)
    data = RandomBatches(cfg, cfg.data.batch_size)
    loop.train(cfg, workdir, data_iter=data)
    out = capsys.readouterr().out
    assert "resumed from step 4" in out and "dropped 2 lines of steps after 4" in out
    assert data.position == 6, "the data position was restored with the state"
    steps = [json.loads(line)["step"] for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert steps == [2, 4, 6]
    assert os.listdir(os.path.join(workdir, "tensorboard")), "TensorBoard event files are written"
    assert loop.train(cfg, workdir, data_iter=RandomBatches(cfg, cfg.data.batch_size)) == {}
    assert "nothing to do" in capsys.readouterr().out
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

    # The run died during its final evaluation: a rerun evaluates the last step, once.
    calls = []

    def evaluate_fn(config, params, mesh):
        calls.append(int(jax.tree.leaves(params)[0].shape[0]))
        return {"exact_match": 0.5}

    for _ in range(2):
        assert loop.train(cfg, workdir, data_iter=RandomBatches(cfg, cfg.data.batch_size), evaluate_fn=evaluate_fn) == {}
    assert len(calls) == 1 and "its final evaluation is missing: evaluating" in capsys.readouterr().out
    lines = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [(m["step"], m["split"]) for m in lines][-1] == (6, "eval") and lines[-1]["exact_match"] == 0.5

    # Every checkpoint unreadable: the run refuses to start over (its new steps 2, 4 and 6 would
    # be refused next to the old ones, or mistaken for them), naming each one.
    for step in ckpt.Checkpointer(workdir, save_every=2, keep=2, read_only=True).all_steps():
        state_dir = os.path.join(workdir, "checkpoints", str(step), "state")
        for root, _, files in os.walk(state_dir):
            for name in files:
                if "/d" in root[len(state_dir):]:  # the array store's data files
                    os.truncate(os.path.join(root, name), 0)
    with pytest.raises(ckpt.CheckpointCorruptError, match=r"(?s)no checkpoint in .* could be restored, so the run does not "
                                           r"start over.*step 6 at .*corrupt.*step 4 at .*corrupt"):
        loop.train(_config(8), workdir, data_iter=RandomBatches(cfg, cfg.data.batch_size))


def test_nan_loss_stops_at_its_step_and_keeps_the_last_good_checkpoint(tmp_path):
    workdir = str(tmp_path / "run")
    cfg = _config(8)
    with pytest.raises(loop.NonFiniteLossError, match=r"at step 3\b.*step 2"):
        loop.train(cfg, workdir, data_iter=_Poisoned(cfg, bad_step=3))
    checkpointer = ckpt.Checkpointer(workdir, save_every=2, keep=2, read_only=True)
    assert checkpointer.all_steps() == [2]
