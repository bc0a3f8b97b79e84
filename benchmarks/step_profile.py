"""Where our train step's time goes on this CPU: traces a few steps with `jax.profiler`, reads each
XLA op's time from the trace, and groups it by kind of work and by model part.

    .venv/bin/python benchmarks/step_profile.py [--config peer|tiny] [--scan] [--steps N] [--no-write]

`peer` (the default) is peer_train_step.py's configuration, with the layers unrolled unless
`--scan`. Beside the op times it reports what the profile does not show: the process's CPU time
split into user and system, and the minor page faults a step takes (the compiled step's
temporaries are allocated and freed every step; when the allocator hands them back to the
kernel, every page of them is faulted in and zeroed again on the next step).

Op times are summed over the threads XLA runs them on: independent ops may overlap on the cores,
and a library matmul splits its work over the thread pool, so shares are of the summed op time,
not of the wall step time. Dots XLA runs through Eigen (the weight gradients, whose contraction
runs over the tokens) are left out: the trace ends their event when their work is handed to
the thread pool, so it does not time them; their FLOPs are reported apart.
"""

from __future__ import annotations

import argparse
import collections
import glob
import math
import os
import re
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # a CPU benchmark, also where JAX could find a GPU
import common  # noqa: E402  (puts the repo root on sys.path)

import jax  # noqa: E402

KINDS = ("matmuls", "data movement", "elementwise and reductions", "FFT")
PARTS = ("video_encoder", "audio_encoder", "fusion", "combiner", "time_aligned", "text_decoder")
_PART = re.compile(r"Mirasol3B(?:\.\w+)?/(\w+)/")  # the model's submodule in an op's name
# Ops that only move or rearrange data (a fusion of nothing else is "data movement").
_MOVES = {"parameter", "transpose", "copy", "bitcast", "reshape", "slice", "concatenate", "pad",
          "broadcast", "dynamic-slice", "dynamic-update-slice", "constant", "tuple", "get-tuple-element"}
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\w+)\[([\d,]*)\]\S*\s+([\w\-]+)\((.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")  # unindented, ends with "{"


class HloModule:
    """Just enough of the compiled HLO text to classify a thunk: each instruction's shape, opcode,
    operands, called computations and `op_name`, and each computation's instructions."""

    def __init__(self, text: str):
        self.shape, self.opcode, self.operands, self.calls, self.op_name = {}, {}, {}, {}, {}
        self.entry = None
        self.contracting = {}  # dot -> its lhs contracting dimensions
        self.body = collections.defaultdict(list)
        computation = None
        for line in text.splitlines():
            m = _COMPUTATION.match(line)
            if m:
                computation = m.group(1)
                if line.startswith("ENTRY"):
                    self.entry = computation
                continue
            m = _INSTRUCTION.match(line)
            if not m:
                continue
            name, _, dims, opcode, rest = m.groups()
            self.shape[name] = tuple(int(d) for d in dims.split(",") if d)
            self.opcode[name] = opcode
            self.operands[name] = re.findall(r"%([\w.\-]+)", rest.split(")")[0])
            self.calls[name] = re.findall(r"(?:calls|to_apply)=%?([\w.\-]+)", rest)
            contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest)
            if contracting:
                self.contracting[name] = tuple(int(d) for d in contracting.group(1).split(",") if d)
            meta = re.search(r'op_name="([^"]*)"', rest)
            self.op_name[name] = meta.group(1) if meta else ""
            if computation:
                self.body[computation].append(name)

    def library_dots(self) -> list[str]:
        """Dots XLA runs as their own op through Eigen (not inside a YNNPACK fusion). Their trace
        event ends when the work is handed to the thread pool, so the trace does not time them."""
        fused = {c for n, op in self.opcode.items() if op == "fusion" for c in self.calls.get(n, ())}
        return [n for comp, insts in self.body.items() if comp not in fused
                for n in insts if self.opcode.get(n) == "dot"]

    def instructions(self, name: str) -> list[str]:
        """`name` and, for a fusion or call, every instruction of what it calls (recursively)."""
        out, todo, seen = [name], list(self.calls.get(name, ())), set()
        while todo:
            comp = todo.pop()
            if comp in seen:
                continue
            seen.add(comp)
            for inst in self.body.get(comp, ()):
                out.append(inst)
                todo.extend(self.calls.get(inst, ()))
        return out

    def dot_flops(self, name: str) -> float:
        """2 x output size x contracted size, summed over the dots `name` runs."""
        flops = 0.0
        for inst in self.instructions(name):
            if self.opcode.get(inst) == "dot" and self.operands[inst] and self.operands[inst][0] in self.shape:
                lhs = self.shape[self.operands[inst][0]]
                contracted = math.prod(lhs[d] for d in self.contracting.get(inst, ()))
                flops += 2.0 * math.prod(self.shape[inst]) * contracted
        return flops

    def kind(self, name: str) -> str:
        inside = self.instructions(name)
        ops = {self.opcode.get(i, "") for i in (inside[1:] if len(inside) > 1 else inside)}
        if ops & {"dot", "convolution"} or name.startswith(("ynn_fusion", "xnn_fusion", "onednn")):
            return "matmuls"
        if "fft" in ops:
            return "FFT"
        if ops <= _MOVES or name.startswith("wrapped_broadcast"):
            return "data movement"
        return "elementwise and reductions"

    def part(self, name: str) -> tuple[str, str]:
        """(model part or 'loss and optimizer', 'forward' | 'backward' | 'update')."""
        op_name = self.op_name.get(name, "")
        if not op_name:  # a fusion's metadata sits on its root
            for inst in self.instructions(name)[1:]:
                if self.op_name.get(inst):
                    op_name = self.op_name[inst]
                    break
        m = _PART.search(op_name)
        part = m.group(1) if m else "loss and optimizer"
        if "transpose(" in op_name:
            direction = "backward"
        elif "jvp(" in op_name or part != "loss and optimizer":
            direction = "forward"
        else:
            direction = "update"
        return part, direction


def op_seconds(trace_dir: str, steps: int) -> dict[str, float]:
    """Seconds per step of each XLA op (thunk) in the trace, summed over threads."""
    try:
        from tensorflow.tsl.profiler.protobuf import xplane_pb2
    except ImportError as e:  # TensorFlow comes with seqio, a dependency of this package
        raise SystemExit(f"reading the trace needs TensorFlow's xplane proto ({e}); run `make install`")
    files = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    if not files:
        raise SystemExit(f"jax.profiler wrote no *.xplane.pb under {trace_dir}")
    space = xplane_pb2.XSpace()
    with open(files[0], "rb") as f:
        space.ParseFromString(f.read())
    seconds = collections.Counter()
    for plane in space.planes:
        names = {k: v.name for k, v in plane.event_metadata.items()}
        for line in plane.lines:
            if not line.name.startswith("tf_XLAEigen"):  # XLA's CPU worker threads
                continue
            for event in line.events:
                name = names.get(event.metadata_id, "")
                if name and not name.startswith(("ThunkExecutor", "SlinkyThreadPool", "end:")):
                    seconds[name] += event.duration_ps * 1e-12 / steps
    return dict(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=("peer", "tiny"), default="peer")
    parser.add_argument("--scan", action="store_true", help="scan the layers (model.scan_layers=True)")
    parser.add_argument("--steps", type=int, default=3, help="steps traced (after 2 warm-up steps)")
    parser.add_argument("--top", type=int, default=12, help="slowest ops listed")
    parser.add_argument("--quick", action="store_true", help="one traced step")
    parser.add_argument("--no-write", action="store_true", help="do not append to RESULTS.md")
    parser.add_argument("--summary", help="append the figures as JSON lines here (run_all.py)")
    args = parser.parse_args()
    if args.quick:
        args.steps = 1

    overrides = {"model.scan_layers": args.scan}
    config = (common.peer_scale_config("fft", overrides) if args.config == "peer"
              else common.tiny_config(overrides))
    machine = common.machine()
    print(f"machine: {machine}", flush=True)
    step = common.TrainStep(config)
    for _ in range(2):
        step.step()

    usage0, times0, wall = resource.getrusage(resource.RUSAGE_SELF), os.times(), time.perf_counter()
    walls = [step.step() for _ in range(args.steps)]
    usage1, times1 = resource.getrusage(resource.RUSAGE_SELF), os.times()
    wall = time.perf_counter() - wall
    user = (times1.user - times0.user) / args.steps
    system = (times1.system - times0.system) / args.steps
    faults = (usage1.ru_minflt - usage0.ru_minflt) / args.steps
    temp = step.memory()["temp_bytes"]

    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        for _ in range(args.steps):
            step.step()
        jax.profiler.stop_trace()
        seconds = op_seconds(trace_dir, args.steps)

    hlo = HloModule(step.compiled.as_text())
    untimed = set(hlo.library_dots())
    untimed_flops = sum(hlo.dot_flops(n) for n in untimed)
    known = {k: v for k, v in seconds.items() if k in hlo.opcode and k not in untimed}
    total = sum(known.values())
    by_kind, flops_by_kind = collections.Counter(), collections.Counter()
    by_part = collections.defaultdict(collections.Counter)
    for name, s in known.items():
        kind = hlo.kind(name)
        by_kind[kind] += s
        flops_by_kind[kind] += hlo.dot_flops(name)
        part, direction = hlo.part(name)
        by_part[part][direction] += s

    step_flops = step.flops()
    print(f"\n{args.config} config, layers {'scanned' if args.scan else 'unrolled'}, batch "
          f"{config.data.batch_size}; {args.steps} steps traced")
    print(f"wall {common.median(walls):.3f} s/step (untraced); CPU {user + system:.3f} s/step on "
          f"{len(os.sched_getaffinity(0))} cores = user {user:.3f} + system {system:.3f}; "
          f"{faults:,.0f} minor page faults/step ({faults * resource.getpagesize() / 2**20:,.0f} MiB of pages); "
          f"the step's temporaries are {temp / 2**20:,.0f} MiB")
    print(f"summed op time {total:.3f} s/step; XLA's FLOPs {common.si(step_flops, 'FLOP')}/step\n")
    rows = []
    for kind in KINDS:
        s = by_kind.get(kind, 0.0)
        rate = common.si(flops_by_kind[kind] / s, "FLOP/s") if flops_by_kind[kind] and s else ""
        rows.append([kind, f"{s * 1e3:.0f}", f"{s / total:.0%}" if total else "-",
                     common.si(flops_by_kind[kind], "FLOP") if flops_by_kind[kind] else "", rate])
    print(common.table(["kind of op", "ms/step", "share", "dot FLOPs", "per op-second"], rows))
    if untimed:
        print(f"not in the table: {len(untimed)} dots run through Eigen ({common.si(untimed_flops, 'FLOP')}/step, "
              "the weight gradients): the trace does not time them (their work runs in the thread pool after "
              "their event ends), so part of the gap between the op time and the CPU time is theirs")
    print()
    rows = [[part, *(f"{by_part[part][d] * 1e3:.0f}" for d in ("forward", "backward", "update")),
             f"{sum(by_part[part].values()) / total:.0%}"]
            for part in sorted(by_part, key=lambda p: PARTS.index(p) if p in PARTS else len(PARTS))]
    print(common.table(["model part", "forward ms", "backward ms", "update ms", "share"], rows))
    print(f"\nslowest {args.top} ops:")
    for name, s in sorted(known.items(), key=lambda kv: -kv[1])[:args.top]:
        part, direction = hlo.part(name)
        flops = hlo.dot_flops(name)
        rate = f", {common.si(flops / s, 'FLOP/s')}" if flops else ""
        print(f"  {s * 1e3:6.1f} ms  {name:28s} {hlo.kind(name):27s} {part} {direction}, "
              f"{'x'.join(map(str, hlo.shape[name]))}{rate}")

    matmul = by_kind.get("matmuls", 0.0)
    matmul_rate = flops_by_kind["matmuls"] / matmul if matmul else 0.0
    common.write_summary(args.summary, "step_profile", [
        common.check("our step's op time in matmuls", f"{matmul / total:.0%}" if total else "-"),
        common.check("our matmuls' FLOP/s per op-second", common.si(matmul_rate, "FLOP/s")),
        common.check("system CPU per step (page faults)", f"{system:.2f} s ({faults:,.0f} faults)")])
    if not args.no_write:
        shares = ", ".join(f"{k} {by_kind.get(k, 0) / total:.0%}" for k in KINDS if by_kind.get(k))
        figures = [f"{args.config} config, {'scanned' if args.scan else 'unrolled'} layers, batch "
                   f"{config.data.batch_size}", f"wall {common.median(walls):.3f} s/step",
                   f"CPU user {user:.2f} + system {system:.2f} s/step, {faults:,.0f} page faults/step "
                   f"(temporaries {temp / 2**20:,.0f} MiB)",
                   f"op time {total:.3f} s/step: {shares}",
                   f"matmuls {common.si(flops_by_kind['matmuls'], 'FLOP')} at "
                   f"{common.si(matmul_rate, 'FLOP/s')} per op-second"]
        common.write_row("step_profile", "; ".join(figures), machine)


if __name__ == "__main__":
    main()
