"""Training examples per second that one CPU core delivers at the paper's geometry: read the
TFDS records, decode the frames, expand each clip into its questions, shuffle, convert, batch.

    .venv/bin/python benchmarks/input_pipeline.py [--quick] [--questions N] [--batches N] [--no-write]

The dataset is `local_media/base_silence` (128 frames at 6.25 fps, 224 px) built from the clips of
`data_build.py` (`natural_clips.py`) of 30 s and more, so every example fills its 128 frames, each
clip three times (under other names), with 1 question a clip (a classification dataset: every example decodes its clip) and with 3 (the clip's frames are
decoded once for its 3 examples). The input pipeline is `mirasol3b_data.pipeline.make_input_iterator` under `configs/mirasol3b.py`
(batch 8 here; the byte vocabulary), in a process pinned to one core (`sched_setaffinity`) with
TensorFlow's thread pools at one thread. Target: >= 8 examples a second.

How many cores a host needs: the paper config's measured step (benchmarks/README.md, "On a GPU":
0.955 s for batch 16 on one H200 at 40.5% MFU), scaled to a v5p chip by peak bf16 FLOP/s (459
against 989 TFLOP/s; the same MFU assumed), gives the examples a second one chip consumes; a v5p
host has 4 chips.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # before TensorFlow sizes its pools
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
import common  # noqa: E402
import data_build  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

tf.config.threading.set_inter_op_parallelism_threads(1)
tf.config.threading.set_intra_op_parallelism_threads(1)

from configs import mirasol3b  # noqa: E402
from mirasol3b_data import pipeline  # noqa: E402

TARGET = 8.0
H200_STEP_S, H200_BATCH, H200_PEAK, V5P_PEAK, V5P_CHIPS_PER_HOST = 0.955, 16, 989e12, 459e12, 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer batches")
    parser.add_argument("--questions", default="1,3", help="questions a clip, one dataset each")
    parser.add_argument("--batches", type=int, default=30, help="batches timed (after 3 of warm-up)")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--summary", help=argparse.SUPPRESS)
    args = parser.parse_args()
    batches = 6 if args.quick else args.batches
    machine = common.machine()
    # The rendered clips of 30 s and more, three times each: every example fills its 8 snippets.
    clips = [c for c, seconds in zip(data_build.make_clips(), data_build.LENGTHS) if seconds >= 30] * 3

    per_chip = H200_BATCH / H200_STEP_S * V5P_PEAK / H200_PEAK
    figures, checks = [], []
    for questions in map(int, args.questions.split(",")):
        rate, busy, shapes = measure(clips, questions, batches)
        cores = V5P_CHIPS_PER_HOST * per_chip / rate
        print(f"{questions} question(s) a clip; {shapes}\none core: {rate:.1f} examples/s ({busy:.0%} of the core "
              f"busy); a v5p host ({V5P_CHIPS_PER_HOST} chips at ~{per_chip:.1f} examples/s each) needs {cores:.1f} "
              "such cores", flush=True)
        figures.append(f"{questions} question(s) a clip ({shapes.split(' holding ')[1].split(',')[0]}): {rate:.1f} "
                       f"examples/s ({busy:.0%} busy), a v5p host needs {cores:.1f} cores")
        checks.append(common.check(f"examples/s on one core, {questions} question(s) a clip", f"{rate:.1f}",
                                   f">= {TARGET:g}", rate >= TARGET))
    text = (f"base geometry, batch 8, one core: {'; '.join(figures)} (a v5p chip ~{per_chip:.1f} examples/s, scaled "
            "from the H200 step)")
    if not args.no_write:
        common.write_row("input_pipeline", text, machine)
    common.write_summary(args.summary, "input_pipeline", checks)


def measure(clips, questions: int, batches: int) -> tuple[float, float, str]:
    """(examples a second, fraction of the core busy, the batch's shapes) over `batches` batches."""
    with tempfile.TemporaryDirectory(prefix="input_pipeline_") as tmp:
        tmp = Path(tmp)
        builder, _ = data_build.build(data_build.manual_dir(tmp, clips, questions), tmp / "tfds", None)
        config = mirasol3b.get_config()
        with config.unlocked():
            config.data.update(task=f"local_media_{data_build.CONFIG}", tfds_data_dir=str(tmp / "tfds"), vocab_path="",
                               batch_size=8, shuffle_buffer=64)
        it = pipeline.make_input_iterator(config, "train", 0, 1)
        for _ in range(3):
            next(it)
        start, cpu, snippets = time.perf_counter(), time.process_time(), []
        for _ in range(batches):
            batch = next(it)
            snippets.append(batch["media_mask"].sum(1).mean())
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    # Short clips hold fewer snippets (the padding is zeros, not decoded): say how many were real.
    shapes = (f"video {batch['video'].shape} {batch['video'].dtype} holding {np.mean(snippets):.1f} of "
              f"{batch['media_mask'].shape[1]} snippets on average, audio {batch['audio'].shape}")
    return batches * config.data.batch_size / seconds, cpu / seconds, shapes


if __name__ == "__main__":
    main()
