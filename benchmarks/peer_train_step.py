"""Our AdamW train step against the peer's (mirasol-pytorch 0.0.16) at the peer's README scale, on
this CPU, timed side by side in one run.

    .venv/bin/python benchmarks/peer_train_step.py [--quick] [--rounds N] [--dft auto|fft|matmul]

The peer lives in its own venv (`benchmarks/.peer-venv`, created here on first use: PyTorch
2.13.0 CPU first, then mirasol-pytorch 0.0.16, x-transformers 1.26.3 (later ones refuse its
arguments), packaging, numpy); it is not a dependency of this package. Its step runs in a worker
process of that venv (`_peer_worker.py`, one JSON line per command) and the driver alternates
ours (unrolled layers), the peer's, ours (scanned layers, the default), ... Both processes are
pinned to the same CPUs and get all of them: XLA's CPU client uses every core it may run on,
PyTorch gets `torch.set_num_threads(len(cpus))` and OMP_WAIT_POLICY=PASSIVE (on this busy machine
OpenMP's default spinning made its step 5x slower). Our STFT form (`model.audio.dft`) is the
faster of the two on this machine, timed first.

FLOPs: ours from XLA's cost analysis of the compiled step with the layer scans unrolled (the
analysis counts a loop body once); the peer's from `torch.utils.flop_counter` over forward and
backward. Both beside this machine's measured f32 matmul peak (the better of jnp.dot and
torch.mm on [2048, 2048], measured in the same run).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # a CPU benchmark, also where JAX could find a GPU
import common  # noqa: E402  (puts the repo root on sys.path)

import jax  # noqa: E402

from mirasol3b import summary  # noqa: E402
from mirasol3b.encoders.spectrogram import log_mel_spectrogram  # noqa: E402
from mirasol3b.model import logmel_spec, samples_per_snippet  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
PEER_VENV = os.path.join(HERE, ".peer-venv")
# Installed in this order: torch first, so the others find it and pull nothing bigger.
PEER_REQUIREMENTS = (("torch==2.13.0",),
                     ("mirasol-pytorch==0.0.16", "x-transformers==1.26.3", "packaging", "numpy"))
MATMUL_N = 2048


# ---- the peer's venv and worker -----------------------------------------------------------------

def ensure_peer_venv(path: str = PEER_VENV) -> str:
    """Creates the peer's venv if missing (or installed from other pins); returns its python."""
    python = os.path.join(path, "bin", "python")
    stamp = os.path.join(path, ".installed")
    wanted = json.dumps(PEER_REQUIREMENTS)
    if os.path.exists(python) and os.path.exists(stamp) and open(stamp).read() == wanted:
        return python
    print(f"creating the peer's venv in {os.path.relpath(path, common.ROOT)} (torch 2.13.0 CPU, "
          "mirasol-pytorch 0.0.16, x-transformers 1.26.3) ...", flush=True)
    t = time.perf_counter()
    base = getattr(sys, "_base_executable", sys.executable)
    log = os.path.join(os.path.dirname(path), ".peer-venv-install.log")
    with open(log, "w") as out:
        subprocess.run([base, "-m", "venv", "--clear", path], check=True, stdout=out, stderr=out)
        for group in PEER_REQUIREMENTS:
            done = subprocess.run([python, "-m", "pip", "install", "--quiet", *group], stdout=out, stderr=out)
            if done.returncode:
                sys.exit(f"pip install {' '.join(group)} failed; see {log}")
    with open(stamp, "w") as f:
        f.write(wanted)
    print(f"peer venv ready in {time.perf_counter() - t:.0f} s", flush=True)
    return python


class PeerWorker:
    """The peer model in a subprocess of its venv; `call('step')` -> dict."""

    def __init__(self, python: str, config: dict, omp_wait_policy: str = "PASSIVE"):
        self.log_path = os.path.join(PEER_VENV, "worker.log")
        self._log = open(self.log_path, "w")
        # OMP_WAIT_POLICY=PASSIVE: idle OpenMP threads sleep rather than spin. On this shared
        # machine the default spinning made the peer's step 5x slower (15 s against 3 s), every
        # elementwise op waiting at a barrier for a descheduled thread; PASSIVE is its best here.
        env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_WAIT_POLICY=omp_wait_policy)
        self.proc = subprocess.Popen([python, os.path.join(HERE, "_peer_worker.py"), json.dumps(config)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                     text=True, env=env)
        self._read()  # {"ready": true}

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self._log.flush()
            tail = open(self.log_path).read()[-3000:]
            raise RuntimeError(f"peer worker exited (code {self.proc.poll()}); its log ends:\n{tail}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"peer worker: {reply['error']}")
        return reply

    def call(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()
        self._log.close()


def peer_config(batch_size: int, threads: int, cpus: list[int]) -> dict:
    p = common.PEER_SCALE
    return dict(
        width=p["width"], depth=p["depth"], num_heads=p["num_heads"], head_dim=p["head_dim"],
        vocab_size=p["vocab_size"], image_size=p["image_size"], snippet_frames=p["snippet_frames"],
        n_mels=p["n_mels"], mel_frames=p["mel_frames"],
        mel_frames_per_snippet=p["mel_frames"] // (p["num_frames"] // p["snippet_frames"]),
        patch_mels=p["patch_mels"], patch_frames=p["patch_frames"], patch_size=p["patch_size"],
        tube_frames=p["tube_frames"], num_latents=p["num_latents"], text_max_length=p["text_max_length"],
        num_frames=p["num_frames"], text_length=p["text_length"], batch_size=batch_size,
        threads=threads, cpus=cpus, clip_norm=1.0,
    )


# ---- choosing the STFT ---------------------------------------------------------------------------

def logmel_seconds(config, dft: str, reps: int = 5) -> float:
    """Best of `reps` jitted log-mel spectrograms of the whole batch's audio with `dft`."""
    m = config.model
    spec = dataclasses.replace(logmel_spec(m), dft=dft)
    snippets = config.data.num_frames // m.video.snippet_frames
    waves = jax.random.normal(jax.random.key(0), (config.data.batch_size * snippets, samples_per_snippet(m)))
    fn = jax.jit(lambda w: log_mel_spectrogram(w, spec))
    fn(waves).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn(waves).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return best


def pick_dft(config) -> tuple[str, dict[str, float]]:
    """The faster of the two STFT forms on this machine (alternated, best of each)."""
    times = {"fft": [], "matmul": []}
    for _ in range(3):
        for dft in times:
            times[dft].append(logmel_seconds(config, dft))
    best = {k: min(v) for k, v in times.items()}
    return min(best, key=best.get), best


# ---- main ---------------------------------------------------------------------------------------

DIFFERENCES = """\
What differs at this configuration (same widths, depths, 8 heads of 64, token grids, text, batch):
  - the peer reconstructs the next snippet's pixels and spectrogram through linear heads from the
    3 x 384 flattened latents (video 1152 -> 2*64*64*3 = {recon_video:,} params, audio {recon_audio:,}),
    with cosine losses; we predict the next snippet's latents (a 384 -> 384 head, InfoNCE loss).
  - the peer adds 8 register tokens to every clip in each encoder (video 24, audio 12 tokens a
    snippet; ours 16 and 4), one memory key/value in the time-aligned model and decoder, rotary
    positions, and random key masks (a/v 0.15, text 0.1); our Combiner appends its 3 learned
    output tokens to the snippet's 20 (23 a sequence), the peer keeps the last 3 of the 20.
  - the peer takes the spectrogram; we compute the log-mel from the waveform in the step.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="batch 2, one timed round")
    parser.add_argument("--rounds", type=int, default=4, help="timed rounds (each: ours, peer, ...)")
    parser.add_argument("--dft", choices=("auto", "fft", "matmul"), default="auto",
                        help="our STFT form; auto times both and keeps the faster")
    parser.add_argument("--omp-wait-policy", choices=("PASSIVE", "ACTIVE"), default="PASSIVE",
                        help="OMP_WAIT_POLICY of the peer's process (PASSIVE is much faster on a busy machine)")
    parser.add_argument("--no-write", action="store_true", help="do not append to RESULTS.md")
    parser.add_argument("--summary", help="append the checks as JSON lines here (run_all.py)")
    args = parser.parse_args()

    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, cpus)
    batch = 2 if args.quick else common.PEER_SCALE["batch_size"]
    rounds = 1 if args.quick else args.rounds
    machine = common.machine()
    print(f"machine: {machine}\nboth pinned to CPUs {cpus}; XLA uses them all, torch.set_num_threads({len(cpus)}), "
          f"OMP_WAIT_POLICY={args.omp_wait_policy}", flush=True)

    python = ensure_peer_venv()
    t0 = time.perf_counter()
    peer = PeerWorker(python, peer_config(batch, len(cpus), cpus), args.omp_wait_policy)
    try:
        info = peer.call("info")
        peer_flops = peer.call("flops")
        print(f"peer: torch {info['torch']}, {info['threads']} threads, {info['params']:,} params, "
              f"{common.si(peer_flops['flops'], 'FLOP')} a step (built and counted in "
              f"{time.perf_counter() - t0:.0f} s)", flush=True)

        base = common.peer_scale_config("fft", {"data.batch_size": batch})
        if args.dft == "auto":
            dft, dft_times = pick_dft(base)
            print("log-mel of the batch: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in dft_times.items())
                  + f" -> model.audio.dft = {dft!r}", flush=True)
        else:
            dft = args.dft
        # model.scan_layers: True (the default) scans each stack's layers; False unrolls them.
        variants = {"ours (unrolled layers)": False, "ours (scanned layers)": True}
        ours = {}
        for name, scan in variants.items():
            cfg = common.peer_scale_config(dft, {"data.batch_size": batch, "model.scan_layers": scan})
            ours[name] = common.TrainStep(cfg)
            print(f"{name}: {ours[name].num_params:,} params, compiled in {ours[name].compile_seconds:.0f} s",
                  flush=True)
        # FLOPs of our step (both variants): the compiled unrolled program, as XLA's cost analysis
        # counts a loop body once.
        our_flops = ours["ours (unrolled layers)"].flops()
        analytic = summary.analytic_flops(next(iter(ours.values())).config, batch)["total"]["train"]

        # Matmul peaks, alternated.
        peak = common.alternate({"jax": lambda: common.jax_matmul_seconds(MATMUL_N, 3),
                                 "torch": lambda: peer.call(f"matmul {MATMUL_N} 3")["seconds"]},
                                rounds=2 if args.quick else 3, warmup=0)
        mm_flops = 2 * MATMUL_N ** 3
        peak_rate = {k: mm_flops / min(v) for k, v in peak.items()}
        machine_peak = max(peak_rate.values())

        # The steps, alternated: ours, peer, ours, peer, ...
        # With two of ours: unrolled, peer, scanned, unrolled, peer, ...; each of ours is paired
        # with the peer's step of the same round.
        names = list(ours)
        fns = {names[0]: ours[names[0]].step, "peer": lambda: peer.call("step")["seconds"]}
        fns.update({name: ours[name].step for name in names[1:]})
        times = common.alternate(fns, rounds=rounds, warmup=1)
    finally:
        peer.close()

    peer_times = times["peer"]
    rows, figures = [], []
    rows.append(["peer (mirasol-pytorch)", f"{info['params']:,}", common.spread(peer_times),
                 common.si(peer_flops["flops"], "FLOP"),
                 common.si(peer_flops["flops"] / common.median(peer_times), "FLOP/s"),
                 f"{peer_flops['flops'] / common.median(peer_times) / machine_peak:.0%}", "1.00"])
    summary_ratio = {}
    for name, step in ours.items():
        t = times[name]
        ratio = common.pair_ratios(peer_times, t)
        summary_ratio[name] = ratio
        rate = our_flops / common.median(t)
        rows.append([name, f"{step.num_params:,}", common.spread(t), common.si(our_flops, "FLOP"),
                     common.si(rate, "FLOP/s"), f"{rate / machine_peak:.0%}", common.spread(ratio)])
        figures.append(f"{name}: {common.median(t):.2f} s/step, peer/ours {common.median(ratio):.2f}x "
                       f"(pairs {min(ratio):.2f}-{max(ratio):.2f}), {common.si(rate, 'FLOP/s')} "
                       f"= {rate / machine_peak:.0%} of peak")
    print()
    print(f"batch {batch}, f32, {rounds} timed rounds after 1 warm-up; time = median (min-max) s/step; "
          "speed-up = peer/ours pair by pair")
    print(common.table(["model", "params", "s/step", "FLOP/step", "achieved", "of peak", "speed-up"], rows))
    print(f"f32 matmul peak [{MATMUL_N}]^2: " + ", ".join(f"{k} {common.si(v, 'FLOP/s')}" for k, v in
                                                          peak_rate.items())
          + f"; machine peak = {common.si(machine_peak, 'FLOP/s')}")
    print(f"our FLOPs: XLA {common.si(our_flops, 'FLOP')} (all ops), analytic matmuls "
          f"{common.si(analytic, 'FLOP')}; the peer's count is matmuls only (mm/addmm/bmm/sdpa)")
    print(f"our log-mel: model.audio.dft = {dft!r}")
    print(DIFFERENCES.format(recon_video=info["recon_video_params"], recon_audio=info["recon_audio_params"]))
    checks = []
    for name in ours:
        ratio = common.median(summary_ratio[name])
        rate = our_flops / common.median(times[name])
        checks += [
            common.check(f"{name}: peer step / our step", f"{ratio:.2f}x", ">= 2.0x", ratio >= 2.0),
            common.check(f"{name}: achieved / machine f32 matmul peak",
                         f"{rate / machine_peak:.0%} ({common.si(rate, 'FLOP/s')} of "
                         f"{common.si(machine_peak, 'FLOP/s')})", ">= 50%", rate >= 0.5 * machine_peak)]
    peer_rate = peer_flops["flops"] / common.median(peer_times)
    checks.append(common.check("peer: achieved / torch f32 matmul peak",
                               f"{peer_rate / peak_rate['torch']:.0%} ({common.si(peer_rate, 'FLOP/s')})"))
    print("targets:")
    for c in checks:
        verdict = "" if c["met"] is None else ("  met" if c["met"] else "  NOT met")
        print(f"  {c['figure']}: {c['value']}" + (f" (target {c['target']}){verdict}" if c["target"] else ""))
    common.write_summary(args.summary, "peer_train_step", checks)

    if not args.no_write:
        figures = [f"batch {batch}; peer {info['params'] / 1e6:.1f} M params "
                   f"({(info['recon_video_params'] + info['recon_audio_params']) / 1e6:.1f} M in reconstruction "
                   f"heads), ours {next(iter(ours.values())).num_params / 1e6:.1f} M",
                   f"peer {common.median(peer_times):.2f} s/step, {common.si(peer_flops['flops'], 'FLOP')}, "
                   f"{peer_flops['flops'] / common.median(peer_times) / machine_peak:.0%} of peak",
                   *figures,
                   f"ours {common.si(our_flops, 'FLOP')} (XLA), dft={dft}",
                   f"peak {common.si(machine_peak, 'FLOP/s')} (jax {common.si(peak_rate['jax'], 'FLOP/s')}, "
                   f"torch {common.si(peak_rate['torch'], 'FLOP/s')})"]
        common.write_row("peer_train_step", "; ".join(figures), machine)


if __name__ == "__main__":
    main()
