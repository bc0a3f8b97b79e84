"""Clips that look and sound like real recordings, for the data benchmarks (`data_build.py`,
`input_pipeline.py`): what codecs and decoders see in users' files, at sizes chosen here.

Picture: a textured background (a sum of random low-frequency waves and fine detail) under a slow camera pan, a
global lighting drift, three textured blobs moving on smooth random paths, and sensor noise (sigma
2 of 255). Sound: pink-ish noise, harmonic tones with vibrato that start and stop, and bursts of
band-passed noise at a syllable rate (about 4 a second), as in speech. H.264 (CRF 23, the x264
default quality) with AAC, written by `mirasol3b_data.encode.write_clip`.
"""

from __future__ import annotations

import os

import numpy as np

from mirasol3b_data.encode import write_clip


def _field(rng: np.random.Generator, height: int, width: int, waves: int = 12) -> np.ndarray:
    """float32 [H, W, 3] in about [0, 255]: a sum of random low-frequency plane waves per channel."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    out = np.zeros((height, width, 3), np.float32)
    for c in range(3):
        for _ in range(waves):
            k = rng.uniform(0.004, 0.06) * np.array([np.cos(a := rng.uniform(0, np.pi)), np.sin(a)])
            out[..., c] += rng.uniform(6, 18) * np.sin(k[0] * x + k[1] * y + rng.uniform(0, 2 * np.pi))
    return out + rng.uniform(70, 170, 3)


def render_video(seconds: float, fps: int, size: tuple[int, int], seed: int) -> np.ndarray:
    """uint8 [round(seconds * fps), H, W, 3]."""
    rng = np.random.default_rng(seed)
    width, height = size
    frames = int(round(seconds * fps))
    pan = rng.uniform(-40, 40, 2)  # pixels a second
    margin = int(np.ceil(np.abs(pan).max() * seconds)) + 2
    background = _field(rng, height + 2 * margin, width + 2 * margin)
    # Fine detail that moves with the scene (foliage, fabric, gravel): what makes real frames cost bits.
    detail = rng.normal(0, 7, background.shape[:2] + (1,)).astype(np.float32)
    background += (detail + np.roll(detail, 1, 0) + np.roll(detail, 1, 1) + np.roll(detail, (1, 1), (0, 1))) / 2
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    blobs = [dict(radius=rng.uniform(0.06, 0.14) * height, texture=_field(rng, height, width, 6) * 0.9 + 20,
                  path=rng.uniform(0, 2 * np.pi, 4), speed=rng.uniform(0.1, 0.4, 2)) for _ in range(3)]
    out = np.empty((frames, height, width, 3), np.uint8)
    for i in range(frames):
        t = i / fps
        dy, dx = (margin + pan * t).astype(int)
        frame = background[dy:dy + height, dx:dx + width] * (1 + 0.08 * np.sin(0.3 * t))
        for b in blobs:
            cy = height * (0.5 + 0.35 * np.sin(b["speed"][0] * t + b["path"][0]))
            cx = width * (0.5 + 0.4 * np.sin(b["speed"][1] * t + b["path"][1]))
            inside = ((y - cy) ** 2 + (x - cx) ** 2 < b["radius"] ** 2)[..., None]
            frame = np.where(inside, b["texture"], frame)
        frame = frame + rng.normal(0, 2.0, frame.shape)
        out[i] = np.clip(frame, 0, 255).astype(np.uint8)
    return out


def render_audio(seconds: float, sample_rate: int, seed: int) -> np.ndarray:
    """float32 [seconds * sample_rate] in [-1, 1]."""
    rng = np.random.default_rng(seed + 1)
    n = int(round(seconds * sample_rate))
    t = np.arange(n, dtype=np.float32) / sample_rate
    spectrum = np.fft.rfft(rng.normal(0, 1, n))
    spectrum /= np.sqrt(np.maximum(np.fft.rfftfreq(n, 1 / sample_rate), 20.0))  # 1/f power
    audio = 0.05 * np.fft.irfft(spectrum, n) / (np.abs(np.fft.irfft(spectrum, n)).max() + 1e-9)
    for _ in range(4):  # tones that come and go
        f0, start = rng.uniform(110, 880), rng.uniform(0, seconds)
        length = rng.uniform(1, max(1.5, seconds / 3))
        envelope = np.clip(np.minimum(t - start, start + length - t) * 5, 0, 1)
        phase = 2 * np.pi * f0 * t + 3 * np.sin(2 * np.pi * 5 * t)
        audio += 0.08 * envelope * sum(np.sin(k * phase) / k for k in (1, 2, 3))
    syllables = np.clip(np.sin(2 * np.pi * 4.1 * t + rng.uniform(0, 6)), 0, None) ** 2
    voiced = np.fft.irfft(np.fft.rfft(rng.normal(0, 1, n)) * (np.abs(np.fft.rfftfreq(n, 1 / sample_rate) - 900) < 600), n)
    audio += 0.15 * syllables * voiced / (np.abs(voiced).max() + 1e-9)
    return np.clip(audio, -1, 1).astype(np.float32)


def make_clip(path: str, seconds: float, seed: int, *, size: tuple[int, int] = (640, 360), fps: int = 25,
              sample_rate: int = 44_100) -> None:
    """Writes a clip of `seconds` to `path` (.mp4: H.264 + AAC) unless it is there."""
    if os.path.exists(path):
        return
    write_clip(path + ".part.mp4", render_video(seconds, fps, size, seed), fps, render_audio(seconds, sample_rate, seed),
               sample_rate, crf=23)
    os.replace(path + ".part.mp4", path)
