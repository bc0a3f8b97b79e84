"""Model FLOPs utilisation and tokens/s of the paper-width model in bf16 on one GPU or TPU.

    .venv/bin/python benchmarks/accelerator.py [--config configs/mirasol3b.py[:ttm]] [--max-batch B]
        [--remat POLICY] [--set model.attention_impl=xla ...] [--steps N]

On a machine without an accelerator it says so and exits 0 (nothing to measure).

- Model: `configs/mirasol3b.py` (width 2048, bf16 compute, f32 params and AdamW state, scanned
  layers) on a mesh of one device, attention as `model.attention_impl` says ("auto": cuDNN's fused
  kernel on an NVIDIA GPU). `--remat` (default dots_with_no_batch_dims_saveable: one device holds
  a small batch, so the projections' outputs can be kept; the config's nothing_saveable is sized
  for pod-scale batches). The batch is the largest power of two (from --max-batch down) whose
  compiled step fits the device's memory by `memory_analysis()` (each candidate compiled once,
  from shapes); if not even one clip fits, every stack's depth is halved until it does (the
  widths stay the paper's), and the table says so.
- MFU = model FLOPs / step time / the device's peak dense bf16 FLOP/s. Model FLOPs are the
  analytic matmul count of `mirasol3b.summary` (3 x forward: what remat recomputes is not model
  work). The peak comes from the vendor's table for the device kind (--peak-tflops overrides); a
  large bf16 matmul is measured beside it.
- tokens/s: text tokens (batch x text length) and media tokens (video tubes + audio patches).

Target: MFU >= 40% (met on an H200: benchmarks/README.md "On a GPU"). `--allow-cpu` runs the
same code on the CPU (a test of this script, against the measured f32 matmul peak there).
"""

from __future__ import annotations

import argparse
import ast
import copy
import importlib.util
import os
import re
import sys
import time

# JAX preallocates 75% of a GPU's memory by default; the batch search sizes against what JAX may
# take, and the paper model at batch 16 needs ~111 GiB of an H200's 139.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402

from mirasol3b import configlib, summary  # noqa: E402
from mirasol3b.layers.attention import resolve_implementation  # noqa: E402
from mirasol3b.layers.spec import REMAT_POLICIES  # noqa: E402
from mirasol3b.model import stack_spec  # noqa: E402

TARGET = 0.40
# One device holds the whole batch, so memory allows saving every projection's output for the
# backward pass (batch 16 on an H200); the config's nothing_saveable is sized for pod-scale batches.
ONE_DEVICE_REMAT = "dots_with_no_batch_dims_saveable"
# Dense bf16 peak FLOP/s by device kind (vendor figures, no sparsity): the first name found in
# `device_kind` as whole words wins ("L4" is not found in "L40", nor "H100" in "GH200"), so a
# variant comes before its family. A kind not listed falls back to the measured matmul.
PEAK_BF16 = (
    ("H200 NVL", 835e12), ("GH200", 989e12), ("H200", 989e12), ("H100 NVL", 835e12), ("H100 PCIe", 756e12),
    ("H100", 989e12), ("GB200", 2500e12), ("B200", 2250e12), ("A100", 312e12), ("L40S", 362e12),
    ("L40", 181e12), ("L4", 121e12), ("A10", 125e12),
    ("TPU v6 lite", 918e12), ("TPU v6e", 918e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12),
    ("TPU v5p", 459e12), ("TPU v5", 459e12), ("TPU v4 lite", 138e12), ("TPU v4", 275e12),
)


def load_config(path: str) -> ml_collections.ConfigDict:
    """`configs/x.py` or `configs/x.py:variant`, unlocked."""
    path, _, arg = path.partition(":")
    spec = importlib.util.spec_from_file_location("bench_config", os.path.join(common.ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return ml_collections.ConfigDict(module.get_config(arg or None).to_dict())


def one_device(config, batch: int, depth_divisor: int = 1) -> ml_collections.ConfigDict:
    c = copy.deepcopy(config)
    c.mesh_shape = (1, 1, 1)
    c.data.batch_size = batch
    for s in configlib.STACKS:
        c.model[s].depth = max(1, c.model[s].depth // depth_divisor)
    return configlib.validate(c)


def device_memory(device) -> int | None:
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001 - some backends do not report
        stats = {}
    return stats.get("bytes_limit")


def choose(config, max_batch: int, limit: int | None, quick: bool):
    """(compiled step that fits, note): the largest batch, then the deepest model, whose compiled
    step fits the device. Each candidate is compiled once, from shapes; only the one chosen
    allocates its state."""
    batches = [b for b in (2 ** i for i in range(12, -1, -1)) if b <= max_batch]
    for divisor in (1, 2, 4, 8, 16, 32):
        for b in batches:
            step = common.TrainStep(one_device(config, b, divisor), allocate=False, devices=jax.devices()[:1])
            peak = step.memory()["peak_bytes"]
            fits = limit is None or peak <= 0.92 * limit
            print(f"  batch {b:4d}, depths /{divisor}: compiled in {step.compile_seconds:.0f} s, peak "
                  f"{peak / 2**30:.1f} GiB{'' if limit is None else f' of {limit / 2**30:.1f} GiB'} -> "
                  f"{'fits' if fits else 'too big'}", flush=True)
            if fits:
                note = "the config's depths" if divisor == 1 else f"depths / {divisor} (the config's do not fit)"
                return step, note
            del step
            if quick:
                break
    raise SystemExit("not even one clip of the shallowest model fits this device")


def parse_overrides(pairs: list[str]) -> dict:
    """`['model.attention_impl=xla', 'data.text_length=32']` -> {'a.b': value}; values are
    Python literals where they parse as one, else strings."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set expects key=value, got {pair!r}")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def peak_flops(device, dtype) -> tuple[float | None, str]:
    kind = device.device_kind
    for key, value in PEAK_BF16:
        if re.search(rf"(?<!\w){re.escape(key)}(?!\w)", kind, re.IGNORECASE):
            return value, f"vendor dense bf16 peak for {key}"
    return None, f"unknown device kind {kind!r}"


def matmul_rate(dtype, n: int) -> float:
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    mm = jax.jit(jnp.dot)
    mm(a, b).block_until_ready()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        mm(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/mirasol3b.py")
    parser.add_argument("--max-batch", type=int, default=32, help="the largest batch tried (then halved)")
    parser.add_argument("--remat", default=ONE_DEVICE_REMAT, choices=sorted(REMAT_POLICIES),
                        help="model.remat_policy for this run (see the module docstring)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. model.attention_impl=xla")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="the device's peak, if not in the table")
    parser.add_argument("--allow-cpu", action="store_true", help="run on the CPU anyway (tests this script)")
    parser.add_argument("--quick", action="store_true", help="3 timed steps")
    parser.add_argument("--no-write", action="store_true", help="do not append to RESULTS.md")
    parser.add_argument("--summary", help="append the checks as JSON lines here (run_all.py)")
    args = parser.parse_args()

    backend = jax.default_backend()
    device = jax.devices()[0]
    if backend == "cpu" and not args.allow_cpu:
        kinds = ", ".join(sorted({d.device_kind for d in jax.devices()}))
        print(f"no accelerator here (JAX backend {backend!r}: {kinds}); this benchmark needs a GPU or TPU, "
              "so there is nothing to measure. Exiting.")
        return
    machine = common.machine()
    print(f"machine: {machine}; device 0: {device.device_kind}", flush=True)

    base = load_config(args.config)
    base.model.remat_policy = args.remat
    base = common.override(base, parse_overrides(args.set))
    if backend == "cpu":
        base.model.dtype = "float32"  # bf16 matmuls are emulated on the CPU
    limit = device_memory(device)
    print(f"choosing the batch (device memory {'unknown' if limit is None else f'{limit / 2**30:.1f} GiB'}):",
          flush=True)
    step, note = choose(base, args.max_batch, limit, args.quick)
    config, peak_bytes = step.config, step.memory()["peak_bytes"]
    batch = config.data.batch_size
    step.allocate()
    print(f"{step.num_params:,} params, batch {batch} ({note})", flush=True)
    steps = 3 if args.quick else args.steps
    for _ in range(2):
        step.step()
    t = time.perf_counter()
    for _ in range(steps):
        step.state, metrics = step.compiled(step.state, step.batch, step.rng)
    jax.block_until_ready((step.state, metrics))
    seconds = (time.perf_counter() - t) / steps

    flops = summary.analytic_flops(config, batch)["total"]
    model_flops = 3 * flops["forward"]
    dtype = jnp.dtype(config.model.dtype)
    measured = matmul_rate(dtype, 8192 if backend != "cpu" else 2048)
    if args.peak_tflops:
        peak, source = args.peak_tflops * 1e12, "--peak-tflops"
    elif backend == "cpu":
        peak, source = measured, f"measured {dtype.name} matmul (CPU test run)"
    else:
        peak, source = peak_flops(device, dtype)
        if peak is None:
            peak, source = measured, source + "; using the measured bf16 matmul instead"
    sizes = summary.sequence_sizes(config)
    text_tps = batch * sizes["text_length"] / seconds
    media_tps = batch * sizes["snippets"] * sizes["combiner_inputs"] / seconds
    mfu = model_flops / seconds / peak
    m = config.model
    attention = "/".join(sorted({resolve_implementation(m.attention_impl, m.dtype, m.dropout_rate,
                                                        stack_spec(m, s).heads_dim) for s in configlib.STACKS}))
    setup = (f"{m.combiner} Combiner, remat {m.remat_policy}, attention {m.attention_impl}"
             + (f" -> {attention}" if attention != m.attention_impl else "")
             + f", compute {m.dtype}, params {m.param_dtype}")

    print()
    print(common.table(["device", "params", "batch", "s/step", "model FLOP/step", "achieved", "peak", "MFU",
                        "text tok/s", "media tok/s"],
                       [[device.device_kind, f"{step.num_params / 1e9:.2f} B", batch, f"{seconds:.3f}",
                         common.si(model_flops, "FLOP"), common.si(model_flops / seconds, "FLOP/s"),
                         common.si(peak, "FLOP/s"), f"{mfu:.1%}", f"{text_tps:,.0f}", f"{media_tps:,.0f}"]]))
    print(f"peak: {source}; measured {dtype.name} matmul {common.si(measured, 'FLOP/s')}; "
          f"compiled peak memory {peak_bytes / 2**30:.1f} GiB; {note}; {setup}")
    print(f"target: MFU >= {TARGET:.0%}: {'met' if mfu >= TARGET else 'NOT met'}")
    checks = [common.check(f"MFU on {device.device_kind} (batch {batch}, {note})", f"{mfu:.1%}",
                           f">= {TARGET:.0%}", mfu >= TARGET),
              common.check("tokens/s (text, media)", f"{text_tps:,.0f}, {media_tps:,.0f}")]
    if not args.no_write:
        common.write_row("accelerator", f"{device.device_kind}, {step.num_params / 1e9:.2f} B params, batch {batch} "
                         f"({note}; {setup}), {seconds:.3f} s/step, MFU {mfu:.1%} of {common.si(peak, 'FLOP/s')} ({source}), "
                         f"text {text_tps:,.0f} tok/s, media {media_tps:,.0f} tok/s", machine)
    common.write_summary(args.summary, "accelerator", checks)


if __name__ == "__main__":
    main()
