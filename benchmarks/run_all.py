"""`make bench`: runs the CPU benchmarks one after another, each in its own process, then prints one
table of every figure with its target.

    .venv/bin/python benchmarks/run_all.py [--quick] [--no-write] [--allocator auto|jemalloc|system]

1. peer_train_step.py (creates the peer's venv on first use), 2. video_length.py, 3. decode.py,
4. streaming.py, then step_profile.py: where our step's time goes (part 1 of the benchmarks issue asks for it while
its targets are not met), then the data benchmarks data_build.py and input_pipeline.py.
Each prints its own tables and appends its row to benchmarks/RESULTS.md. accelerator.py is not
run here: it needs a GPU or TPU.

The benchmarks run on jemalloc when this machine has it (`--allocator auto`, the default): glibc
hands freed buffers over 32 MiB back to the kernel, so XLA's per-step temporaries are page-faulted
and zeroed again every step, a cost that swings with the neighbours' load on a shared machine
(benchmarks/README.md, "The allocator"; mirasol3b/allocator.py). Both sides of every comparison get
the same allocator. The data benchmarks run on the system malloc whatever `--allocator` says: what
the input pipeline runs on in training (launch/tpu_run.sh preloads nothing), and jemalloc with its
decay off made the one-core input pipeline slower here (7.7-12.1 examples/s against 13.6-13.9: it
allocates a fresh 19 MB clip per example).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the repo's mirasol3b, also when not installed
from mirasol3b.allocator import CHOICES, allocator_env  # noqa: E402  (no jax import)

BENCHMARKS = ("peer_train_step.py", "video_length.py", "decode.py", "streaming.py", "step_profile.py",
              "data_build.py", "input_pipeline.py")
SYSTEM_MALLOC = ("data_build.py", "input_pipeline.py")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="pass --quick to every benchmark")
    parser.add_argument("--no-write", action="store_true", help="do not append to RESULTS.md")
    parser.add_argument("--allocator", choices=CHOICES, default="auto",
                        help="malloc for the benchmarks: jemalloc if found (auto), jemalloc or fail, glibc's")
    args = parser.parse_args()
    extra = (["--quick"] if args.quick else []) + (["--no-write"] if args.no_write else [])
    env, said = allocator_env(args.allocator, dict(os.environ, BENCH_RUNNER="make bench"))
    system_env, _ = allocator_env("system", dict(os.environ, BENCH_RUNNER="make bench"))
    print(said + f"; {', '.join(SYSTEM_MALLOC)} on the system malloc", flush=True)

    start = time.perf_counter()
    failed, walls = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        summary = os.path.join(tmp, "summary.jsonl")
        for script in BENCHMARKS:
            print(f"\n==== {script} " + "=" * max(0, 70 - len(script)), flush=True)
            t = time.perf_counter()
            code = subprocess.call([sys.executable, os.path.join(HERE, script), "--summary", summary, *extra],
                                   env=system_env if script in SYSTEM_MALLOC else env)
            walls[script] = time.perf_counter() - t
            if code:
                failed.append(f"{script} (exit {code})")
        checks = []
        if os.path.exists(summary):
            with open(summary) as f:
                checks = [json.loads(line) for line in f]

    total = time.perf_counter() - start
    print("\n==== summary " + "=" * 66)
    headers = ["benchmark", "figure", "value", "target", ""]
    rows = [[c["benchmark"], c["figure"], c["value"], c["target"],
             "" if c["met"] is None else ("met" if c["met"] else "NOT met")] for c in checks]
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    for r in [headers, ["-" * w for w in widths], *rows]:
        print("  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip())
    print("wall: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in walls.items()) + f"; total {total / 60:.1f} min")
    if failed:
        print("FAILED: " + ", ".join(failed))
        sys.exit(1)


if __name__ == "__main__":
    main()
