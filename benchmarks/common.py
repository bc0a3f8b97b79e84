"""What the benchmarks share: configs, the train step as `mirasol3b.train.loop` builds it, timing,
the machine's description and the rows of `benchmarks/RESULTS.md`.

Benchmarks time inside one process and alternate what they compare (A B A B ...), because this
machine is shared and absolute times drift; ratios are taken pair by pair and their median quoted.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `python benchmarks/x.py` from anywhere: the repo's packages first
    sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from flax import linen as nn  # noqa: E402

from mirasol3b import configlib, sharding  # noqa: E402
from mirasol3b.allocator import describe as describe_allocator  # noqa: E402
from mirasol3b.model import Mirasol3B  # noqa: E402
from mirasol3b.train.batches import global_batch, model_batch  # noqa: E402
from mirasol3b.train.optimizer import make_optimizer  # noqa: E402
from mirasol3b.train.random_batches import random_batch  # noqa: E402
from mirasol3b.train.state import abstract_state, create_sharded_state, state_shardings  # noqa: E402
from mirasol3b.train.step import make_train_step  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


# ---- configs ------------------------------------------------------------------------------------

# The peer's README-scale example (issue 7): width 384, depth 2 everywhere, 8 heads; 32 frames of
# 64x64 in 16 snippets of 2 frames, tubes 2x16x16; a 64-mel x 256-frame spectrogram (16 frames a
# snippet), patches 16x16; 32 text tokens over a 256-token vocabulary; 3 latents; batch 8.
PEER_SCALE = dict(
    width=384, depth=2, num_heads=8, head_dim=64, mlp_dim=1536, vocab_size=256,
    num_frames=32, snippet_frames=2, image_size=64, tube_frames=2, patch_size=16,
    n_mels=64, mel_frames=256, patch_mels=16, patch_frames=16,
    text_length=32, text_max_length=64, num_latents=3, batch_size=8,
)


def peer_scale_config(dft: str = "fft", overrides: dict | None = None) -> ml_collections.ConfigDict:
    """Our model at the peer's configuration (see PEER_SCALE).

    The spectrogram: 16 kHz, hop 160 -> 16 frames a snippet = 2560 samples = 0.16 s for 2 frames,
    so fps = 12.5. Heads are 8 x 64, as the peer's: attention is 512 wide inside a width of 384.
    """
    p = PEER_SCALE
    c = configlib.base_config()
    m = c.model
    m.vocab_size = p["vocab_size"]
    m.num_latents = p["num_latents"]
    snippets = p["num_frames"] // p["snippet_frames"]
    mel_per_snippet = p["mel_frames"] // snippets
    hop, rate = 160, 16000
    m.video.update(fps=p["snippet_frames"] * rate / (mel_per_snippet * hop), snippet_frames=p["snippet_frames"],
                   image_size=p["image_size"], tube_frames=p["tube_frames"], patch_size=p["patch_size"])
    m.audio.update(sample_rate=rate, hop_length=hop, n_mels=p["n_mels"], patch_frames=p["patch_frames"],
                   patch_mels=p["patch_mels"], dft=dft)
    for s in configlib.STACKS:
        m[s].update(width=p["width"], depth=p["depth"], num_heads=p["num_heads"], head_dim=p["head_dim"],
                    mlp_dim=p["mlp_dim"])
    m.text_decoder.max_length = p["text_max_length"]
    c.data.update(num_frames=p["num_frames"], text_length=p["text_length"], batch_size=p["batch_size"])
    return configlib.validate(override(c, overrides or {}))


def tiny_config(overrides: dict | None = None, variant: str | None = None) -> ml_collections.ConfigDict:
    """`configs/tiny.py[:variant]` (the tiny-width model), unlocked, with `overrides` ('a.b': value)."""
    from configs import tiny

    c = tiny.get_config(variant)
    return configlib.validate(override(ml_collections.ConfigDict(c.to_dict()), overrides or {}))


def override(c: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
    """Sets `{'a.b': value}` fields of `c` (existing fields only: a typo fails)."""
    for key, value in overrides.items():
        *path, last = key.split(".")
        target = c
        for part in path:
            target = target[part]
        if last not in target:
            raise KeyError(f"config has no field {key!r}")
        target[last] = value
    return c


# ---- the train step -----------------------------------------------------------------------------

class TrainStep:
    """The train step exactly as `mirasol3b.train.loop.train` runs it: sharded state on a mesh of
    this machine's devices, `jax.jit` with in/out shardings and the state donated; compiled ahead
    of time (from the state's shapes and shardings) so its `cost_analysis()` and
    `memory_analysis()` can be read before any parameter exists.

    `devices`: the mesh's devices (default: all of this machine's). `allocate=False` stops after
    the compile: `memory()` then says whether the step fits a device, and `allocate()` creates the
    state later. `step()` runs one step and blocks until it is done; returns seconds.
    """

    def __init__(self, config: ml_collections.ConfigDict, seed: int = 0, *, allocate: bool = True, devices=None):
        self.config, self.seed = config, seed
        self.mesh = sharding.make_mesh(config.mesh_shape, devices)
        self.model = Mirasol3B(config.model)
        self.optimizer = make_optimizer(config.train)
        host = model_batch(random_batch(config, np.random.default_rng(seed), config.data.batch_size), config)
        self.batch = global_batch(host, self.mesh)
        boxed, _ = abstract_state(self.model, self.optimizer, self.batch)
        self.shardings = state_shardings(boxed, self.mesh)
        abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                nn.unbox(boxed), self.shardings)
        self.num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract.params))
        self.rng = jax.random.key(seed + 1)
        self.state = None
        batch_shardings = jax.tree.map(lambda x: x.sharding, self.batch)
        t = time.perf_counter()
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
            jitted = jax.jit(make_train_step(self.model, self.optimizer, config.loss),
                             in_shardings=(self.shardings, batch_shardings, None),
                             out_shardings=(self.shardings, None), donate_argnums=0)
            self.lowered = jitted.lower(abstract, self.batch, self.rng)
            self.compiled = self.lowered.compile()
        self.compile_seconds = time.perf_counter() - t
        if allocate:
            self.allocate()

    def allocate(self) -> None:
        """Creates the sharded train state (params and optimizer state) the step runs on."""
        self.state, shardings = create_sharded_state(self.model, self.optimizer, self.batch, self.mesh,
                                                     jax.random.key(self.seed))
        if shardings != self.shardings:
            raise AssertionError("the created state's shardings differ from the compiled step's")

    def step(self) -> float:
        t = time.perf_counter()
        self.state, metrics = self.compiled(self.state, self.batch, self.rng)
        jax.block_until_ready((self.state, metrics))
        self.last_metrics = metrics
        return time.perf_counter() - t

    def flops(self) -> float:
        """XLA's FLOP count of the compiled step (exact when no layer scan hides a loop body)."""
        return float(self.compiled.cost_analysis()["flops"])

    def memory(self) -> dict[str, int]:
        """The compiled step's memory: arguments + outputs - donated aliases + temporaries."""
        m = self.compiled.memory_analysis()
        peak = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
        return {"peak_bytes": int(peak), "temp_bytes": int(m.temp_size_in_bytes),
                "argument_bytes": int(m.argument_size_in_bytes)}


def jax_matmul_seconds(n: int = 2048, reps: int = 5) -> float:
    """Fastest of `reps` jitted f32 [n, n] @ [n, n] products (2 n^3 FLOPs each)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    mm = jax.jit(jnp.dot)
    mm(a, b).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        mm(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return best


# ---- timing -------------------------------------------------------------------------------------

def alternate(fns: dict[str, Callable[[], float]], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Runs each fn in turn (A B C A B C ...), `warmup` rounds uncounted; each fn returns seconds."""
    times = {k: [] for k in fns}
    for r in range(warmup + rounds):
        for name, fn in fns.items():
            seconds = fn()
            if r >= warmup:
                times[name].append(seconds)
    return times


def median(xs) -> float:
    return float(statistics.median(xs))


def spread(xs) -> str:
    """'median (min-max)' in the unit of xs."""
    return f"{median(xs):.3g} ({min(xs):.3g}-{max(xs):.3g})"


def pair_ratios(a: list[float], b: list[float]) -> list[float]:
    return [x / y for x, y in zip(a, b)]


# ---- the machine and RESULTS.md -----------------------------------------------------------------

def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cpus = len(os.sched_getaffinity(0))
    load = os.getloadavg()[0]
    devices = ", ".join(sorted({d.device_kind for d in jax.devices()}))
    return f"{model}, {cpus} CPUs (load {load:.1f} at start), jax {jax.__version__} on {devices}, {allocator()}"


def allocator() -> str:
    """Which malloc this process (and the peer's worker, which inherits the environment) runs on:
    it matters on CPU (mirasol3b/allocator.py says why)."""
    return describe_allocator(os.environ)


def command_line() -> str:
    """How this benchmark was started (without run_all.py's private --summary file)."""
    script = os.path.relpath(os.path.abspath(sys.argv[0]), ROOT)
    args, skip = [], False
    for a in sys.argv[1:]:
        if skip or a == "--summary":
            skip = not skip
            continue
        if not a.startswith("--summary="):
            args.append(a)
    text = " ".join(["python", shlex.quote(script), *map(shlex.quote, args)])
    return text + (f" (from {os.environ['BENCH_RUNNER']})" if os.environ.get("BENCH_RUNNER") else "")


_HEADER = ("# Benchmark results\n\n"
           "Rows are appended by the scripts in `benchmarks/` (newest last). Ratios are medians of\n"
           "pairs measured side by side in one run; absolute times drift on this shared machine.\n\n"
           "| date (UTC) | benchmark | command | machine | figures |\n"
           "|---|---|---|---|---|\n")


def write_row(benchmark: str, figures: str, machine_text: str, *, path: str = RESULTS) -> None:
    """Appends one row to RESULTS.md (created with its header if missing)."""
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    cell = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    new = not os.path.exists(path)
    with open(path, "a") as f:
        if new:
            f.write(_HEADER)
        f.write(f"| {date} | {cell(benchmark)} | `{cell(command_line())}` | {cell(machine_text)} | "
                f"{cell(figures)} |\n")
    print(f"row written to {os.path.relpath(path, ROOT)}")


def write_summary(path: str | None, benchmark: str, checks: list[dict]) -> None:
    """Appends this benchmark's checks (figure, value, target, met) to a JSON-lines file that
    `run_all.py` turns into one table."""
    if not path:
        return
    import json

    with open(path, "a") as f:
        for c in checks:
            f.write(json.dumps({"benchmark": benchmark, **c}) + "\n")


def check(figure: str, value: str, target: str = "", met: bool | None = None) -> dict:
    return {"figure": figure, "value": value, "target": target, "met": met}


def si(x: float, unit: str = "") -> str:
    for prefix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"


def table(headers: list[str], rows: list[list]) -> str:
    """A plain fixed-width table for the terminal."""
    cols = [[str(h)] + [str(r[i]) for r in rows] for i, h in enumerate(headers)]
    widths = [max(map(len, c)) for c in cols]
    line = lambda cells: "  ".join(str(c).rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])
