"""Ahead-of-time compile of the train step for a TPU slice, on a machine without one, and the
memory each chip needs.

    python -m mirasol3b.aot --config=configs/mirasol3b.py --topology=v5p-128
    python -m mirasol3b.aot --config=configs/long_video.py --topology=v5e:16x16 --config.mesh_shape=-1,16,1
    python -m mirasol3b.aot --config=configs/tiny.py --fake_devices=8        # CPU backend, no libtpu

The train step is the one `mirasol3b.main` runs: `make_train_step` under `jax.jit` with the
state's shardings, the batch over `('data', 'fsdp')` and the state donated, on `config.mesh_shape`
resolved for the slice's chips, at `config.data.batch_size`. It is lowered on abstract inputs
(nothing is allocated) and compiled; `compiled.memory_analysis()` gives what one chip holds:
arguments (params, optimizer state, batch), outputs, the part of the outputs that reuses the
donated arguments, temporaries (activations, gradients, updates) and the generated code. A step
that cannot fit is reported as such (the TPU compiler's RESOURCE_EXHAUSTED message), exit status 1.

TPU path: `libtpu` compiles for compile-only devices of `--topology`, e.g. `v5p:4x4x4` or the
Cloud accelerator type `v5p-128` (v5p counts TensorCores, two a chip; v5e/v6e count chips). It is
not in requirements.txt: `pip install 'jax[tpu]==<jax version>'` brings the libtpu that jax pins,
the one `launch/tpu_run.sh` installs on the pod. The numbers are TPU XLA's own.

CPU path (`--fake_devices=N`, `--backend=cpu`, or `--topology` without libtpu): XLA's CPU backend
on N fake host devices in the same mesh. Arguments and outputs are exact (they follow from the
shardings); temporaries are the CPU compiler's, whose fusion, scheduling and rematerialisation
differ from TPU's, above or below the TPU number: an estimate, labelled as such.

Prints one readable block and one JSON line. Config errors (`configlib.validate`, a mesh shape
that does not fit the slice, a batch that does not split over the data axes) and unknown
topologies fail before anything is traced.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import math
import os
import re
import sys
import time

import jax
import ml_collections
import numpy as np
from absl import app, flags
from flax import linen as nn
from jax._src import xla_bridge  # backends_are_initialized: no public name for it
from ml_collections import config_flags

from mirasol3b import cli, configlib, errors, sharding
from mirasol3b.model import Mirasol3B
from mirasol3b.train.optimizer import make_optimizer
from mirasol3b.train.state import abstract_state, example_batch, state_shardings
from mirasol3b.train.step import make_train_step

GiB = 2 ** 30

# Per-chip HBM from the public Cloud TPU specs, by `device.device_kind`.
HBM_GIB = {"TPU v5 lite": 16, "TPU v5": 95, "TPU v6 lite": 32}

# Accelerator-type prefix -> (libtpu topology prefix, TensorCores per chip in the type's count,
# number of topology dims).
_ACCELERATOR_TYPES = {"v5p": ("v5p", 2, 3), "v5litepod": ("v5e", 1, 2), "v5e": ("v5e", 1, 2),
                      "v6e": ("v6e", 1, 2)}
# The libtpu topology names tried here: v5p slices are 3-D, v5e/v6e 2-D. (libtpu's v4 names give a
# device per TensorCore, not per chip, so v4 is left out.)
_TOPOLOGY = re.compile(r"^(v5p|v5e|v6e):(\d+(?:x\d+)*)$")
# The largest single slice of each family (public Cloud TPU specs); libtpu aborts the process
# (a failed CHECK, no exception) on a larger one.
_MAX_CHIPS = {"v5p": 8960, "v5e": 256, "v6e": 256}
_MAX_DIM_2D = 16  # v5e and v6e slices are at most 16x16


class AotError(errors.Error, ValueError):
    """A topology or backend this tool cannot use; the message says which and why."""


def _slice_shape(chips: int, ndim: int) -> tuple[int, ...]:
    """The Cloud TPU slice shape of `chips` (a power of two): v5p-128 -> 4x4x4, v5e-256 -> 16x16."""
    dims = [2, 2, 1] if ndim == 3 else [1, 1]
    if chips < math.prod(dims) or chips & (chips - 1):
        raise AotError(f"{chips} chips: only powers of two >= {math.prod(dims)} map to a slice shape here; "
                       f"pass the topology itself, e.g. --topology=v5p:4x4x4")
    while math.prod(dims) < chips:
        i = max(j for j, d in enumerate(dims) if d == min(dims))  # the last of the smallest dims
        dims[i] *= 2
    return tuple(dims)


def parse_topology(name: str) -> tuple[str, int, str]:
    """`v5p:4x4x4` or an accelerator type (`v5p-128`, `v5litepod-256`, `v5e-256`, `v6e-64`) ->
    (libtpu topology name, chips, accelerator type)."""
    match = _TOPOLOGY.match(name)
    if match:
        family, shape = match.group(1), tuple(int(d) for d in match.group(2).split("x"))
        ndim = 3 if family == "v5p" else 2
        if len(shape) != ndim or min(shape) < 1:
            raise AotError(f"topology {name!r}: {family} slices have {ndim} dimensions of at least 1, e.g. "
                           + ("v5p:4x4x4" if ndim == 3 else f"{family}:16x16"))
        _check_size(name, family, shape)
        chips = math.prod(shape)
        per_chip = 2 if family == "v5p" else 1
        prefix = {"v5e": "v5litepod"}.get(family, family)
        return name, chips, f"{prefix}-{chips * per_chip}"
    prefix, _, count = name.rpartition("-")
    if prefix not in _ACCELERATOR_TYPES or not count.isdigit():
        unsupported = " (v4 is not supported: libtpu's v4 names give a device per TensorCore)" if (
            name.startswith("v4")) else ""
        raise AotError(f"topology {name!r}: expected a v5p, v5e or v6e slice, e.g. v5p:4x4x4, v5e:16x16, v5p-128, "
                       f"v5litepod-256{unsupported}")
    family, cores_per_chip, ndim = _ACCELERATOR_TYPES[prefix]
    if int(count) % cores_per_chip:
        raise AotError(f"topology {name!r}: {prefix} counts {cores_per_chip} TensorCores a chip")
    chips = int(count) // cores_per_chip
    if chips > _MAX_CHIPS[family]:
        raise AotError(f"topology {name!r}: {chips} chips, but a {family} slice has at most {_MAX_CHIPS[family]}")
    shape = _slice_shape(chips, ndim)
    _check_size(name, family, shape)
    return f"{family}:{'x'.join(map(str, shape))}", chips, f"{'v5litepod' if family == 'v5e' else prefix}-{count}"


def _check_size(name: str, family: str, shape: tuple[int, ...]) -> None:
    if math.prod(shape) > _MAX_CHIPS[family]:
        raise AotError(f"topology {name!r}: {math.prod(shape)} chips, but a {family} slice has at most "
                       f"{_MAX_CHIPS[family]}")
    if len(shape) == 2 and max(shape) > _MAX_DIM_2D:
        raise AotError(f"topology {name!r}: a {family} slice is at most {_MAX_DIM_2D}x{_MAX_DIM_2D} chips")


def libtpu_version() -> str | None:
    """The installed libtpu's version, or None when there is none."""
    if importlib.util.find_spec("libtpu") is None:
        return None
    try:
        return importlib.metadata.version("libtpu")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def tpu_devices(topology: str) -> list:
    """Compile-only devices of a TPU slice (no TPU needed, libtpu is). `topology` as `parse_topology`."""
    if libtpu_version() is None:
        raise AotError(f"libtpu is not installed: `pip install 'jax[tpu]=={jax.__version__}'` brings the one "
                       "matching jax, or use the CPU backend (--fake_devices / --backend=cpu)")
    from jax.experimental import topologies

    name, chips, accelerator_type = parse_topology(topology)
    # Without these libtpu looks for a TPU VM's metadata and prints errors that do not stop it.
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", accelerator_type)
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    # /tmp/libtpu_lockfile guards chips; compile-only devices have none, and without this a second
    # process with libtpu loaded (another compile, a test) makes the topology fail with ABORTED.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        devices = list(topologies.get_topology_desc(topology_name=name, platform="tpu").devices)
    except jax.errors.JaxRuntimeError as e:
        raise AotError(f"libtpu {libtpu_version()} cannot describe topology {name}: {e}") from e
    if len(devices) != chips:
        raise AotError(f"topology {name} gave {len(devices)} devices, expected {chips} chips")
    return devices


def cpu_devices(n: int) -> list:
    """The first `n` CPU devices; there must be at least `n` (`jax_num_cpu_devices` or
    `XLA_FLAGS=--xla_force_host_platform_device_count`, set before jax starts its backends)."""
    devices = jax.devices("cpu")
    if len(devices) < n:
        raise AotError(f"{n} CPU devices needed, jax has {len(devices)}: set "
                       f"XLA_FLAGS=--xla_force_host_platform_device_count={n} before jax starts")
    return devices[:n]


def check_config(config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
    """Validates `config` for a slice of `num_devices`; returns the resolved mesh shape."""
    configlib.validate(config)
    try:
        shape = sharding.resolve_mesh_shape(config.mesh_shape, num_devices)
    except ValueError as e:
        raise configlib.ConfigError("mesh_shape", f"a mesh of the slice's {num_devices} devices",
                                    f"{tuple(config.mesh_shape)} ({e})") from e
    data_shards = shape[0] * shape[1]
    configlib.check_batch_fits_mesh(config, data_shards)
    return shape


def _bytes_per_device(tree) -> int:
    """Bytes one device holds of a tree of `ShapeDtypeStruct`s with shardings."""
    return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(tree))


def abstract_inputs(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
    """(model, optimizer, state, batch, rng) with `ShapeDtypeStruct` leaves carrying their shardings."""
    model, optimizer = Mirasol3B(config.model), make_optimizer(config.train)
    boxed, _ = abstract_state(model, optimizer, example_batch(config, 1))
    shardings = state_shardings(boxed, mesh)

    def with_sharding(x, s):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)

    state = jax.tree.map(with_sharding, nn.unbox(boxed), shardings)
    batch = {k: with_sharding(x, sharding.batch_sharding(mesh, len(x.shape)))
             for k, x in example_batch(config, config.data.batch_size).items()}
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    rng = with_sharding(jax.eval_shape(lambda: jax.random.key(0)), replicated)
    return model, optimizer, state, batch, rng


def compile_train_step(config: ml_collections.ConfigDict, devices) -> dict:
    """Lowers and compiles the train step of `config` on a mesh of `devices` (real, fake CPU or
    compile-only TPU). Returns the report: mesh, 'fits', memory per device, bytes from the
    shardings, seconds, and the `compiled` object. When the TPU compiler runs out of HBM, 'fits'
    is False, 'error' holds its message and there is no memory analysis."""
    mesh_shape = check_config(config, len(devices))
    mesh = sharding.make_mesh(mesh_shape, devices=devices)
    times = [time.perf_counter()]
    model, optimizer, state, batch, rng = abstract_inputs(config, mesh)
    times.append(time.perf_counter())
    in_shardings = jax.tree.map(lambda x: x.sharding, (state, batch, rng))
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        step = jax.jit(make_train_step(model, optimizer, config.loss, config.train.microbatches),
                       in_shardings=in_shardings, out_shardings=(in_shardings[0], None), donate_argnums=0)
        lowered = step.lower(state, batch, rng)
    times.append(time.perf_counter())
    # The CPU executable never runs: LLVM's optimisations only cost time (half the compile) and
    # leave the buffer assignment, hence memory_analysis(), unchanged.
    options = {"xla_backend_optimization_level": 0} if devices[0].platform == "cpu" else {}
    compiled, memory, error = None, None, None
    try:
        compiled = lowered.compile(options)
    except jax.errors.JaxRuntimeError as e:
        if not str(e).startswith("RESOURCE_EXHAUSTED"):
            raise
        error = str(e)  # e.g. "... HLO temporaries (48.09G) exceeds available HBM (15.75G)"
    times.append(time.perf_counter())
    if compiled is not None:
        stats = compiled.memory_analysis()
        memory = {name: int(getattr(stats, f"{name}_size_in_bytes"))
                  for name in ("argument", "output", "alias", "temp", "generated_code")}
        # Donated state buffers are counted in both arguments and outputs; `alias` is that overlap.
        memory["total"] = (memory["argument"] + memory["output"] - memory["alias"] + memory["temp"]
                           + memory["generated_code"])
        memory["peak"] = int(stats.peak_memory_in_bytes)
    device = devices[0]
    return {
        "platform": device.platform,
        "device_kind": device.device_kind,
        "devices": len(devices),
        "mesh": dict(mesh.shape),
        "batch_size": config.data.batch_size,
        "microbatches": config.train.microbatches,
        "num_frames": config.data.num_frames,
        "params": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params)),
        "fits": error is None,
        "error": error,
        "memory_per_device": memory,
        "from_shardings": {"state": _bytes_per_device(state), "batch": _bytes_per_device(batch)},
        "seconds": dict(zip(("state", "lower", "compile"), np.round(np.diff(times), 2).tolist(), strict=True)),
        "compiled": compiled,
    }


def format_report(report: dict, config_name: str, source: str) -> str:
    """The readable block: what was compiled, for what, on which mesh, and the memory per device."""
    def g(b):
        return f"{b / GiB:9.3f} GiB"

    m, s = report["memory_per_device"], report["from_shardings"]
    unit = "chip" if report["platform"] == "tpu" else "device"
    batch, data = report["batch_size"], report["mesh"]["data"] * report["mesh"]["fsdp"]
    micro = report.get("microbatches", 1)
    slices = f", in {micro} microbatches of {batch // micro // data}" if micro > 1 else ""
    lines = [
        (f"AOT train step: {config_name}  ({report['params']:,} params, {report['num_frames']} frames, "
         f"batch {batch} = {batch // data} clips per data shard{slices})"),
        f"compiled for: {source}",
        "mesh: " + "  ".join(f"{k}={v}" for k, v in report["mesh"].items()) + f"  ({report['devices']} {unit}s)",
    ]
    if not report["fits"]:
        lines += [f"DOES NOT FIT in one {unit}'s memory: {report['error']}",
                  f"  (state {s['state'] / GiB:.3f} + batch {s['batch'] / GiB:.3f} GiB per {unit} from the shardings)"]
    else:
        total = g(m["total"])
        hbm = HBM_GIB.get(report["device_kind"]) if report["platform"] == "tpu" else None
        if hbm:
            need = max(m["total"], m["peak"]) / GiB
            total += f"  (with the peak: {need / hbm:.0%} of {hbm} GiB HBM, {report['device_kind']} public spec)"
        lines += [
            f"memory per {unit} (compiled.memory_analysis()):",
            (f"  arguments      {g(m['argument'])}   (state {s['state'] / GiB:.3f} + batch {s['batch'] / GiB:.3f}"
             " GiB from the shardings)"),
            f"  outputs        {g(m['output'])}",
            f"  aliased        {g(m['alias'])}   (outputs that reuse the donated state)",
            f"  temporaries    {g(m['temp'])}",
            f"  generated code {g(m['generated_code'])}",
            f"  total          {total}",
        ]
        if report["platform"] == "tpu":  # the CPU backend's peak leaves out its temporaries
            lines.append(f"  XLA peak       {g(m['peak'])}   (the TPU compiler's own heap peak)")
    lines.append("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in report["seconds"].items()))
    return "\n".join(lines)


def json_line(report: dict, config_name: str, source: str) -> str:
    out = {k: v for k, v in report.items() if k != "compiled"}
    out.update(config=config_name, compiled_for=source)
    if report["memory_per_device"] is not None:
        out["memory_per_device_gib"] = {k: round(v / GiB, 4) for k, v in report["memory_per_device"].items()}
    return json.dumps(out)


def _devices_for(topology: str | None, fake_devices: int | None, backend: str) -> tuple[list, str]:
    """(devices, a line saying what they are). Called after the CPU device count is set."""
    if topology and backend != "cpu":
        version = libtpu_version()
        if version is not None or backend == "tpu":
            name = parse_topology(topology)[0]
            return tpu_devices(topology), f"TPU {name} (compile-only devices, libtpu {version})"
        print(f"libtpu is not installed (pip install 'jax[tpu]=={jax.__version__}' brings it); "
              "falling back to the CPU backend", flush=True)
    n = fake_devices or parse_topology(topology)[1]
    what = f"the {topology} slice's {n} chips" if topology else f"{n} devices"
    return cpu_devices(n), (f"CPU ESTIMATE, not a TPU number: XLA's CPU backend on {n} fake devices standing "
                            f"for {what}; arguments/outputs exact, temporaries the CPU compiler's")


SHARED_FLAGS = cli.Shared(config=cli.REQUIRED, config_help="Config file, e.g. configs/mirasol3b.py[:ttm].")


def define_flags(fv: flags.FlagValues) -> dict:
    return {
        "topology": flags.DEFINE_string("topology", None, "TPU slice: v5p:4x4x4, v5e:16x16, v5p-128, v5litepod-256.",
                                        flag_values=fv),
        "fake_devices": flags.DEFINE_integer("fake_devices", None, "Compile on the CPU backend with this many fake "
                                             "devices.", flag_values=fv),
        "backend": flags.DEFINE_enum("backend", "auto", ["auto", "tpu", "cpu"], "auto: TPU when libtpu is installed, "
                                     "else CPU on the slice's chip count.", flag_values=fv),
    }


def main(args: cli.Args) -> None:
    topology, fake, backend = args.topology, args.fake_devices, args.backend
    if bool(topology) == bool(fake):
        raise app.UsageError("give exactly one of --topology (a TPU slice) and --fake_devices (CPU)")
    if fake and backend == "tpu":
        raise app.UsageError("--fake_devices is the CPU backend; --backend=tpu needs --topology")
    config_name = config_flags.get_config_filename(flags.FLAGS["config"])
    # Bad fields, topology names and mesh shapes fail here, before anything is traced.
    config = configlib.validate(args.config)
    n = fake or parse_topology(topology)[1]
    check_config(config, n)
    if not xla_bridge.backends_are_initialized():
        # Nothing runs: the CPU backend is the only one started; TPU devices are compile-only.
        jax.config.update("jax_platforms", "cpu")
        if backend == "cpu" or fake or libtpu_version() is None:
            jax.config.update("jax_num_cpu_devices", n)
    devices, source = _devices_for(topology, fake, backend)
    report = compile_train_step(config, devices)
    print(format_report(report, config_name, source))
    print(json_line(report, config_name, source), flush=True)
    if not report["fits"]:
        sys.exit(1)


if __name__ == "__main__":
    cli.run(main, define_flags, SHARED_FLAGS)
