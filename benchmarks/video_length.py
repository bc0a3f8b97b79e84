"""Train-step time and compiled peak memory of the tiny-width model against video length.

    .venv/bin/python benchmarks/video_length.py [--quick] [--rounds N] [--batch B]

`configs/tiny.py` at 32, 64, 128, 256 and 512 frames with its snippet length fixed (2 frames), so
a longer clip only adds snippets; for both Combiners (`model.combiner` = transformer | ttm). The
time-aligned model attends over a window of `--window` snippets (`model.time_aligned.window`,
default 16 = 32 frames; 0 = every earlier snippet, whose attention grows with the square of the length).
The latent loss's negatives are the other clips at the same snippet (`--latent-negatives examples`,
the library default): `configs/tiny.py`'s "snippets" scores (batch x snippets)^2 pairs, a loss
choice whose cost grows with the square of the length (at batch 8 it makes 512 frames 4.3x the
FLOPs of 128 instead of 3.9x).
Every length's step is compiled once, then the steps are timed in turn (32, 64, ..., 512, 32, ...)
so that all lengths see the same machine; a length's time relative to 128 frames is the median of
the per-round ratios (each round's two steps ran seconds apart), as every benchmark here pairs
what it compares. Twelve rounds: on the 2-core AMD machine one round's 512/128 ratio ranged
3.7-4.6x for the TTM (and 3.1-4.3x for the Transformer) within one run, so six rounds' median
moved by more than the target's margin from run to run. Memory is the compiled step's
`memory_analysis()`: arguments + outputs - donated aliases + temporaries.

Target: 512 frames costs at most 4.5x of 128 frames in time and in memory (linear is 4x), with
the same parameter count at every length.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # a CPU benchmark, also where JAX could find a GPU
import common  # noqa: E402

from mirasol3b.losses import LATENT_NEGATIVES  # noqa: E402

FRAMES = (32, 64, 128, 256, 512)
COMBINERS = ("transformer", "ttm")
TARGET = 4.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="32, 128 and 512 frames only, one timed round")
    parser.add_argument("--rounds", type=int, default=12,
                        help="timed rounds; one round runs every length once (~5 s at batch 8)")
    parser.add_argument("--batch", type=int, default=8, help="clips per step (tiny.py trains with 32)")
    parser.add_argument("--window", type=int, default=16, help="model.time_aligned.window (0: full attention)")
    parser.add_argument("--latent-negatives", default="examples", choices=LATENT_NEGATIVES,
                        help="loss.latent_negatives (snippets: quadratic in length, see above)")
    parser.add_argument("--no-write", action="store_true", help="do not append to RESULTS.md")
    parser.add_argument("--summary", help="append the checks as JSON lines here (run_all.py)")
    args = parser.parse_args()
    frames = (32, 128, 512) if args.quick else FRAMES
    rounds = 1 if args.quick else args.rounds
    machine = common.machine()
    print(f"machine: {machine}", flush=True)

    steps = {}
    for combiner in COMBINERS:
        for n in frames:
            # Scanned: with scan_layers=False (tiny.py's CPU choice) the TTM also unrolls its snippets,
            # and 256 unrolled snippets take many minutes to compile.
            cfg = common.tiny_config({"data.num_frames": n, "model.scan_layers": True,
                                      "data.batch_size": args.batch, "model.time_aligned.window": args.window,
                                      "loss.latent_negatives": args.latent_negatives},
                                     variant="ttm" if combiner == "ttm" else None)
            steps[combiner, n] = step = common.TrainStep(cfg)
            print(f"{combiner:>11} {n:4d} frames ({n // cfg.model.video.snippet_frames} snippets): "
                  f"{step.num_params:,} params, compiled in {step.compile_seconds:.0f} s", flush=True)
    times = common.alternate({k: s.step for k, s in steps.items()}, rounds=rounds, warmup=1)

    rows, figures, verdicts, checks = [], [], [], []
    for combiner in COMBINERS:
        base = steps[combiner, 128]
        base_mem = base.memory()["peak_bytes"]
        rel = {n: common.pair_ratios(times[combiner, n], times[combiner, 128]) for n in frames}
        params = {steps[combiner, n].num_params for n in frames}
        for n in frames:
            s = steps[combiner, n]
            t, mem = common.median(times[combiner, n]), s.memory()
            rows.append([combiner, n, n // s.config.model.video.snippet_frames, f"{s.num_params:,}",
                         f"{t * 1e3:.0f}", f"{common.median(rel[n]):.2f}", f"{mem['peak_bytes'] / 2**20:.1f}",
                         f"{mem['peak_bytes'] / base_mem:.2f}"])
        t512 = common.median(rel[512])
        of_medians = common.median(times[combiner, 512]) / common.median(times[combiner, 128])
        t512_range = f"rounds {min(rel[512]):.2f}-{max(rel[512]):.2f}, ratio of medians {of_medians:.2f}x"
        m512 = steps[combiner, 512].memory()["peak_bytes"] / base_mem
        ok = t512 <= TARGET and m512 <= TARGET and len(params) == 1
        checks += [
            common.check(f"{combiner}: step time 512 / 128 frames", f"{t512:.2f}x ({t512_range})", f"<= {TARGET}x",
                         t512 <= TARGET),
            common.check(f"{combiner}: peak memory 512 / 128 frames", f"{m512:.2f}x", f"<= {TARGET}x", m512 <= TARGET),
            common.check(f"{combiner}: parameters at every length", ", ".join(f"{p:,}" for p in sorted(params)),
                         "identical", len(params) == 1)]
        verdicts.append(f"{combiner}: 512/128 frames time {t512:.2f}x ({t512_range}), memory {m512:.2f}x, params "
                        f"{'identical' if len(params) == 1 else 'DIFFER: ' + str(sorted(params))} -> "
                        f"{'met' if ok else 'NOT met'}")
        per_length = ", ".join(f"{n}f {common.median(times[combiner, n]) * 1e3:.0f} ms/"
                               f"{steps[combiner, n].memory()['peak_bytes'] / 2**20:.0f} MiB" for n in frames)
        figures.append(f"{combiner}: {per_length}; 512/128 time {t512:.2f}x ({t512_range}), memory {m512:.2f}x; "
                       f"params "
                       f"{min(params):,}" + ("" if len(params) == 1 else " (DIFFER)"))
    print()
    print(f"tiny model (scanned layers), batch {args.batch}, f32, snippets of 2 frames, time-aligned window "
          f"{args.window}, latent negatives {args.latent_negatives}; "
          f"{rounds} timed rounds after 1 warm-up "
          "(median; x128 = relative to 128 frames, median of the rounds' ratios)")
    print(common.table(["combiner", "frames", "snippets", "params", "ms/step", "x128", "peak MiB", "x128"], rows))
    print(f"target: 512 frames <= {TARGET}x of 128 frames in time and memory, same parameters")
    for v in verdicts:
        print("  " + v)
    if not args.no_write:
        common.write_row("video_length", f"batch {args.batch}, window {args.window}, latent negatives "
                         f"{args.latent_negatives}; " + "; ".join(figures), machine)
    common.write_summary(args.summary, "video_length", checks)


if __name__ == "__main__":
    main()
