"""Answer tokens per second: generation over the KV cache against recomputing the whole prefix.

    .venv/bin/python benchmarks/decode.py [--quick] [--rounds N] [--model tiny|peer]

Batch 1 and 16, greedy and beam 4, 64 new tokens after a 32-token prompt window. A request is one
call of a compiled `generate`: it encodes the media once, fills the prompt, then generates.

- cached: `mirasol3b.decoding.make_generate_fn`, as `evaluate`/`answer` use it.
- recompute: the same search loop (the same `make_generate_fn`, traced with the decoder step
  swapped, see `recompute_step`), where each new token reruns the text decoder over the whole
  prefix: causal self-attention over every token so far and cross-attention keys/values from the
  media again. The prefix is rounded up to a multiple of 8 tokens, so one compiled program serves
  every length; the media is still encoded once per request.

EOS is set to an id the model cannot emit, so every request generates exactly 64 tokens. Greedy
tokens of both paths are compared (they must agree). Target: cached at least 5x faster.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # a CPU benchmark, also where JAX could find a GPU
import common  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mirasol3b import decoding  # noqa: E402
from mirasol3b.layers import masks  # noqa: E402
from mirasol3b.model import Mirasol3B  # noqa: E402
from mirasol3b.train.random_batches import random_batch  # noqa: E402

PROMPT = 32
NEW_TOKENS = 64
BUCKET = 8
TARGET = 5.0


# ---- the recompute baseline ---------------------------------------------------------------------

def recompute_init_cache(model, params, media, batch, cache_length):
    """The 'cache' of the recompute path: the token and position buffers, and the encoded media."""
    return {"tokens": jnp.zeros((batch, cache_length), jnp.int32),
            "positions": jnp.zeros((batch, cache_length), jnp.int32),
            "media": media["media"]}


def _decode_prefix(model, params, cache, length, slot_valid, media_token_mask):
    """Logits of the decoder run without a cache over the first `length` slots."""
    mask = masks.combine(masks.causal(length), masks.key_padding(slot_valid[:, :length]))
    return model.apply({"params": params}, cache["tokens"][:, :length], cache["media"], media_token_mask,
                       positions=cache["positions"][:, :length], mask=mask, method=Mirasol3B.decode_text)


def recompute_step(model, params, cache, tokens, positions, slot, slot_valid, media_token_mask, media=None):
    """`decoding.decoder_step`'s contract, without a KV cache: writes `tokens` at `slot` into the
    buffer and reruns the decoder over every slot up to them (rounded up to BUCKET slots)."""
    n = tokens.shape[1]
    cache = dict(cache)
    if media is not None:
        cache["media"] = media
    cache["tokens"] = jax.lax.dynamic_update_slice(cache["tokens"], tokens.astype(jnp.int32), (0, slot))
    cache["positions"] = jax.lax.dynamic_update_slice(cache["positions"], positions.astype(jnp.int32), (0, slot))
    total = slot_valid.shape[1]
    if isinstance(slot, int):  # the prompt: a static prefix
        logits = _decode_prefix(model, params, cache, slot + n, slot_valid, media_token_mask)[:, slot:slot + n]
        return logits, cache
    lengths = list(range(BUCKET, total, BUCKET)) + [total]

    def branch(length):
        def run(c):
            logits = _decode_prefix(model, params, c, length, slot_valid, media_token_mask)
            return jax.lax.dynamic_slice_in_dim(logits, slot, n, axis=1)
        return run

    index = jnp.minimum((slot + n - 1) // BUCKET, len(lengths) - 1)
    return jax.lax.switch(index, [branch(length) for length in lengths], cache), cache


def compile_generate(model, params, batch, config: decoding.DecodeConfig, recompute: bool):
    fn = decoding.make_generate_fn(model, config)
    rng = jax.random.key(0)
    if not recompute:
        return fn.lower(params, batch, rng).compile()
    with mock.patch.multiple(decoding, decoder_step=recompute_step, init_cache=recompute_init_cache):
        return fn.lower(params, batch, rng).compile()


# ---- main ---------------------------------------------------------------------------------------

def request_batch(config, batch_size: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    b = random_batch(config, rng, batch_size)
    prompt_lengths = rng.integers(PROMPT // 2, PROMPT + 1, batch_size).astype(np.int32)
    prompts = np.where(np.arange(PROMPT)[None, :] < prompt_lengths[:, None],
                       rng.integers(3, config.model.vocab_size, (batch_size, PROMPT)), 0).astype(np.int32)
    out = {k: jnp.asarray(b[k]) for k in ("video", "audio", "media_mask") if k in b}
    out.update(prompts=jnp.asarray(prompts), prompt_lengths=jnp.asarray(prompt_lengths))
    return out


def model_config(name: str):
    overrides = {"data.text_length": PROMPT, "model.text_decoder.max_length": PROMPT + NEW_TOKENS}
    if name == "tiny":
        return common.tiny_config(overrides)
    return common.peer_scale_config("fft", overrides)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="batch 1 only, one timed round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", choices=("tiny", "peer"), default="tiny",
                        help="configs/tiny.py, or the peer-scale model of peer_train_step.py (width 384)")
    parser.add_argument("--no-write", action="store_true", help="do not append to RESULTS.md")
    parser.add_argument("--summary", help="append the checks as JSON lines here (run_all.py)")
    args = parser.parse_args()
    batches = (1,) if args.quick else (1, 16)
    rounds = 1 if args.quick else args.rounds
    machine = common.machine()
    print(f"machine: {machine}", flush=True)

    config = model_config(args.model)
    model = Mirasol3B(config.model)
    init_batch = request_batch(config, 1)
    params = jax.jit(lambda r: model.init(r, {**{k: init_batch[k] for k in ("video", "audio", "media_mask")},
                                             "text_inputs": init_batch["prompts"]})["params"])(jax.random.key(0))
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    encode = jax.jit(lambda p, b: model.apply({"params": p}, b.get("video"), b.get("audio"), b["media_mask"],
                                              method=Mirasol3B.encode_media))
    print(f"model {args.model}: {num_params:,} params, text decoder width {config.model.text_decoder.width}, "
          f"depth {config.model.text_decoder.depth}; prompt window {PROMPT}, {NEW_TOKENS} new tokens", flush=True)

    fns, outputs, inputs = {}, {}, {}
    for b in batches:
        inputs[b] = request_batch(config, b, seed=b)
        fns[("encode", b, "")] = (encode, (params, inputs[b]))
        for method in ("greedy", "beam"):
            dc = decoding.DecodeConfig(max_new_tokens=NEW_TOKENS, method=method, beam_size=4, eos_id=-1)
            for path in ("cached", "recompute"):
                t = time.perf_counter()
                compiled = compile_generate(model, params, inputs[b], dc, recompute=path == "recompute")
                fns[(path, b, method)] = (compiled, (params, inputs[b], jax.random.key(0)))
                print(f"batch {b:2d} {method:6s} {path:9s} compiled in {time.perf_counter() - t:.0f} s", flush=True)

    def timed(key):
        fn, fn_args = fns[key]

        def run() -> float:
            t = time.perf_counter()
            out = jax.block_until_ready(fn(*fn_args))
            outputs[key] = out
            return time.perf_counter() - t
        return run

    times = common.alternate({k: timed(k) for k in fns}, rounds=rounds, warmup=1)

    rows, figures, checks = [], [], []
    for b in batches:
        encode = times[("encode", b, "")]
        encode_s = common.median(encode)
        for method in ("greedy", "beam"):
            cached, recompute = times[("cached", b, method)], times[("recompute", b, method)]
            speedup = common.pair_ratios(recompute, cached)
            # The same ratio without the media encoding both paths share (timed in the same rounds).
            decode_only = [(r - e) / max(c - e, 1e-9) for r, c, e in zip(recompute, cached, encode)]
            same = bool(np.array_equal(np.asarray(outputs[("cached", b, method)]["tokens"]),
                                       np.asarray(outputs[("recompute", b, method)]["tokens"])))
            tps = lambda s, b=b: b * NEW_TOKENS / common.median(s)  # noqa: E731
            name = method if method == "greedy" else "beam 4"
            rows.append([b, name, f"{encode_s * 1e3:.1f}",
                         f"{common.median(cached) * 1e3:.0f}", f"{tps(cached):.0f}",
                         f"{common.median(recompute) * 1e3:.0f}", f"{tps(recompute):.0f}",
                         common.spread(speedup), f"{common.median(decode_only):.1f}", "yes" if same else "no"])
            figures.append(f"b{b} {method}: cached {tps(cached):.0f} tok/s, recompute {tps(recompute):.0f} tok/s, "
                           f"{common.median(speedup):.1f}x ({common.median(decode_only):.1f}x without the encode)"
                           + ("" if same else ", TOKENS DIFFER"))
            # A faster path that generates other tokens is a broken cache (or baseline), not a speed-up.
            checks.append(common.check(
                f"batch {b} {name}: cached / recompute ({args.model} model)",
                f"{common.median(speedup):.2f}x ({tps(cached):.0f} vs {tps(recompute):.0f} tok/s; "
                f"{common.median(decode_only):.1f}x without the encode; "
                f"{'the same tokens' if same else 'OTHER TOKENS than recomputing'})",
                f">= {TARGET}x, the same tokens", common.median(speedup) >= TARGET and same))
    met = sum(bool(c["met"]) for c in checks)
    print()
    print(f"model {args.model}, f32; {NEW_TOKENS} new tokens per request after a {PROMPT}-token prompt window; "
          f"{rounds} timed rounds after 1 warm-up (median); a request includes encoding its media once; "
          "'w/o encode' = the speed-up with the encode time taken off both")
    print(common.table(["batch", "method", "encode ms", "cached ms", "cached tok/s", "recompute ms",
                        "recompute tok/s", "speed-up", "w/o encode", "same tokens"], rows))
    print(f"target: cached >= {TARGET}x faster than recompute at {NEW_TOKENS} tokens: "
          f"{'met' if met == len(checks) else 'NOT met'} in {met} of {len(checks)} cases")
    if not args.no_write:
        common.write_row("decode", f"model {args.model}, {NEW_TOKENS} tokens: " + "; ".join(figures), machine)
    common.write_summary(args.summary, "decode", checks)


if __name__ == "__main__":
    main()
