"""Writing real encoded media files (test clips, the synthetic dataset) with the ffmpeg that
imageio-ffmpeg ships: frames go through `imageio_ffmpeg.write_frames`, audio through a temporary
16-bit WAV that the same ffmpeg process muxes in. Names are passed as list arguments, never
through a shell, and as absolute paths so a name starting with "-" is not read as an option."""

from __future__ import annotations

import functools
import os
import subprocess
import tempfile
import wave
from fractions import Fraction

import numpy as np

from mirasol3b_data.storage import audio_to_int16

# Container -> (video codec, audio codec) used when the caller names none.
_DEFAULT_CODECS = {
    ".mp4": ("libx264", "aac"),
    ".m4v": ("libx264", "aac"),
    ".mov": ("libx264", "aac"),
    ".mkv": ("libx264", "aac"),
    ".avi": ("libx264", "libmp3lame"),
    ".webm": ("libvpx-vp9", "libopus"),
}
# Speed over size: these clips are small and made often (tests, synthetic data).
_SPEED_PARAMS = {
    "libx264": ["-preset", "ultrafast"],
    "libvpx-vp9": ["-deadline", "realtime", "-cpu-used", "8", "-b:v", "0"],
    "libvpx": ["-deadline", "realtime", "-cpu-used", "8", "-b:v", "1M"],
}


def ffmpeg_exe() -> str:
    """Path of the ffmpeg binary bundled with imageio-ffmpeg."""
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


@functools.lru_cache(maxsize=None)
def _encoders() -> frozenset[str]:
    out = subprocess.run([ffmpeg_exe(), "-hide_banner", "-encoders"], capture_output=True, text=True, check=True)
    names = set()
    for line in out.stdout.splitlines():
        parts = line.split()
        # Encoder lines look like " V....D libx264   description"; the legend above has "=".
        if len(parts) >= 2 and len(parts[0]) == 6 and parts[0][0] in "VAS" and "=" not in line:
            names.add(parts[1])
    return frozenset(names)


def _write_wav(path: str, audio: np.ndarray, sample_rate: int) -> None:
    pcm = audio_to_int16(audio).astype("<i2")
    with wave.open(path, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(int(sample_rate))
        w.writeframes(pcm.tobytes())


def write_clip(path: str | os.PathLike, frames: np.ndarray, fps: float | Fraction, audio: np.ndarray | None,
               sample_rate: int, *, video_codec: str | None = None, audio_codec: str | None = None,
               crf: int = 18) -> None:
    """Encode `frames` uint8 [N, H, W, 3] (H, W even) at `fps` and mono `audio` float32 [S] in [-1, 1]
    at `sample_rate` (None: the file gets no audio track) into `path`.

    Codecs default by container: h264/aac for .mp4/.m4v/.mov/.mkv, h264/mp3 for .avi, vp9/opus for
    .webm. `fps` may be a Fraction (e.g. Fraction(30000, 1001)); a float is turned into the nearest
    simple fraction, so 30000/1001 survives. Raises ValueError for bad input or a codec the bundled
    ffmpeg lacks, RuntimeError if ffmpeg fails.
    """
    import imageio_ffmpeg

    path = os.path.abspath(os.fspath(path))
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in _DEFAULT_CODECS:
        raise ValueError(f"write_clip: unsupported container {suffix!r} for {path}; "
                         f"use one of {sorted(_DEFAULT_CODECS)}")
    default_video, default_audio = _DEFAULT_CODECS[suffix]
    video_codec = video_codec or default_video
    audio_codec = audio_codec or default_audio
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or not len(frames):
        raise ValueError(f"write_clip: frames must be uint8 [N, H, W, 3] with N >= 1, "
                         f"got {frames.dtype} {frames.shape}")
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        raise ValueError(f"write_clip: yuv420p needs even frame sizes, got {width}x{height}")
    needed = [video_codec] + ([audio_codec] if audio is not None else [])
    missing = [c for c in needed if c not in _encoders()]
    if missing:
        raise ValueError(f"write_clip: the bundled ffmpeg ({ffmpeg_exe()}) has no encoder {missing} for {suffix}")
    rate = fps if isinstance(fps, Fraction) else Fraction(fps).limit_denominator(100_000)

    output_params = list(_SPEED_PARAMS.get(video_codec, []))
    if video_codec.startswith(("libx264", "libvpx")):
        output_params += ["-crf", str(crf)]
    if os.path.exists(path):
        os.remove(path)  # so that a failed ffmpeg run cannot leave an old file looking like the result
    with tempfile.TemporaryDirectory(prefix="write_clip_") as tmp:
        audio_path = None
        if audio is not None:
            audio = np.asarray(audio, dtype=np.float32)
            if audio.ndim != 1:
                raise ValueError(f"write_clip: audio must be mono [S], got shape {audio.shape}")
            audio_path = os.path.join(tmp, "audio.wav")
            _write_wav(audio_path, audio, sample_rate)
        writer = imageio_ffmpeg.write_frames(
            path, (width, height), fps=rate, codec=video_codec, pix_fmt_in="rgb24", pix_fmt_out="yuv420p",
            quality=None, macro_block_size=1, ffmpeg_log_level="error", output_params=output_params,
            audio_path=audio_path, audio_codec=audio_codec if audio is not None else None)
        try:
            writer.send(None)  # start ffmpeg
            for frame in frames:
                writer.send(np.ascontiguousarray(frame))
        except OSError as e:
            raise RuntimeError(f"write_clip: ffmpeg failed writing {path}: {e}") from e
        finally:
            writer.close()
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        raise RuntimeError(f"write_clip: ffmpeg wrote nothing to {path}")
