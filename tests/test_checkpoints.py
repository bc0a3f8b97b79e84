"""Behaviour of checkpoints: exact resume, SIGTERM, other meshes, corruption, init_from, async saves.

Everything runs the real sharded train state and train step of a shrunken tiny config on the
8 fake CPU devices. `run` below is the training loop in miniature, wired the way
`mirasol3b/train/loop.py` is meant to call `mirasol3b/train/checkpoints.py`. This file is also the
child process of the SIGTERM test (`python tests/test_checkpoints.py sigterm-child WORKDIR PROGRESS`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import json
import logging as std_logging
import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import linen as nn

from configs import tiny
from mirasol3b import configlib, sharding
from mirasol3b.model import Mirasol3B
from mirasol3b.errors import CheckpointMismatchError
from mirasol3b.train.checkpointer import Checkpointer, with_shardings
from mirasol3b.train.preemption import PREEMPTED_EXIT_CODE, PreemptionGuard
from mirasol3b.train.restore import load_params_for_finetuning
from mirasol3b.train.tree_diff import flat
from mirasol3b.train.optimizer import make_optimizer
from mirasol3b.train.random_batches import RandomBatches
from mirasol3b.train.state import abstract_state, create_sharded_state, state_shardings
from mirasol3b.train.step import make_train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESH = (2, 4, 1)  # ('data', 'fsdp', 'tensor') over the 8 fake devices


def small_config(**model_changes):
    """configs/tiny.py at width 32, depth 1, 4 frames of 16x16, 8 text tokens, batch 8, and no
    audio (its spectrogram costs a third of the compile time and nothing here depends on it)."""
    cfg = tiny.get_config()
    cfg.model.use_audio = False
    for stack in configlib.STACKS:
        cfg.model[stack].width, cfg.model[stack].depth, cfg.model[stack].mlp_dim = 32, 1, 64
    cfg.model.ttm.token_learner_hidden = 32
    cfg.model.video.image_size = 16
    cfg.model.text_decoder.max_length = 8
    cfg.data.num_frames, cfg.data.text_length, cfg.data.batch_size = 4, 8, 8
    cfg.train.num_steps, cfg.train.warmup_steps = 100, 2
    for key, value in model_changes.items():
        cfg.model[key] = value
    return configlib.validate(cfg)


@dataclasses.dataclass
class Setup:
    """A model, its optimizer and train step, and the state's abstract shapes on one mesh."""
    config: object
    mesh: jax.sharding.Mesh
    model: Mirasol3B
    optimizer: object
    batches: RandomBatches
    abstract: object  # boxed abstract TrainState
    shardings: object

    @property
    def target(self):
        """What `restore_latest` restores onto: the abstract state with this mesh's shardings."""
        return with_shardings(self.abstract, self.shardings)

    def batch(self, step: int) -> dict:
        return {k: jax.device_put(v, sharding.batch_sharding(self.mesh, v.ndim))
                for k, v in self.batches[step].items()}

    @functools.cached_property
    def _initial(self):
        return create_sharded_state(self.model, self.optimizer, self.batch(0), self.mesh,
                                    jax.random.key(self.config.seed))[0]

    def init(self):
        """A fresh copy of the initial state (the train step donates the one it is given)."""
        return jax.jit(lambda t: jax.tree.map(jnp.copy, t), out_shardings=self.shardings)(self._initial)

    @functools.cached_property
    def step_fn(self):
        batch_shardings = jax.tree.map(lambda x: x.sharding, self.batch(0))
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
            return jax.jit(make_train_step(self.model, self.optimizer, self.config.loss),
                           in_shardings=(self.shardings, batch_shardings, None),
                           out_shardings=(self.shardings, None), donate_argnums=0)


@functools.cache
def setup(mesh_shape=MESH, num_devices=8, **model_changes) -> Setup:
    config = small_config(**model_changes)
    mesh = sharding.make_mesh(mesh_shape, devices=jax.devices()[:num_devices])
    model, optimizer = Mirasol3B(config.model), make_optimizer(config.train)
    batches = RandomBatches(config, config.data.batch_size, seed=config.seed)
    example = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batches[0])
    abstract = abstract_state(model, optimizer, example)[0]
    return Setup(config, mesh, model, optimizer, batches, abstract, state_shardings(abstract, mesh))


@dataclasses.dataclass
class Run:
    start: int  # the step training resumed from (0: fresh)
    losses: dict  # step reached -> loss of the step that reached it
    state: object
    problems: list
    preempted_at: int | None = None


def run(workdir: str, num_steps: int, *, s: Setup | None = None, save_every: int = 2, keep: int = 3,
        guard: PreemptionGuard | None = None, progress: str | None = None) -> Run:
    """The training loop in miniature: restore (or init), step, save every N, stop on preemption."""
    s = s or setup()
    ckpt = Checkpointer(workdir, save_every=save_every, keep=keep)
    restored = ckpt.restore_latest(s.target)
    if restored is None:
        start, state = 0, s.init()
    else:
        start, state, data_state = restored
        assert data_state == {"next_batch": start}
    rng = jax.random.key(s.config.seed + 1)
    losses, preempted_at = {}, None
    for step in range(start, num_steps):
        state, metrics = s.step_fn(state, s.batch(step), rng)
        done = step + 1
        losses[done] = float(metrics["loss"])
        ckpt.maybe_save(done, state, {"next_batch": done}, s.config, force=done == num_steps)
        if progress:
            with open(progress + ".tmp", "w") as f:
                f.write(str(done))
            os.replace(progress + ".tmp", progress)
        if guard is not None and guard.should_stop(done):
            ckpt.maybe_save(done, state, {"next_batch": done}, s.config, force=True)
            ckpt.wait()
            preempted_at = done
            break
    ckpt.close()
    return Run(start, losses, state, ckpt.problems, preempted_at)


def assert_trees_equal(a, b):
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def dir_digest(path: str) -> dict[str, str]:
    """Relative file path -> sha1 of its bytes, for every file under `path`."""
    out = {}
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, path)] = hashlib.sha1(f.read()).hexdigest()
    return out


# ---- tests -------------------------------------------------------------------------------------

def test_resume_equals_uninterrupted(tmp_path):
    straight = run(str(tmp_path / "straight"), 6, save_every=100)
    first = run(str(tmp_path / "split"), 3, save_every=100)  # saves only its last step (forced)
    second = run(str(tmp_path / "split"), 6, save_every=100)
    assert (first.start, second.start) == (0, 3)
    # Same devices, same shardings, same programs: bit-identical on CPU.
    assert {**first.losses, **second.losses} == straight.losses
    assert_trees_equal(second.state, straight.state)
    assert int(second.state.step) == 6
    saved_config = json.loads((tmp_path / "split" / "checkpoints" / "6" / "config" / "metadata").read_text())
    assert saved_config == json.loads(setup().config.to_json_best_effort())


def test_sigterm_saves_the_step_reached(tmp_path):
    workdir, progress, out_file = str(tmp_path / "w"), tmp_path / "progress", tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with open(out_file, "w") as out:
        child = subprocess.Popen([sys.executable, os.path.abspath(__file__), "sigterm-child", workdir,
                                  str(progress)],
                                 stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        try:
            deadline = time.time() + 240
            while not (progress.exists() and int(progress.read_text()) >= 3):
                assert child.poll() is None, out_file.read_text()[-3000:]
                assert time.time() < deadline, "the child made no progress"
                time.sleep(0.2)
            child.send_signal(signal.SIGTERM)
            rc = child.wait(timeout=120)
        finally:
            if child.poll() is None:
                child.kill()
    log = out_file.read_text()
    assert rc == PREEMPTED_EXIT_CODE, log[-3000:]
    reached = int(re.search(r"preempted at step (\d+)", log).group(1))
    assert reached >= 3 and "Traceback" not in log, log[-3000:]
    ckpt = Checkpointer(workdir, save_every=2, keep=3)
    step, state, data_state = ckpt.restore_latest(setup().target)  # saved on 1 device, restored on 8
    ckpt.close()
    assert step == reached == int(state.step) and data_state == {"next_batch": reached}
    assert not ckpt.problems


def test_restore_onto_other_meshes(tmp_path):
    saved = run(str(tmp_path), 2).state  # on 8 devices as a 2x4 (data x fsdp) mesh
    for mesh_shape, n in (((1, 4, 1), 4), ((1, 1, 1), 1)):
        other = setup(mesh_shape, n)
        ckpt = Checkpointer(str(tmp_path), save_every=2, keep=3)
        step, state, _ = ckpt.restore_latest(other.target)
        ckpt.close()
        assert step == 2
        assert_trees_equal(state, saved)
        for leaf, want in zip(jax.tree.leaves(state), jax.tree.leaves(other.shardings), strict=True):
            assert leaf.sharding == want and len(leaf.sharding.device_set) == n
    assert saved.params["text_decoder"]["logits"]["kernel"].sharding.spec[0] == "fsdp"  # was sharded


# Orbax leaves a callback behind when TensorStore fails to read: "Event loop is closed", harmless.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupt_latest_falls_back_and_is_never_overwritten(tmp_path, caplog):
    workdir = str(tmp_path)
    run(workdir, 6, save_every=2, keep=2)  # keeps steps 4 and 6
    bad = os.path.join(workdir, "checkpoints", "6")
    for root, _, files in os.walk(os.path.join(bad, "state")):  # truncate every array-store file
        for name in files:
            if "/d" in root[len(bad):]:
                full = os.path.join(root, name)
                os.truncate(full, os.path.getsize(full) // 2)
    before = dir_digest(bad)

    caplog.set_level(std_logging.WARNING)
    resumed = run(workdir, 8, save_every=2, keep=2)
    assert resumed.start == 4
    assert re.search(rf"checkpoint step 6 at {re.escape(bad)} is corrupt.*falling back to step 4",
                     resumed.problems[0])
    assert f"checkpoint step 6 at {bad}" in caplog.text
    # Its own save at step 6 was refused and 8 saved. Keeping 2 counts good steps only: 4 stays
    # (a plain max_to_keep=2 would have deleted it, leaving the corrupt 6 and 8).
    assert any(f"step 6: not saved, because {bad} already exists" in p for p in resumed.problems)
    assert dir_digest(bad) == before
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "6", "8"]

    # A save that never finished (an Orbax temporary directory), and a checkpoint whose arrays no
    # longer match the fingerprint written with them (TensorStore may read damaged data silently).
    tmp = os.path.join(workdir, "checkpoints", "10.orbax-checkpoint-tmp")
    os.makedirs(os.path.join(tmp, "state"))
    fp_file = os.path.join(workdir, "checkpoints", "8", "fingerprint", "metadata")
    fp = pathlib.Path(fp_file).read_text()
    first_sum = re.search(r"\[(\d+),", fp).group(1)
    pathlib.Path(fp_file).write_text(fp.replace(f"[{first_sum},", f"[{(int(first_sum) + 1) % 2**32},", 1))
    ckpt = Checkpointer(workdir, save_every=2, keep=2)
    step, state, data_state = ckpt.restore_latest(setup().target)
    assert step == 4 and int(state.step) == 4 and data_state == {"next_batch": 4}
    assert any(f"step 10 at {tmp} is half-written" in p for p in ckpt.problems)
    assert any("step 8" in p and "differ from the fingerprint" in p for p in ckpt.problems)
    assert sorted(ckpt.corrupt) == [6, 8] and os.path.isdir(tmp)
    assert json.loads(pathlib.Path(ckpt.record_path).read_text()).keys() == {"6", "8"}
    ckpt.close()


def test_init_from_names_mismatches_and_loads_params_only(tmp_path):
    source = run(str(tmp_path / "pretrain"), 2).state
    new = setup(combiner="ttm", combiner_readout="joint", vocab_size=400)  # other combiner params; more vocabulary
    target = with_shardings(new.abstract.params, new.shardings.params)
    with pytest.raises(CheckpointMismatchError) as err:
        load_params_for_finetuning(str(tmp_path / "pretrain"), target)
    message = str(err.value)
    # (tables are padded to a multiple of 128 rows)
    assert "text_decoder/logits/kernel: checkpoint (32, 384) vs model (32, 512)" in message
    assert "text_decoder/token_embedding/embedding: checkpoint (384, 32) vs model (512, 32)" in message
    missing = message.split("missing from the checkpoint")[1].split("unexpected")[0]
    unexpected = message.split("unexpected (in the checkpoint only)")[1].split("shape mismatch")[0]
    assert "combiner/" in missing and "combiner/transformer/" in unexpected

    fresh = new.init()
    params = load_params_for_finetuning(
        str(tmp_path / "pretrain"), target, fresh_params=fresh.params,
        allow_missing=True, allow_unexpected=True, allow_shape_mismatch=True)
    state = fresh.replace(params=params)  # optimizer state and step stay fresh
    flat_new, flat_old, flat_fresh = (flat(t) for t in (params, source.params, fresh.params))
    assert set(flat_new) == set(flat_fresh)
    loaded = [p for p in flat_new if p in flat_old and flat_old[p].shape == flat_fresh[p].shape]
    assert "video_encoder/tube_embedding/projection/kernel" in loaded
    for p, x in flat_new.items():
        want = flat_old[p] if p in loaded else flat_fresh[p]
        np.testing.assert_array_equal(np.asarray(x), np.asarray(want), err_msg=p)
        assert x.sharding == flat_fresh[p].sharding
    assert int(state.step) == 0
    assert all(not np.any(np.asarray(m)) for m in jax.tree.leaves(state.opt_state[1][0].mu))


def test_another_param_dtype_is_a_mismatch_on_resume_and_a_cast_on_init_from(tmp_path):
    workdir = str(tmp_path / "pretrain")
    source = run(workdir, 2).state
    bf16 = setup(param_dtype="bfloat16")
    ckpt = Checkpointer(workdir, save_every=2, keep=3)
    with pytest.raises(CheckpointMismatchError,
                       match=r"param_dtype.*\n.*shape or dtype mismatch.*\n.* float32 vs model \(.*\) bfloat16"):
        ckpt.restore_latest(bf16.target)
    ckpt.close()
    assert not ckpt.corrupt and not os.path.exists(ckpt.record_path), "a mismatch is not corruption"

    target = with_shardings(bf16.abstract.params, bf16.shardings.params)
    params = load_params_for_finetuning(workdir, target)  # read as float32, verified, cast
    for x, want in zip(jax.tree.leaves(params), jax.tree.leaves(source.params), strict=True):
        assert x.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(x), np.asarray(want.astype(jnp.bfloat16)))
    with pytest.raises(ValueError, match="need `fresh_params`"):  # a usage error, before any step is read
        load_params_for_finetuning(workdir, target, allow_missing=True)
    assert not os.path.exists(ckpt.record_path)


def test_saves_are_async_and_keep_k(tmp_path, monkeypatch):
    s = setup()
    state = s.init()
    gate = threading.Event()
    write_json = ocp.JsonCheckpointHandler._save_fn

    async def gated(self, x, directory):  # hold the background writes until the test says so
        await asyncio.to_thread(gate.wait, 60)
        return await write_json(self, x, directory)

    monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", gated)
    ckpt = Checkpointer(str(tmp_path), save_every=2, keep=2)
    assert ckpt.maybe_save(2, state, {"next_batch": 2}, s.config)  # returns while its files are unwritten
    assert not os.path.exists(ckpt.step_path(2)) and ckpt.latest_step() is None
    assert os.path.isdir(ckpt.step_path(2) + ".orbax-checkpoint-tmp")
    gate.set()
    ckpt.wait()
    assert ckpt.latest_step() == 2
    assert [ckpt.maybe_save(step, state, {"next_batch": step}, s.config) for step in range(3, 9)] == [
        False, True, False, True, False, True]
    ckpt.wait()
    assert ckpt.all_steps() == [6, 8]
    assert sorted(os.listdir(ckpt.directory)) == ["6", "8"]
    ckpt.close()


# ---- the SIGTERM child ---------------------------------------------------------------------------

def _sigterm_child(workdir: str, progress: str) -> int:
    # One device: the SIGTERM path does not depend on the mesh, and a 1-device save skips Orbax's
    # replica-parallel slicing (~10 s of compiles on a first save); the parent restores onto 2x4.
    with PreemptionGuard() as guard:
        result = run(workdir, 10_000, s=setup((1, 1, 1), 1), save_every=2, keep=2, guard=guard,
                     progress=progress)
    if result.preempted_at is None:
        print("finished without a preemption", flush=True)
        return 1
    print(f"preempted at step {result.preempted_at}; checkpoint saved", flush=True)
    return guard.exit_code


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "sigterm-child":
    sys.exit(_sigterm_child(sys.argv[2], sys.argv[3]))
