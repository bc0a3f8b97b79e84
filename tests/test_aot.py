"""mirasol3b.aot: the train step compiled ahead of time, and the memory one device needs.

The CPU path runs on the 8 fake devices of conftest.py; the TPU path (compile-only devices of a
v5e 2x2 slice) runs when libtpu is installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import linen as nn

from configs import tiny
from mirasol3b import aot, configlib, sharding
from mirasol3b.model import Mirasol3B
from mirasol3b.train.optimizer import make_optimizer
from mirasol3b.train.state import abstract_state, example_batch, state_shardings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(batch_size: int = 8):
    cfg = tiny.get_config()
    for name in ("video_encoder", "audio_encoder", "combiner_transformer", "time_aligned", "text_decoder"):
        cfg.model[name].update(width=32, depth=1, num_heads=2, mlp_dim=64)
    cfg.mesh_shape = (2, 4, 1)  # FSDP over 4, so the state's shardings matter
    cfg.data.update(batch_size=batch_size, text_length=16)
    return cfg


def _expected_bytes(cfg, mesh_shape, devices) -> tuple[int, int, int]:
    """(state bytes per device, batch bytes per device, unsharded state bytes), from the abstract
    state and the shardings alone, without the compiler."""
    mesh = sharding.make_mesh(mesh_shape, devices=devices)
    boxed, _ = abstract_state(Mirasol3B(cfg.model), make_optimizer(cfg.train), example_batch(cfg, 1))
    leaves = jax.tree.leaves(nn.unbox(boxed))
    shards = jax.tree.leaves(state_shardings(boxed, mesh), is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))

    def nbytes(shape, dtype):
        return int(np.prod(shape)) * np.dtype(dtype).itemsize

    state = sum(nbytes(s.shard_shape(x.shape), x.dtype) for x, s in zip(leaves, shards, strict=True))
    full = sum(nbytes(x.shape, x.dtype) for x in leaves)
    data = mesh_shape[0] * mesh_shape[1]
    batch = sum(nbytes((x.shape[0] // data, *x.shape[1:]), x.dtype)
                for x in example_batch(cfg, cfg.data.batch_size).values())
    return state, batch, full


@pytest.fixture(scope="module")
def cpu_reports():
    """Batch size -> report of the tiny model's train step compiled on the 8 fake CPU devices."""
    devices = aot.cpu_devices(8)
    return {b: aot.compile_train_step(_config(b), devices) for b in (8, 16)}


def test_parse_topology():
    assert aot.parse_topology("v5p-128") == ("v5p:4x4x4", 64, "v5p-128")
    assert aot.parse_topology("v5p-8") == ("v5p:2x2x1", 4, "v5p-8")
    assert aot.parse_topology("v5p-64") == ("v5p:2x4x4", 32, "v5p-64")
    assert aot.parse_topology("v5litepod-256") == ("v5e:16x16", 256, "v5litepod-256")
    assert aot.parse_topology("v5e-32") == ("v5e:4x8", 32, "v5litepod-32")
    assert aot.parse_topology("v6e-64") == ("v6e:8x8", 64, "v6e-64")
    assert aot.parse_topology("v5e:2x2") == ("v5e:2x2", 4, "v5litepod-4")
    assert aot.parse_topology("v5p:4x4x8") == ("v5p:4x4x8", 128, "v5p-256")
    for bad in ("v5p", "v5p-127", "v5p-96", "tpu:2x2", "v4:2x2x2", "v5e-2x2"):
        with pytest.raises(aot.AotError):
            aot.parse_topology(bad)
    # What libtpu would abort the process on (a failed CHECK), refused with the reason instead.
    for bad, reason in (("v5litepod-1024", "at most 256"), ("v5e:64x64", "at most 256"), ("v6e:32x2", "16x16"),
                        ("v5p:4x4", "3 dimensions"), ("v5e:4x4x1", "2 dimensions"), ("v5p-32768", "at most 8960"),
                        ("v4-32", "v4 is not supported")):
        with pytest.raises(aot.AotError, match=reason):
            aot.parse_topology(bad)


def test_config_errors_fail_before_compiling():
    with pytest.raises(configlib.ConfigError, match="config.mesh_shape"):
        aot.check_config(_config(), 64)  # 2 x 4 x 1 is not a 64-chip mesh
    cfg = _config(12)  # 12 clips do not split over data x fsdp = 8
    with pytest.raises(configlib.ConfigError, match="config.data.batch_size"):
        aot.check_config(cfg, 8)
    cfg = _config()
    cfg.data.num_frames = 7  # not a whole number of snippets
    with pytest.raises(configlib.ConfigError):
        aot.check_config(cfg, 8)
    cfg = _config(16)
    cfg.train.microbatches = 4  # slices of 4 clips over data x fsdp = 8
    with pytest.raises(configlib.ConfigError, match="config.train.microbatches"):
        aot.check_config(cfg, 8)
    assert aot.check_config(_config(), 8) == (2, 4, 1)


def test_cli_reports_a_config_error_without_compiling():
    run = subprocess.run(
        [sys.executable, "-m", "mirasol3b.aot", "--config=configs/tiny.py", "--fake_devices=8",
         "--config.mesh_shape=3,1,1"],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "AOT train step" not in run.stdout
    assert "error: config.mesh_shape" in run.stderr and "Traceback" not in run.stderr, run.stderr[-2000:]


def test_cpu_memory_matches_the_shardings(cpu_reports):
    report = cpu_reports[8]
    assert report["platform"] == "cpu" and report["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
    m = report["memory_per_device"]
    assert min(m["argument"], m["output"], m["alias"], m["temp"], m["total"]) > 0
    state, batch, _ = _expected_bytes(_config(8), (2, 4, 1), aot.cpu_devices(8))
    assert report["from_shardings"] == {"state": state, "batch": batch}
    # Arguments are the sharded state and batch (the rng key adds at most a few bytes); the donated
    # state comes back in place, so the aliased bytes are the state's.
    assert state + batch <= m["argument"] <= state + batch + 64
    assert state <= m["alias"] <= m["output"]
    assert m["total"] == m["argument"] + m["output"] - m["alias"] + m["temp"] + m["generated_code"]


def test_doubling_the_batch_raises_temporaries_not_the_state(cpu_reports):
    small, large = cpu_reports[8], cpu_reports[16]
    assert large["from_shardings"]["state"] == small["from_shardings"]["state"]
    assert large["from_shardings"]["batch"] == 2 * small["from_shardings"]["batch"]
    assert large["memory_per_device"]["temp"] > small["memory_per_device"]["temp"]
    assert large["memory_per_device"]["total"] > small["memory_per_device"]["total"]


def test_fsdp_shards_the_optimizer_state_too(cpu_reports):
    """Over fsdp=4 every large leaf of params, mu and nu is split four ways."""
    state, _, full = _expected_bytes(_config(8), (2, 4, 1), aot.cpu_devices(8))
    assert state < 0.35 * full


def test_report_is_one_block_and_one_json_line(cpu_reports):
    report = cpu_reports[8]
    text = aot.format_report(report, "configs/tiny.py", "CPU ESTIMATE")
    assert "mesh: data=2  fsdp=4  tensor=1  (8 devices)" in text
    assert "batch 8 = 1 clips per data shard)" in text
    sliced = aot.format_report(dict(cpu_reports[16], microbatches=2), "configs/tiny.py", "CPU ESTIMATE")
    assert "batch 16 = 2 clips per data shard, in 2 microbatches of 1)" in sliced
    for row in ("arguments", "outputs", "aliased", "temporaries", "generated code", "total"):
        assert f"  {row} " in text
    line = aot.json_line(report, "configs/tiny.py", "CPU ESTIMATE")
    assert "\n" not in line
    parsed = json.loads(line)
    assert parsed["memory_per_device"] == report["memory_per_device"] and parsed["mesh"] == report["mesh"]


@pytest.mark.skipif(aot.libtpu_version() is None, reason="libtpu is not installed (pip install 'jax[tpu]')")
def test_tpu_topology_compiles(monkeypatch):
    # What aot.tpu_devices would set, restored after the test.
    monkeypatch.setenv("TPU_ACCELERATOR_TYPE", "v5litepod-4")
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "localhost")
    monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    devices = aot.tpu_devices("v5e:2x2")
    assert len(devices) == 4 and devices[0].platform == "tpu"
    cfg = _config(8)
    cfg.mesh_shape = (1, 4, 1)
    cfg.model.use_audio = False  # a quarter of the TPU compile time; the CPU tests compile the audio path
    report = aot.compile_train_step(cfg, devices)
    assert report["device_kind"] == "TPU v5 lite" and report["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    m, s = report["memory_per_device"], report["from_shardings"]
    # (temp may be 0 here: the TPU compiler keeps this small step's scratch out of the heap)
    assert min(m["argument"], m["output"], m["generated_code"], m["peak"]) > 0 and m["temp"] >= 0
    assert m["argument"] >= s["state"] + s["batch"]  # TPU layouts pad, never shrink


@pytest.mark.skipif(aot.libtpu_version() is None, reason="libtpu is not installed (pip install 'jax[tpu]')")
def test_tpu_out_of_memory_is_reported_not_raised(monkeypatch):
    monkeypatch.setenv("TPU_ACCELERATOR_TYPE", "v5litepod-4")
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "localhost")
    monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    cfg = _config(8)
    cfg.mesh_shape = (4, 1, 1)  # data parallel: every chip holds the whole state
    cfg.model.use_audio = False
    # Embedding and logits of 2 x 512M params (width 32): 12 GB of f32 state, and as much again
    # in gradients and updates, on a 16 GiB v5e chip.
    cfg.model.vocab_size = 16_000_000
    report = aot.compile_train_step(cfg, aot.tpu_devices("v5e:2x2"))
    assert not report["fits"] and report["memory_per_device"] is None and report["compiled"] is None
    assert report["error"].startswith("RESOURCE_EXHAUSTED") and "HBM" in report["error"]
    assert report["from_shardings"]["state"] > 11 * aot.GiB
    text = aot.format_report(report, "configs/tiny.py", "TPU v5e:2x2")
    assert "DOES NOT FIT" in text and json.loads(aot.json_line(report, "tiny", "TPU"))["fits"] is False
