"""The peer's side of `peer_train_step.py`: runs in the peer's own venv (PyTorch, mirasol-pytorch).

Started by the driver with the configuration as one JSON argument; then reads one command per
line on stdin and answers each with one JSON line on stdout (torch's own chatter goes to stderr):

    info            -> parameter counts (total, reconstruction heads) and versions
    flops           -> FLOPs of one training step (torch.utils.flop_counter), forward + backward
    step            -> seconds of one full training step (forward, backward, clip, AdamW)
    matmul N REPS   -> seconds of the fastest of REPS f32 [N, N] @ [N, N] products
    quit

Not importable from the package's venv (it needs torch): nothing here is a dependency of mirasol3b.
"""

from __future__ import annotations

import json
import os
import sys
import time


def build(cfg: dict):
    import torch
    from mirasol_pytorch import Mirasol

    torch.manual_seed(0)
    dim, depth, heads, dim_head = cfg["width"], cfg["depth"], cfg["num_heads"], cfg["head_dim"]
    stack = dict(dim=dim, depth=depth, heads=heads, dim_head=dim_head)
    model = Mirasol(
        dim=dim,
        num_text_tokens=cfg["vocab_size"],
        video_image_size=cfg["image_size"],
        video_frames_per_timechunk=cfg["snippet_frames"],
        audio_freq_dim=cfg["n_mels"],
        audio_time_dim_per_timechunk=cfg["mel_frames_per_snippet"],
        audio_patch_size=(cfg["patch_mels"], cfg["patch_frames"]),  # (freq, time)
        video_patch_size=(cfg["patch_size"], cfg["tube_frames"]),  # (spatial, time)
        video_encoder=stack,
        audio_encoder=stack,
        encoder_depth=depth,  # the time-aligned (a/v autoregressive) model
        decoder_depth=depth,
        combiner_depth=depth,
        combiner_output_num_tokens=cfg["num_latents"],
        attn_dim_head=dim_head,
        attn_heads=heads,
        text_max_seq_len=cfg["text_max_length"],
    )
    b = cfg["batch_size"]
    g = torch.Generator().manual_seed(1)
    batch = dict(
        video=torch.rand(b, 3, cfg["num_frames"], cfg["image_size"], cfg["image_size"], generator=g) * 2 - 1,
        audio=torch.randn(b, cfg["n_mels"], cfg["mel_frames"], generator=g),
        text=torch.randint(0, cfg["vocab_size"], (b, cfg["text_length"]), generator=g),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98), weight_decay=0.01)
    model.train()
    return model, optimizer, batch


def train_step(model, optimizer, batch, clip_norm: float):
    import torch

    optimizer.zero_grad(set_to_none=True)
    loss = model(**batch)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
    optimizer.step()
    return float(loss)


def count_flops(model, batch) -> dict:
    """Forward + backward FLOPs. PyTorch's counter has no formula for the CPU flash-attention
    kernel that F.scaled_dot_product_attention may pick; it is given the generic SDPA ones. (At the
    benchmark's configuration the peer's attention runs as plain matmuls, counted as such.)"""
    import torch
    from torch.utils import flop_counter

    def as_registered(formula):
        # torch's formulas are already wrapped for (args, out_shape); FlopCounterMode wraps a
        # custom mapping's functions again unless they say they are raw: "got multiple values
        # for keyword argument 'out_shape'" otherwise.
        def counted(*args, **kwargs):
            return formula(*args, **kwargs)
        counted._get_raw = True
        return counted

    aten = torch.ops.aten
    extra = {}
    for name, formula in (("_scaled_dot_product_flash_attention_for_cpu", flop_counter.sdpa_flop),
                          ("_scaled_dot_product_flash_attention_for_cpu_backward",
                           flop_counter.sdpa_backward_flop)):
        if hasattr(aten, name):
            extra[getattr(aten, name)] = as_registered(formula)
    model.zero_grad(set_to_none=True)
    with flop_counter.FlopCounterMode(display=False, custom_mapping=extra) as counter:
        loss = model(**batch)
        loss.backward()
    model.zero_grad(set_to_none=True)
    by_op = {str(k): int(v) for k, v in counter.get_flop_counts().get("Global", {}).items()}
    return {"flops": int(counter.get_total_flops()), "by_op": by_op}


def matmul_seconds(n: int, reps: int) -> float:
    import torch

    a = torch.randn(n, n)
    b = torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    cfg = json.loads(sys.argv[1])
    out = sys.stdout
    sys.stdout = sys.stderr  # anything else printed must not corrupt the protocol
    import torch

    torch.set_num_threads(cfg["threads"])
    if cfg.get("cpus"):
        os.sched_setaffinity(0, set(cfg["cpus"]))
    model, optimizer, batch = build(cfg)

    def reply(obj) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    reply({"ready": True})
    for line in sys.stdin:
        cmd = line.split()
        if not cmd:
            continue
        if cmd[0] == "quit":
            break
        if cmd[0] == "info":
            params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
            reply({"params": params(model),
                   "recon_video_params": params(model.to_reconstructed_video),
                   "recon_audio_params": params(model.to_reconstructed_audio),
                   "torch": torch.__version__, "threads": torch.get_num_threads(),
                   "cpus": sorted(os.sched_getaffinity(0))})
        elif cmd[0] == "flops":
            reply(count_flops(model, batch))
        elif cmd[0] == "step":
            t = time.perf_counter()
            loss = train_step(model, optimizer, batch, cfg["clip_norm"])
            reply({"seconds": time.perf_counter() - t, "loss": loss})
        elif cmd[0] == "matmul":
            reply({"seconds": matmul_seconds(int(cmd[1]), int(cmd[2]))})
        else:
            reply({"error": f"unknown command {cmd[0]!r}"})


if __name__ == "__main__":
    main()
