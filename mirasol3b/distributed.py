"""Starting JAX's multi-process runtime (`jax.distributed.initialize`) before anything touches a device.

    python -m mirasol3b.main ... [--distributed=auto|on|off]
        [--coordinator_address=HOST:PORT --num_processes=N --process_id=I]

`--distributed=auto` (the default) initialises when this is one process of several:
  * the three coordinator flags are given (every process the same address and count, its own id;
    the address may instead come from `$JAX_COORDINATOR_ADDRESS`, as JAX reads it);
  * the environment says so: `$JAX_COORDINATOR_ADDRESS`; a TPU worker list with more than one
    host (`$TPU_WORKER_HOSTNAMES`, `$TPU_PROCESS_ADDRESSES`, as on GKE); a multislice job
    (`$MEGASCALE_COORDINATOR_ADDRESS`, `$MEGASCALE_NUM_SLICES` > 1); Slurm or Open MPI with more
    than one task (`$SLURM_NTASKS`, `$OMPI_COMM_WORLD_SIZE`);
  * this machine is a Cloud TPU VM (TPU chips on its PCI bus): a TPU VM of a pod slice started with
    `gcloud compute tpus tpu-vm ssh --worker=all` has no such variables; its worker list is in the
    VM's metadata, which `jax.distributed.initialize()` reads itself (a single-host TPU VM then
    runs as a distributed job of one process, which costs a second at start-up; not when
    `$TPU_SKIP_MDS_QUERY` tells JAX to leave the metadata alone).
In every environment case `jax.distributed.initialize()` gets no arguments: JAX detects the
coordinator, the process count and this process's id from the same sources.
`--distributed=on` always initialises (with the flags if given, else auto-detected by JAX);
`--distributed=off` never does (and refuses coordinator flags, which would then be ignored).

CPU processes talk through Gloo: the default of `jax_cpu_collectives_implementation` in the pinned
jax 0.10.2, so nothing needs setting (tests/test_multihost.py runs two CPU processes that way).

`decide` is the decision alone, from flags and an environment passed in (so it is unit-tested);
`maybe_initialize` reads the real environment and acts on it.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Mapping

from absl import app, flags

from mirasol3b import errors

MODES = ("auto", "on", "off")


def define_flags(fv: flags.FlagValues) -> dict:
    """`--distributed`, `--coordinator_address`, `--num_processes`, `--process_id` in `fv`
    (`mirasol3b/cli.py` defines them for the entry points that take them)."""
    return {
        "distributed": flags.DEFINE_enum(
            "distributed", "auto", list(MODES), "Start jax.distributed: auto (when flags or environment say there are "
            "several processes, or on a Cloud TPU VM), on, off.", flag_values=fv),
        "coordinator_address": flags.DEFINE_string(
            "coordinator_address", None, "HOST:PORT of process 0's coordinator service (same on every process).",
            flag_values=fv),
        "num_processes": flags.DEFINE_integer("num_processes", None, "How many processes the job has.",
                                              lower_bound=1, flag_values=fv),
        "process_id": flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).",
                                           lower_bound=0, flag_values=fv),
    }


@dataclasses.dataclass(frozen=True)
class Decision:
    initialize: bool
    kwargs: dict  # keyword arguments for jax.distributed.initialize (empty: JAX detects them)
    reason: str


def _count(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ.get(name, "") or 0)
    except ValueError:
        return 0


def _environment_reason(environ: Mapping[str, str], tpu_chips: int) -> str | None:
    """Why the environment says this is one process of several (or a TPU VM), or None."""
    if environ.get("JAX_COORDINATOR_ADDRESS"):
        return "$JAX_COORDINATOR_ADDRESS is set"
    for name in ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES"):
        hosts = [h for h in environ.get(name, "").split(",") if h.strip()]
        if len(hosts) > 1:
            return f"${name} lists {len(hosts)} TPU hosts"
    if environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "$MEGASCALE_COORDINATOR_ADDRESS is set (multislice)"
    if _count(environ, "MEGASCALE_NUM_SLICES") > 1:
        return f"$MEGASCALE_NUM_SLICES={environ['MEGASCALE_NUM_SLICES']} (multislice)"
    for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        if _count(environ, name) > 1:
            return f"${name}={environ[name]}"
    if tpu_chips > 0 and not environ.get("TPU_SKIP_MDS_QUERY"):  # JAX would not read the metadata
        return f"a Cloud TPU VM ({tpu_chips} TPU chips on the PCI bus; JAX reads the worker list from metadata)"
    return None


def decide(mode: str = "auto", *, coordinator_address: str | None = None, num_processes: int | None = None,
           process_id: int | None = None, environ: Mapping[str, str] | None = None,
           tpu_chips: int = 0) -> Decision:
    """Whether and how to call `jax.distributed.initialize`, from the flags, `environ` (default:
    `os.environ`) and the number of TPU chips on this machine. Raises ValueError naming the flag
    for contradictory or incomplete flags."""
    environ = os.environ if environ is None else environ
    if mode not in MODES:
        raise ValueError(f"--distributed must be one of {MODES}, got {mode!r}")
    given = {k: v for k, v in (("coordinator_address", coordinator_address), ("num_processes", num_processes),
                               ("process_id", process_id)) if v is not None}
    if mode == "off":
        if given:
            raise ValueError(f"--distributed=off with --{', --'.join(given)}: drop them or use "
                             "--distributed=auto")
        return Decision(False, {}, "--distributed=off")
    if given:
        address = coordinator_address or environ.get("JAX_COORDINATOR_ADDRESS")
        missing = [f"--{k}" for k, v in (("coordinator_address", address), ("num_processes", num_processes),
                                         ("process_id", process_id)) if v is None]
        if missing:
            raise ValueError(f"{', '.join(missing)} missing: give --coordinator_address (or "
                             "$JAX_COORDINATOR_ADDRESS), --num_processes and --process_id together")
        if ":" not in address:
            raise ValueError(f"--coordinator_address must be HOST:PORT, got {address!r}")
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ValueError(f"--process_id must be in [0, --num_processes={num_processes}), got {process_id}")
        kwargs = {"coordinator_address": address, "num_processes": num_processes, "process_id": process_id}
        return Decision(True, kwargs, f"process {process_id} of {num_processes}, coordinator {address}")
    if mode == "on":
        return Decision(True, {}, "--distributed=on (JAX detects the cluster)")
    reason = _environment_reason(environ, tpu_chips)
    if reason is None:
        return Decision(False, {}, "one process (no coordinator flags, no multi-host environment)")
    return Decision(True, {}, reason)


def tpu_chips_on_this_machine() -> int:
    """TPU chips on the PCI bus (no network access, no backend start); 0 if that cannot be read."""
    try:
        # Private, but what JAX's own Cloud TPU VM detection reads.
        from jax._src import hardware_utils

        return int(hardware_utils.num_available_tpu_chips_and_device_id()[0])
    except Exception:  # noqa: BLE001 - an unreadable /sys or a moved helper: assume no TPU
        return 0


def maybe_initialize(mode: str = "auto", *, coordinator_address: str | None = None,
                     num_processes: int | None = None, process_id: int | None = None,
                     **initialize_kwargs) -> Decision:
    """Calls `jax.distributed.initialize` when `decide` says so (once: a second call does nothing),
    with `initialize_kwargs` (e.g. `heartbeat_timeout_seconds`) added. Must run before any JAX
    computation, `jax.devices()` included."""
    import jax

    decision = decide(mode, coordinator_address=coordinator_address, num_processes=num_processes,
                      process_id=process_id, tpu_chips=0 if mode == "off" else tpu_chips_on_this_machine())
    if decision.initialize and not jax.distributed.is_initialized():
        jax.distributed.initialize(**decision.kwargs, **initialize_kwargs)
        print(f"distributed: process {jax.process_index()} of {jax.process_count()}, "
              f"{jax.local_device_count()} of {jax.device_count()} devices here ({decision.reason})", flush=True)
    return decision


def maybe_initialize_from_flags(args) -> Decision:
    """`maybe_initialize` with the parsed `--distributed`, `--coordinator_address`, `--num_processes`,
    `--process_id` (`cli.Args`); call it first in a program's main, before anything asks JAX for a
    device. Bad flags are an `app.UsageError`."""
    try:
        return maybe_initialize(args.distributed, coordinator_address=args.coordinator_address,
                                num_processes=args.num_processes, process_id=args.process_id)
    except ValueError as e:
        raise app.UsageError(str(e)) from e


def all_agree(ok: bool) -> bool:
    """True only if every process says True (one process: itself)."""
    import jax

    if jax.process_count() == 1:
        return ok
    import numpy as np
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok, np.int32))))


def primary_decides(value: bool) -> bool:
    """Process 0's `value`, on every process (one process: itself)."""
    import jax

    if jax.process_count() == 1:
        return value
    import numpy as np
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.asarray(value, np.int32)))


class NotSharedError(errors.Error, RuntimeError):
    """A directory every process must share is not the same directory on every host."""


def check_shared_directory(path, what: str = "the directory", *, create: bool = True,
                           settle_seconds: float = 10.0) -> None:
    """With several processes, checks that a local `path` is one directory they all see (a URI such
    as gs://... is shared by nature): process 0 writes a file there, every process looks for it.
    Raises NotSharedError on every process otherwise: checkpoints written there would be one
    host's own, and Orbax's multi-host save would wait forever for the others' files. A process
    that does not see the file looks again for up to `settle_seconds` (network file systems with
    attribute caches, such as gcsfuse, may lag). Every process must call it (it meets the others
    twice)."""
    import jax

    path = os.fspath(path)
    if jax.process_count() == 1 or "://" in path:
        return
    import numpy as np
    from jax.experimental import multihost_utils

    if create:
        os.makedirs(path, exist_ok=True)
    token = multihost_utils.broadcast_one_to_all(np.int64(int.from_bytes(os.urandom(7), "little")))
    marker = os.path.join(path, f".shared_by_all_processes_{int(token)}")
    if jax.process_index() == 0 and os.path.isdir(path):
        with open(marker, "w") as f:
            f.write("written by process 0 to check that every process sees this directory\n")
    multihost_utils.sync_global_devices("check_shared_directory: written")  # same name on all
    deadline = time.monotonic() + settle_seconds
    while not os.path.exists(marker) and time.monotonic() < deadline:
        time.sleep(0.5)
    seen = multihost_utils.process_allgather(np.asarray(os.path.exists(marker)))
    multihost_utils.sync_global_devices("check_shared_directory: read")
    if jax.process_index() == 0 and os.path.exists(marker):
        os.remove(marker)
    blind = [int(i) for i in np.flatnonzero(~np.asarray(seen, bool))]
    if blind:
        raise NotSharedError(
            f"{what} {path!r} is not one directory shared by the {jax.process_count()} processes: "
            f"process(es) {blind} do not see the file process 0 wrote there (a local path on each host, "
            "or missing). Use gs://BUCKET/PATH, or a file system every host mounts.")
