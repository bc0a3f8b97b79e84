"""Parameter count of each component and the FLOPs of one train step, without allocating anything.

    python -m mirasol3b.summary --config=configs/mirasol3b.py[:variant] [--config.key=value ...]

Parameters come from `jax.eval_shape` of the train state. FLOPs come from XLA's cost analysis of
the lowered (not compiled) `jax.jit(train_step)` on abstract inputs, lowered with every scan
unrolled (`model.scan_layers=False`): the analysis counts a while-loop body once, not once per
trip. An analytic count of the matmuls beside it checks that number.
"""

from __future__ import annotations

import copy
import time

import jax
import ml_collections
import numpy as np
from absl import flags
from flax import linen as nn

from mirasol3b import cli, configlib
from mirasol3b.layers import TransformerSpec
from mirasol3b.model import Mirasol3B, samples_per_snippet, stack_spec, tokens_per_snippet
from mirasol3b.text_decoder import padded_vocab_size
from mirasol3b.time_aligned import windowed_snippets
from mirasol3b.train.optimizer import make_optimizer
from mirasol3b.train.state import abstract_state, example_batch
from mirasol3b.train.step import make_train_step

# Summary rows -> top-level param collections; the fusion projections belong to the Combiner.
COMPONENTS = {
    "video_encoder": ("video_encoder",),
    "audio_encoder": ("audio_encoder",),
    "combiner": ("fusion", "combiner"),
    "time_aligned": ("time_aligned",),
    "text_decoder": ("text_decoder",),
}
AUDIO_VIDEO = ("video_encoder", "audio_encoder", "combiner", "time_aligned")


def sequence_sizes(config: ml_collections.ConfigDict) -> dict[str, int]:
    """Snippets and tokens per snippet of each modality, for `config.data`'s clip length."""
    m = config.model
    v, a = m.video, m.audio
    mel_frames = samples_per_snippet(m) // a.hop_length
    tokens = tokens_per_snippet(m)
    sizes = {
        "snippets": config.data.num_frames // v.snippet_frames,
        "frames_per_snippet": v.snippet_frames,
        "video_tokens": tokens["video"] if m.use_video else 0,
        "audio_samples": samples_per_snippet(m),
        "mel_frames": mel_frames,
        "audio_tokens": tokens["audio"] if m.use_audio else 0,
        "latents": m.num_latents,
        "text_length": config.data.text_length,
    }
    sizes["combiner_inputs"] = sizes["video_tokens"] + sizes["audio_tokens"]
    # What the Combiner attends over (Transformer) or reads from (TTM) per snippet.
    sizes["combiner_sequence"] = sizes["combiner_inputs"] + (
        m.num_latents if m.combiner == "transformer" else m.ttm.memory_size)
    sizes["time_aligned_tokens"] = sizes["snippets"] * m.num_latents
    return sizes


def _state(config: ml_collections.ConfigDict):
    """(model, optimizer, unboxed abstract train state)."""
    model, optimizer = Mirasol3B(config.model), make_optimizer(config.train)
    # Params do not depend on the batch size; a one-clip batch is traced, never run.
    abstract, _ = abstract_state(model, optimizer, example_batch(config, 1))
    return model, optimizer, nn.unbox(abstract)


def param_counts(params) -> dict[str, int]:
    """Component -> number of parameters, and 'total'."""
    size = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))  # noqa: E731
    counts = {row: sum(size(params.get(c, {})) for c in cols) for row, cols in COMPONENTS.items()}
    counts["total"] = size(params)
    if sum(counts[row] for row in COMPONENTS) != counts["total"]:
        raise RuntimeError(f"params outside the summary's components: {sorted(params)}")
    return counts


# ---- analytic FLOPs ---------------------------------------------------------------------------

def _stack_flops(part: TransformerSpec, seqs: int, tokens: int, kv_tokens: int = 0,
                 kv_width: int = 0, self_keys: int = 0, keep_last: int = 0) -> tuple[int, int, int]:
    """Forward matmul FLOPs of one TransformerStack over `seqs` sequences, in three parts:

    inner projections (QKV, cross-attention's QKV, MLP in), output projections (attention out,
    MLP out) and attention products (scores, values; full-size whatever the mask, as the dense
    attention computes them all). They differ in what a remat'd backward pass recomputes.
    `self_keys`: keys per query in self-attention when not `tokens` (chunked attention).
    `keep_last`: the last layer computes only that many tokens (`TransformerStack.keep_last`).
    """
    d, f = part.width, part.mlp_dim
    a = part.num_heads * part.heads_dim  # attention's inner width

    def layer(queries: int) -> tuple[int, int, int]:
        inner = queries * (d * a + d * f) + tokens * 2 * d * a  # keys and values of every token
        outer = queries * (a * d + f * d)
        attention = 2 * queries * (self_keys or tokens) * a
        if kv_tokens:
            inner += queries * d * a + kv_tokens * 2 * kv_width * a
            outer += queries * a * d
            attention += 2 * queries * kv_tokens * a
        return inner, outer, attention

    full = layer(tokens)
    last = layer(keep_last) if keep_last else full
    return tuple(2 * seqs * ((part.depth - 1) * x + y) for x, y in zip(full, last))


def _token_learner_flops(seqs: int, tokens: int, width: int, hidden: int, outputs: int) -> int:
    return 2 * seqs * tokens * (width * hidden + hidden * outputs + outputs * width)


# Which of `_stack_flops`' parts a remat'd backward pass recomputes. Output projections are never
# recomputed: the gradients need their inputs, not their outputs. Attention products carry a batch
# dim, so `dots_with_no_batch_dims_saveable` does not keep them. Non-matmul ops, which this count
# leaves out, are recomputed under every policy but "none".
_RECOMPUTE = {
    "none": (0, 0, 0), "everything_saveable": (0, 0, 0), "dots_saveable": (0, 0, 0),
    "dots_with_no_batch_dims_saveable": (0, 0, 1), "nothing_saveable": (1, 0, 1),
}


def analytic_flops(config: ml_collections.ConfigDict, batch_size: int) -> dict[str, dict[str, int]]:
    """Matmul FLOPs per component: 'forward', and 'train' = 3 x forward + remat recompute.

    The backward of a matmul costs twice its forward; the patch embeddings' input gradient (which
    nothing needs) and the optimizer's ~10 elementwise FLOPs a parameter are not counted.
    """
    m, s, b = config.model, sequence_sizes(config), batch_size
    clips = b * s["snippets"]
    redo = _RECOMPUTE[m.remat_policy]
    out = {}

    def add(row, other=0, stacks=()):
        parts = [sum(p) for p in zip(*stacks)] if stacks else [0, 0, 0]
        forward = other + sum(parts)
        out[row] = {"forward": forward, "train": 3 * forward + sum(r * p for r, p in zip(redo, parts))}

    if m.use_video:
        v = m.video
        tube = v.tube_frames * v.patch_size ** 2 * 3
        add("video_encoder", 2 * clips * s["video_tokens"] * tube * m.video_encoder.width,
            [_stack_flops(stack_spec(m, "video_encoder"), clips, s["video_tokens"])])
    if m.use_audio:
        a = m.audio
        stft_frames = 1 + s["audio_samples"] // a.hop_length
        n_freqs = a.n_fft // 2 + 1
        # The log-mel (two DFT matmuls and the filterbank) has no parameters: forward only. With
        # dft="fft" only the filterbank is a matmul; the FFT's O(n log n) is left out, as it is small.
        dft_width = 2 * a.win_length if a.dft == "matmul" else 0
        logmel = 2 * clips * stft_frames * n_freqs * (dft_width + a.n_mels)
        patch = a.patch_frames * a.patch_mels
        add("audio_encoder", 2 * clips * s["audio_tokens"] * patch * m.audio_encoder.width,
            [_stack_flops(stack_spec(m, "audio_encoder"), clips, s["audio_tokens"])])
        out["audio_encoder"]["forward"] += logmel
        out["audio_encoder"]["train"] += logmel

    c = stack_spec(m, "combiner_transformer")
    fusion = 2 * clips * c.width * (s["video_tokens"] * m.video_encoder.width * m.use_video
                                    + s["audio_tokens"] * m.audio_encoder.width * m.use_audio)
    if m.combiner == "transformer":
        keep = m.num_latents if m.combiner_outputs_only else 0
        add("combiner", fusion, [_stack_flops(c, clips, s["combiner_sequence"], keep_last=keep)])
    else:
        memory, hidden = m.ttm.memory_size, m.ttm.token_learner_hidden
        read = _token_learner_flops(clips, s["combiner_sequence"], c.width, hidden, m.num_latents)
        write = _token_learner_flops(clips, s["combiner_sequence"] + m.num_latents, c.width, hidden, memory)
        add("combiner", fusion + read + write, [_stack_flops(c, clips, m.num_latents)])

    t, window = stack_spec(m, "time_aligned"), m.time_aligned.window
    latents = b * s["time_aligned_tokens"]
    padded = windowed_snippets(s["snippets"], window)
    if padded:  # chunks of `window` snippets against their own and the previous chunk
        chunk = window * m.num_latents
        stack = _stack_flops(t, b * padded // window, chunk, self_keys=2 * chunk)
    else:
        stack = _stack_flops(t, b, s["time_aligned_tokens"])
    add("time_aligned", 2 * 2 * latents * c.width * t.width, [stack])

    d = stack_spec(m, "text_decoder")
    logits = 2 * b * s["text_length"] * d.width * padded_vocab_size(m.vocab_size)
    add("text_decoder", logits, [_stack_flops(d, b, s["text_length"], s["time_aligned_tokens"], t.width)])

    out["total"] = {k: sum(row[k] for row in out.values()) for k in ("forward", "train")}
    return out


# ---- XLA FLOPs --------------------------------------------------------------------------------

def train_step_flops(config: ml_collections.ConfigDict) -> dict[str, float]:
    """XLA's FLOP count of one lowered train step at `config.data.batch_size`, every scan unrolled.

    Returns 'flops', the unrolled model's 'params' (to check it is the same model) and
    'seconds' spent on the abstract state, the lowering and the cost analysis.
    """
    config = copy.deepcopy(config)
    config.model.scan_layers = False
    times = [time.perf_counter()]
    model, optimizer, state = _state(config)
    times.append(time.perf_counter())
    step = make_train_step(model, optimizer, config.loss)  # one pass: microbatches split the work, not add to it
    rng = jax.eval_shape(lambda: jax.random.key(0))
    lowered = jax.jit(step).lower(state, example_batch(config, config.data.batch_size), rng)
    times.append(time.perf_counter())
    flops = float(lowered.cost_analysis()["flops"])
    times.append(time.perf_counter())
    return {
        "flops": flops,
        "params": param_counts(state.params)["total"],
        "seconds": dict(zip(("state", "lower", "cost_analysis"), np.diff(times).tolist())),
    }


def summarize(config: ml_collections.ConfigDict, flops: bool = True) -> dict:
    """Component -> param count, 'total', 'audio_video_fraction', 'sequence' (sizes),
    'analytic_flops' (per component), and with `flops` 'train_step_flops' (XLA) and timings."""
    configlib.validate(config)
    _, _, state = _state(config)
    summary = param_counts(state.params)
    summary["audio_video_fraction"] = sum(summary[k] for k in AUDIO_VIDEO) / summary["total"]
    summary["sequence"] = sequence_sizes(config)
    summary["analytic_flops"] = analytic_flops(config, config.data.batch_size)
    if flops:
        xla = train_step_flops(config)
        if xla["params"] != summary["total"]:
            raise RuntimeError(f"the unrolled model has {xla['params']} params, the scanned one "
                               f"{summary['total']}: its FLOPs would be another model's")
        summary["train_step_flops"] = xla["flops"]
        summary["seconds"] = xla["seconds"]
    return summary


# ---- printing ---------------------------------------------------------------------------------

def _si(x: float) -> str:
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:.0f}"


def format_summary(summary: dict, config: ml_collections.ConfigDict) -> str:
    s, flops = summary["sequence"], summary["analytic_flops"]
    m, b = config.model, config.data.batch_size
    extra = "learned outputs" if m.combiner == "transformer" else "memory"
    lines = [
        f"Mirasol3B  combiner={m.combiner}  dtype={m.dtype}  params={m.param_dtype}  remat={m.remat_policy}",
        f"clip: {config.data.num_frames} frames = {s['snippets']} snippets x {s['frames_per_snippet']} frames"
        f" ({s['audio_samples']} audio samples, {s['mel_frames']} mel frames each)",
        f"tokens per snippet: video {s['video_tokens']}, audio {s['audio_tokens']}; Combiner sequence"
        f" {s['combiner_sequence']} ({s['combiner_inputs']} media +"
        f" {s['combiner_sequence'] - s['combiner_inputs']} {extra}); latents {s['latents']}",
        f"time-aligned sequence {s['time_aligned_tokens']} tokens; text {s['text_length']} tokens"
        f" cross-attending to {s['time_aligned_tokens']}",
        "",
        f"{'component':<15}{'params':>16}{'share':>8}{'fwd FLOPs/step':>17}{'train FLOPs/step':>19}",
        f"(analytic matmul FLOPs at batch {b}; train = 3 x fwd + what remat recomputes)",
    ]
    for row in (*COMPONENTS, "total"):
        n = summary[row]
        if not n:
            continue
        f = flops.get(row, {"forward": 0, "train": 0})
        lines.append(f"{row:<15}{n:>16,}{n / summary['total']:>8.1%}{_si(f['forward']):>17}{_si(f['train']):>19}")
    lines.append(f"audio-video part: {summary['audio_video_fraction']:.1%} of the parameters")
    if "train_step_flops" in summary:
        xla = summary["train_step_flops"]
        lines += [
            "",
            f"train step FLOPs (XLA cost analysis, lowered, unrolled): {_si(xla)}FLOP"
            f"  = {xla / flops['total']['train']:.3f} x analytic",
            "seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in summary["seconds"].items()),
        ]
    return "\n".join(lines)


SHARED_FLAGS = cli.Shared(config=cli.REQUIRED, config_help="Config file, e.g. configs/mirasol3b.py[:ttm].")


def define_flags(fv: flags.FlagValues) -> dict:
    return {"flops": flags.DEFINE_bool("flops", True, "Lower the train step to count its FLOPs.", flag_values=fv)}


def main(args: cli.Args) -> None:
    config = configlib.validate(args.config)
    start = time.perf_counter()
    summary = summarize(config, flops=args.flops)
    print(format_summary(summary, config))
    print(f"summary took {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    cli.run(main, define_flags, SHARED_FLAGS)
