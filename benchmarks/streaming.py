"""Streaming: the cost of one push, and the size of the state, as a stream grows; answering from the
stream against re-encoding the whole prefix.

    .venv/bin/python benchmarks/streaming.py [--quick] [--rounds N]

Two models, each as the bounded streaming setting (`model.time_aligned.window` 4, the decoder reading
the last 4 real snippets and the TTM memory) and as the paper's (window 0, the decoder reading every
snippet): `tiny` (configs/tiny.py:ttm) and `mid` (the peer-scale model of peer_train_step.py: width
384, 64x64 frames, with the TTM Combiner). Batch 1, f32, random weights and media.

- push at N: the time of one `Stream.push` (encoders and Combiner on the snippet, the time-aligned
  model against the cached keys and values) from the state after N snippets, and that state's
  bytes. The states at every N are kept, and pushes from each are timed in turns (A B C D A B C D
  ...): the ratios are of pairs measured side by side.
- answer at 256: asking from the stream (the decoder's media from the state, then generation of 8
  tokens) against what a model without a stream does for each question: encode the 256-snippet
  prefix, then generate.

Targets (bounded setting): a push at 1024 costs at most 1.2x a push at 16, in time and in state
bytes; answering at 256 is at least 20x faster than re-encoding the prefix.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # a CPU benchmark, also where JAX could find a GPU
import common  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from mirasol3b import decoding  # noqa: E402
from mirasol3b.model import Mirasol3B, samples_per_snippet  # noqa: E402
from mirasol3b.streaming import Stream, prompt_row  # noqa: E402

SIZES = (16, 64, 256, 1024)
ANSWER_AT = 256
NEW_TOKENS = 8
PUSH_RATIO_TARGET = 1.2
ANSWER_TARGET = 20.0
SETTINGS = {"bounded": {"model.time_aligned.window": 4, "model.text_decoder.context": "recent",
                        "model.text_decoder.recent_snippets": 4, "model.text_decoder.read_memory": True},
            "window 0": {"model.time_aligned.window": 0, "model.text_decoder.context": "all",
                         "model.text_decoder.read_memory": False}}


def model_config(name: str, setting: str):
    # Scanned layers and snippets: configs/tiny.py unrolls them (faster on CPU at 4 snippets), and the
    # re-encoding baseline would then compile 256 TTM steps one by one.
    overrides = dict(SETTINGS[setting], **{"model.combiner": "ttm", "model.combiner_readout": "joint",
                                           "model.scan_layers": True})
    if name == "tiny":
        return common.tiny_config(overrides, "ttm=True")
    return common.peer_scale_config("fft", overrides)


def snippet(config, rng):
    frames, size = config.model.video.snippet_frames, config.model.video.image_size
    return (rng.integers(0, 256, (1, frames, size, size, 3), dtype=np.uint8),
            rng.uniform(-0.5, 0.5, (1, samples_per_snippet(config.model))).astype(np.float32))


def measure(name: str, setting: str, sizes, rounds: int, answer: bool) -> dict:
    config = model_config(name, setting)
    model = Mirasol3B(config.model)
    rng = np.random.default_rng(0)
    video, audio = snippet(config, rng)
    mask = np.ones((1, 1), bool)
    params = jax.jit(lambda r: model.init(r, {"video": video, "audio": audio, "media_mask": mask,
                                             "text_inputs": np.zeros((1, 4), np.int32)})["params"])(jax.random.key(0))
    stream = Stream(model, params, capacity=16)
    states, fill_s = {}, 0.0
    t = time.perf_counter()
    for n in range(1, max(sizes) + 1):
        stream.push(video, audio)
        if n in sizes:
            states[n] = stream.state
    fill_s = time.perf_counter() - t
    print(f"{name} {setting}: {max(sizes)} snippets pushed in {fill_s:.1f} s", flush=True)
    valid = np.ones((1,), bool)

    def push_from(state):
        def run() -> float:
            begin = time.perf_counter()
            jax.block_until_ready(stream._push(params, state, video, audio, valid))
            return time.perf_counter() - begin
        return run

    for state in states.values():  # compile each state's shapes before timing
        push_from(state)()
    times = common.alternate({n: push_from(s) for n, s in states.items()}, rounds=rounds, warmup=1)
    out = {"push_ms": {n: common.median(times[n]) * 1e3 for n in sizes},
           "push_ratio": common.pair_ratios(times[max(sizes)], times[min(sizes)]),
           "bytes": {n: states[n].nbytes for n in sizes}, "fill_s": fill_s}
    if answer and ANSWER_AT in states:
        out.update(answer_vs_reencode(config, model, params, stream, states[ANSWER_AT], rng, rounds))
    return out


def answer_vs_reencode(config, model, params, stream, state, rng, rounds) -> dict:
    frames, samples = config.model.video.snippet_frames, samples_per_snippet(config.model)
    prompts, lengths = prompt_row(list(b"what colour was the first shape?"), config.data.text_length, 0, 0)
    dc = decoding.DecodeConfig(max_new_tokens=NEW_TOKENS, eos_id=-1)  # every answer is 8 tokens
    from_stream = decoding.make_generate_fn(model, dc, encoded=True)
    from_media = decoding.make_generate_fn(model, dc)
    prefix = {"video": rng.integers(0, 256, (1, ANSWER_AT * frames) + (config.model.video.image_size,) * 2 + (3,),
                                    dtype=np.uint8),
              "audio": rng.uniform(-0.5, 0.5, (1, ANSWER_AT * samples)).astype(np.float32),
              "media_mask": np.ones((1, ANSWER_AT), bool), "prompts": prompts, "prompt_lengths": lengths}

    def streamed() -> float:
        begin = time.perf_counter()
        media, media_mask = stream._media(params, state)
        jax.block_until_ready(from_stream(params, {"media": media, "media_token_mask": media_mask,
                                                   "prompts": prompts, "prompt_lengths": lengths}, jax.random.key(0)))
        return time.perf_counter() - begin

    def reencoded() -> float:
        begin = time.perf_counter()
        jax.block_until_ready(from_media(params, prefix, jax.random.key(0)))
        return time.perf_counter() - begin

    times = common.alternate({"stream": streamed, "re-encode": reencoded}, rounds=rounds, warmup=1)
    return {"answer_ms": common.median(times["stream"]) * 1e3, "reencode_ms": common.median(times["re-encode"]) * 1e3,
            "answer_ratio": common.pair_ratios(times["re-encode"], times["stream"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the tiny model only, up to 256 snippets, 2 rounds")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--no-write", action="store_true", help="do not append to RESULTS.md")
    parser.add_argument("--summary", help="append the checks as JSON lines here (run_all.py)")
    args = parser.parse_args()
    models = ("tiny",) if args.quick else ("tiny", "mid")
    sizes = SIZES[:3] if args.quick else SIZES
    rounds = 2 if args.quick else args.rounds
    machine = common.machine()
    print(f"machine: {machine}", flush=True)

    rows, figures, checks = [], [], []
    for name in models:
        for setting in SETTINGS:
            r = measure(name, setting, sizes, rounds, answer=setting == "bounded")
            ratio = common.median(r["push_ratio"])
            bytes_ratio = r["bytes"][max(sizes)] / r["bytes"][min(sizes)]
            rows.append([name, setting] + [f"{r['push_ms'][n]:.2f}" for n in sizes]
                        + [common.spread(r["push_ratio"])] + [common.si(r["bytes"][n], "B") for n in sizes]
                        + [f"{bytes_ratio:.2f}", f"{r['fill_s']:.0f}"])
            figure = (f"{name} {setting}: push {r['push_ms'][min(sizes)]:.2f} -> {r['push_ms'][max(sizes)]:.2f} ms "
                      f"({ratio:.2f}x) and state {common.si(r['bytes'][min(sizes)], 'B')} -> "
                      f"{common.si(r['bytes'][max(sizes)], 'B')} ({bytes_ratio:.2f}x) from {min(sizes)} to "
                      f"{max(sizes)} snippets")
            if setting == "bounded":
                checks.append(common.check(f"{name} bounded: push at {max(sizes)} / push at {min(sizes)}",
                                           f"{ratio:.2f}x time, {bytes_ratio:.2f}x state bytes",
                                           f"<= {PUSH_RATIO_TARGET}x both",
                                           ratio <= PUSH_RATIO_TARGET and bytes_ratio <= PUSH_RATIO_TARGET))
                if "answer_ratio" in r:
                    answer_ratio = common.median(r["answer_ratio"])
                    figure += (f"; answer at {ANSWER_AT}: {r['answer_ms']:.1f} ms from the stream, "
                               f"{r['reencode_ms']:.0f} ms re-encoding the prefix ({answer_ratio:.0f}x)")
                    checks.append(common.check(f"{name}: answer at {ANSWER_AT} from the stream / re-encoding",
                                               f"{answer_ratio:.0f}x ({r['answer_ms']:.1f} vs {r['reencode_ms']:.0f} ms)",
                                               f">= {ANSWER_TARGET:.0f}x", answer_ratio >= ANSWER_TARGET))
            figures.append(figure)
            print(figure, flush=True)
    print()
    print(f"batch 1, f32, random weights; push = one snippet through the encoders, the Combiner and the "
          f"time-aligned model, from the state after N snippets ({rounds} rounds in turns, median); "
          "'ratio' = push at the largest N / push at the smallest, per round")
    print(common.table(["model", "setting"] + [f"push ms @{n}" for n in sizes] + ["ratio"]
                       + [f"state @{n}" for n in sizes] + ["bytes ratio", "fill s"], rows))
    for c in checks:
        print(f"{c['figure']}: {c['value']} (target {c['target']}: {'met' if c['met'] else 'NOT met'})")
    if not args.no_write:
        common.write_row("streaming", "; ".join(figures), machine)
    common.write_summary(args.summary, "streaming", checks)


if __name__ == "__main__":
    main()
