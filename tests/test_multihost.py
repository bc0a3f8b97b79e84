"""Several processes train as one: when to start `jax.distributed`, and two local CPU processes
(4 devices each, Gloo collectives) that each feed half of every global batch reach the same losses
and parameters as one process with 8 devices fed the whole batch, and write checkpoints that one
process restores onto another mesh.

Both runs are child processes running this file as a script
(`python tests/test_multihost.py WORKDIR NUM_PROCESSES PROCESS_ID PORT`), with the same XLA flags.
"""

import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import tiny
from mirasol3b import distributed, sharding
from mirasol3b.model import Mirasol3B
from mirasol3b.train.checkpointer import PER_PROCESS, Checkpointer, own_data_state, with_shardings
from mirasol3b.train import loop
from mirasol3b.train.optimizer import make_optimizer
from mirasol3b.train.random_batches import RandomBatches
from mirasol3b.train.state import abstract_state, example_batch, state_shardings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_PROCESSES = 2
NUM_STEPS = 3
# Measured: the losses agree to 2e-7 relative and the parameters after 3 Adam steps to 1.3e-7
# absolute (float32; what differs is the order of the cross-process sums, Gloo's vs one process's).
LOSS_RTOL = 1e-5
PARAM_ATOL = 1e-5


# ---- when to initialise ------------------------------------------------------------------------

def test_decide_from_flags_and_environment():
    decide = distributed.decide
    assert not decide(environ={}).initialize, "one plain process stays single"
    assert not decide(environ={"TPU_WORKER_HOSTNAMES": "localhost"}).initialize, "a single-host TPU list"
    explicit = decide(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3, environ={})
    assert explicit.initialize and explicit.kwargs == {
        "coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}
    from_env = decide(num_processes=2, process_id=0, environ={"JAX_COORDINATOR_ADDRESS": "h:1"})
    assert from_env.kwargs["coordinator_address"] == "h:1"
    for environ in ({"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}, {"TPU_PROCESS_ADDRESSES": "a:8476,b:8476"},
                    {"MEGASCALE_COORDINATOR_ADDRESS": "t0"}, {"MEGASCALE_NUM_SLICES": "2"},
                    {"JAX_COORDINATOR_ADDRESS": "h:1"}, {"SLURM_NTASKS": "8"}, {"OMPI_COMM_WORLD_SIZE": "2"}):
        d = decide(environ=environ)
        assert d.initialize and d.kwargs == {}, (environ, d)  # JAX detects the cluster itself
    assert decide(environ={}, tpu_chips=4).initialize, "a TPU VM: JAX reads the worker list from metadata"
    assert not decide(environ={"TPU_SKIP_MDS_QUERY": "1"}, tpu_chips=4).initialize
    assert not decide("off", environ={"TPU_WORKER_HOSTNAMES": "t0,t1"}, tpu_chips=4).initialize
    assert decide("on", environ={}).initialize


@pytest.mark.parametrize("kwargs, match", [
    ({"coordinator_address": "h:1"}, "--num_processes, --process_id missing"),
    ({"num_processes": 2, "process_id": 0}, "--coordinator_address missing"),
    ({"coordinator_address": "h:1", "num_processes": 2, "process_id": 2}, r"--process_id must be in \[0, "),
    ({"coordinator_address": "h", "num_processes": 2, "process_id": 0}, "HOST:PORT"),
    ({"mode": "off", "coordinator_address": "h:1"}, "--distributed=off with --coordinator_address"),
    ({"mode": "sometimes"}, "--distributed must be one of"),
])
def test_decide_names_the_bad_flag(kwargs, match):
    with pytest.raises(ValueError, match=match):
        distributed.decide(**{"environ": {}, **kwargs})


class _Device:
    def __init__(self, process_index: int):
        self.process_index = process_index


class _Mesh:
    def __init__(self, process_grid):
        self.devices = np.vectorize(_Device)(np.asarray(process_grid))
        self.shape = dict(zip(sharding.MESH_AXES, self.devices.shape))


def test_a_batch_block_spanning_hosts_is_refused():
    # Two hosts of 4 devices. Tensor groups within a host: each block has one reader.
    assert sharding.batch_blocks_spanning_processes(np.array([[[0] * 4], [[1] * 4]])) == {}
    assert sharding.batch_blocks_spanning_processes(np.array([[[0, 0], [0, 0]], [[1, 1], [1, 1]]])) == {}
    # One tensor group over all 8 devices (mesh_shape (1, 1, -1)): both hosts' rows would be one block.
    spanning = np.array([[[0, 0, 0, 0, 1, 1, 1, 1]]])
    assert sharding.batch_blocks_spanning_processes(spanning) == {0: [0, 1]}
    with pytest.raises(ValueError, match=r"batch block 0 .* processes \[0, 1\].*tensor axis"):
        sharding.check_batch_split(_Mesh(spanning))
    sharding.check_batch_split(sharding.make_mesh((2, 2, 2)))  # one process: nothing to refuse


def test_main_refuses_contradictory_flags_before_starting_anything(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mirasol3b.main", "--config=configs/tiny.py",
                           f"--workdir={tmp_path}", "--distributed=off", "--coordinator_address=h:1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 1 and "--distributed=off with --coordinator_address" in done.stderr, done.stderr
    assert os.listdir(tmp_path) == [], "nothing was written"


# ---- two processes train as one ------------------------------------------------------------------

def _config():
    cfg = tiny.get_config()
    for name in ("video_encoder", "audio_encoder", "combiner_transformer", "time_aligned", "text_decoder"):
        cfg.model[name].update(width=32, depth=1, num_heads=2, mlp_dim=64)
    cfg.mesh_shape = (2, -1, 1)  # 2 x 4 over 8 devices: one process's 8, or two processes' 4 + 4
    cfg.data.update(batch_size=8, text_length=16)
    cfg.train.update(num_steps=NUM_STEPS, warmup_steps=1, log_every=1)
    cfg.checkpoint.update(every_steps=NUM_STEPS, keep=2, async_save=True)  # one (asynchronous) save
    return cfg


class _ProcessRows(RandomBatches):
    """Process `index` of `count`'s rows [index*b, (index+1)*b) of each global batch (b = B / count),
    the rows its devices own in the batch-sharded global array. Like the SeqIO pipeline, its state
    names its shard and `set_state` refuses another's."""

    def __init__(self, cfg, index: int, count: int):
        super().__init__(cfg, cfg.data.batch_size)
        b = cfg.data.batch_size // count
        self.rows = [index * b, (index + 1) * b]

    def __getitem__(self, step: int) -> dict:
        return {k: v[slice(*self.rows)] for k, v in super().__getitem__(step).items()}

    def get_state(self) -> dict:
        return {**super().get_state(), "rows": self.rows}

    def set_state(self, state: dict) -> None:
        if state["rows"] != self.rows:
            raise ValueError(f"data state of rows {state['rows']} given to the iterator of rows {self.rows}")
        super().set_state(state)


def _run(workdir: str, num_processes: int, process_id: int = 0, port: int = 0) -> None:
    """One process of a run (in a child: the XLA flags and device count are set by the parent)."""
    import orbax.checkpoint as ocp

    # As conftest.py does for the tests in this process (one compile per array shape otherwise).
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)
    if num_processes > 1:  # a process that dies is noticed in seconds, not the default minutes
        distributed.maybe_initialize(coordinator_address=f"localhost:{port}", num_processes=num_processes,
                                     process_id=process_id, heartbeat_timeout_seconds=20,
                                     shutdown_timeout_seconds=30)
    assert jax.process_count() == num_processes and jax.device_count() == 8
    # Gloo gives the processes 30 s to meet at each new collective. Process 0 alone imports
    # TensorFlow (for its metrics writer) before the first step; on 2 busy cores that can take
    # longer, so every process imports it first and they reach the first step together.
    import tensorflow  # noqa: F401

    cfg = _config()
    loop.train(cfg, workdir, data_iter=_ProcessRows(cfg, jax.process_index(), jax.process_count()))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _child_env(devices: int) -> dict:
    """This process's environment for a child with `devices` CPU devices, compiling fast with
    conftest.py's compiler flags (both runs alike, so they stay comparable)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2")
    env["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0 "
                        "--xla_llvm_disable_expensive_passes=true --xla_cpu_use_fusion_emitters=false")
    for name in ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES",
                 "MEGASCALE_COORDINATOR_ADDRESS", "JAX_NUM_CPU_DEVICES", "PYTEST_CURRENT_TEST"):
        env.pop(name, None)
    return env


def _wait(children, timeout: float) -> list[int | None]:
    """Exit codes; once one process fails, the rest are not waited for (they would hang on it)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        codes = [c.poll() for c in children]
        if all(code is not None for code in codes) or any(code not in (None, 0) for code in codes):
            return codes
        time.sleep(0.5)
    return [c.poll() for c in children]


def _losses(workdir: str) -> list[float]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f if json.loads(line)["split"] == "train"]


def _restore(workdir: str, cfg, mesh):
    """(step, state, data state, the saved data item) of `workdir`'s latest checkpoint, onto `mesh`."""
    boxed, _ = abstract_state(Mirasol3B(cfg.model), make_optimizer(cfg.train), example_batch(cfg, 2))
    target = with_shardings(boxed, state_shardings(boxed, mesh))
    checkpointer = Checkpointer(workdir, save_every=1, keep=1, read_only=True)
    try:
        assert checkpointer.all_steps() == [NUM_STEPS]
        step, state, data_state = checkpointer.restore_latest(target)
        with open(os.path.join(checkpointer.step_path(step), "data", "metadata")) as f:
            return step, state, data_state, json.load(f)
    finally:
        checkpointer.close()


def test_own_data_state_picks_this_process_entry():
    saved = {PER_PROCESS: [{"position": 3, "rows": [0, 4]}, {"position": 3, "rows": [4, 8]}]}
    assert own_data_state(saved, 1) == {"position": 3, "rows": [4, 8]}
    assert own_data_state(saved, 2) == saved[PER_PROCESS][0], "more processes now: modulo"
    assert own_data_state({"position": 3}, 5) == {"position": 3}, "saved by one process: as it is"


def test_two_processes_train_like_one_and_one_restores_their_checkpoint(tmp_path):
    start = time.time()
    port = _free_port()
    runs = {"one process": (tmp_path / "one", 1, 8), "two processes": (tmp_path / "two", NUM_PROCESSES, 4)}
    children, logs = [], []
    for workdir, count, devices in runs.values():
        for p in range(count):
            logs.append(tmp_path / f"{workdir.name}{p}.log")
            with open(logs[-1], "w") as log:  # all three at once: the two cores are shared fairly
                children.append(subprocess.Popen(
                    [sys.executable, os.path.abspath(__file__), str(workdir), str(count), str(p), str(port)],
                    cwd=ROOT, env=_child_env(devices), stdout=log, stderr=subprocess.STDOUT))
    try:
        codes = _wait(children, timeout=300)
    finally:
        for c in children:
            if c.poll() is None:
                c.kill()
                c.wait()
    output = "\n".join(f"--- {log.name} ---\n" + "\n".join(
        line for line in log.read_text().splitlines() if not line.startswith("[Gloo]"))[-3000:] for log in logs)
    assert codes == [0] * len(children), output
    assert "distributed: process 1 of 2, 4 of 8 devices here" in output
    one, two = (str(workdir) for workdir, _, _ in runs.values())

    losses = {name: _losses(str(workdir)) for name, (workdir, _, _) in runs.items()}
    np.testing.assert_allclose(losses["two processes"], losses["one process"], rtol=LOSS_RTOL)
    # Both checkpoints restored here, onto another mesh (FSDP over 2 devices) than either run used.
    cfg = _config()
    mesh = sharding.make_mesh((1, -1, 1), devices=jax.devices()[:min(2, jax.device_count())])
    step, state, data_state, saved_data = _restore(two, cfg, mesh)
    ref_step, ref_state, _, _ = _restore(one, cfg, mesh)
    assert step == ref_step == int(state.step) == NUM_STEPS
    assert saved_data == {PER_PROCESS: [{"position": NUM_STEPS, "rows": [0, 4]},
                                             {"position": NUM_STEPS, "rows": [4, 8]}]}, "each process's own"
    assert data_state == {"position": NUM_STEPS, "rows": [0, 4]}
    diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                                         state.params, ref_state.params))
    assert max(diffs) <= PARAM_ATOL, f"largest parameter difference {max(diffs):.3g}"
    print(f"two processes vs one: largest parameter difference {max(diffs):.3g}, "
          f"losses {losses}, {time.time() - start:.1f}s")


def _check_shared(directory: str, num_processes: int, process_id: int, port: int) -> None:
    distributed.maybe_initialize(coordinator_address=f"localhost:{port}", num_processes=num_processes,
                                 process_id=process_id, heartbeat_timeout_seconds=20, shutdown_timeout_seconds=30)
    try:
        distributed.check_shared_directory(directory, "the workdir", settle_seconds=1.0)
    except distributed.NotSharedError as e:
        print(e, flush=True)
        sys.exit(3)
    print("shared", flush=True)


def test_a_workdir_the_processes_do_not_share_is_refused_by_each(tmp_path):
    """A relative workdir on hosts with their own disks: Orbax's multi-host save would hang."""
    for name, dirs in (("shared", ["shared", "shared"]), ("own", ["host0", "host1"])):
        port, children = _free_port(), []
        for p, d in enumerate(dirs):
            children.append(subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "check-shared", str(tmp_path / d), "2", str(p), str(port)],
                cwd=ROOT, env=_child_env(1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        try:
            outputs = [c.communicate(timeout=120)[0] for c in children]
        finally:
            for c in children:
                if c.poll() is None:
                    c.kill()
        codes = [c.returncode for c in children]
        if name == "shared":
            assert codes == [0, 0], outputs
            assert all("\nshared\n" in out for out in outputs), outputs
            assert os.listdir(tmp_path / "shared") == [], "process 0 removes its marker"
        else:
            assert codes == [3, 3], outputs  # every process stops, none waits for the others
            assert all("do not see the file process 0 wrote" in out and "process(es) [1]" in out
                       for out in outputs), outputs


if __name__ == "__main__":
    if sys.argv[1] == "check-shared":
        _check_shared(sys.argv[2], *map(int, sys.argv[3:]))
    else:
        _run(sys.argv[1], *map(int, sys.argv[2:]))
