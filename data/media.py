"""Decoding a media file into an aligned clip: the one decode path every dataset builder uses.

`decode_clip(path, spec)` reads a file with PyAV in one pass and returns whole snippets of
frames resampled to `spec.fps`, resized and centre-cropped to `spec.image_size`, and mono audio at
`spec.sample_rate`, both on the same clock so that snippet k's frames and samples cover the same
time span. A file that cannot become an example raises `MediaError` with a stable `reason`.

Time. Every timestamp is taken from the streams (pts * time_base), never from frame counts, and
measured from the video stream's start (`origin`): the clip begins with the first picture.
  Video: target frame i is the last source frame whose pts <= start + i / spec.fps.
  Audio: each decoded frame is placed at its own pts, so AAC priming/padding and gaps in the
  track do not shift the sound; where no audio sample lands, the clip holds zeros.
Audio that ends early. If the placed audio covers at least `MIN_AUDIO_COVERAGE` of the kept
window, the uncovered rest stays silent (zeros) and the clip counts as having audio; below that
the track is treated as missing: `spec.missing_audio == "skip"` raises "no_audio_track",
"silence" returns an all-zero track with `audio_missing=True`.
Truncation. A file is "truncated" when reading or video decoding fails after some frames, when an
mp4 ends before its index (moov) was written, when it holds fewer video frames than its header
lists (2% slack), or when its media ends well before the header's duration (> max(0.25 s, 2%)).
Files with no duration in the header (live-recorded webm) are measured by demuxing to the end;
past the window, packets are only timed, not decoded.
Damage. A damaged file (cut anywhere, bytes overwritten, another format under a video name) raises
MediaError, never another exception, and a file that takes longer than the time limit raises
"timed_out" instead of blocking its worker.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import tempfile
import time
from fractions import Fraction

import av
import numpy as np

from mirasol3b import errors
from mirasol3b_data.spec import MediaSpec
from mirasol3b_data.tracks import AudioTrack, VideoTrack

MEDIA_EXTENSIONS = (".mp4", ".webm", ".mkv", ".mov", ".avi", ".m4v", ".ogv", ".ts")  # .ts: MPEG-TS (broadcast, streams)
REASONS = ("not_found", "empty_file", "wrong_extension", "undecodable", "truncated", "no_video_stream",
           "no_audio_track", "too_short", "timed_out", "unreadable")
# Per-file time limit. Only the window is decoded and the rest of the file is demuxed without
# decoding to find its end, so a healthy file takes seconds, an hour-long one of a few GB on a slow
# network mount some tens of seconds; 120 s leaves that a margin while a read stuck on a dead mount
# or a pathological file still frees its worker within minutes. PyAV's interrupt callback stops any
# blocking read after this long and the packet loop checks the total, so a call ends within about
# twice this (one decode call or a seek in progress is not interrupted).
DECODE_TIMEOUT_SECONDS = 120.0
# Below this fraction of the kept window covered by real audio samples, the track counts as missing.
MIN_AUDIO_COVERAGE = 0.5
# Audio is decoded this far either side of the window so resampler edges fall outside it.
_AUDIO_MARGIN = Fraction(1, 5)
# Decoding from the file start wastes time only when the window starts late; then seek this
# far before it (to the keyframe at or before that point).
_SEEK_AFTER = 10.0
_SEEK_LEAD = Fraction(1)


class MediaError(errors.Error):
    """A file that cannot become an example. `reason` is a short stable code (one of `REASONS`),
    `detail` says what happened."""

    def __init__(self, path: str, reason: str, detail: str):
        if reason not in REASONS:
            raise ValueError(f"unknown MediaError reason {reason!r}")
        super().__init__(f"{path}: {reason}: {detail}")
        self.path, self.reason, self.detail = str(path), reason, detail

    def __reduce__(self):  # keeps the three fields through pickling (multiprocessing builders)
        return MediaError, (self.path, self.reason, self.detail)


@dataclasses.dataclass
class Clip:
    video: np.ndarray  # uint8 [num_snippets * snippet_frames, image_size, image_size, 3]
    audio: np.ndarray  # float32 [num_snippets * samples_per_snippet], mono at spec.sample_rate, in [-1, 1]
    num_snippets: int  # 1..spec.max_snippets
    audio_missing: bool  # True: the file had no (usable) audio and silence was filled in
    source_fps: float  # frames seen / seconds of video they span, from the timestamps
    source_sample_rate: int | None  # rate of the audio track; None if the file has none
    duration: float  # seconds of video actually decoded/demuxed from the file, from its first frame


# ------------------------------------------------------------------------------------------ files


def _check_file(path: str) -> None:
    if not os.path.exists(path):
        raise MediaError(path, "not_found", "no such file")
    if not os.path.isfile(path):
        raise MediaError(path, "not_found", "not a regular file")
    if os.path.getsize(path) == 0:
        raise MediaError(path, "empty_file", "the file has zero bytes")
    if not path.lower().endswith(MEDIA_EXTENSIONS):
        raise MediaError(path, "wrong_extension",
                         f"{os.path.splitext(path)[1] or 'no extension'} is not a video container {MEDIA_EXTENSIONS}")


def _mp4_cut_off(path: str) -> bool:
    """True for an ISO-BMFF file (mp4/mov) that starts well but ends inside a top-level box before
    any index (moov) was written: a recording or copy that stopped early."""
    size = os.path.getsize(path)
    offset, kinds = 0, []
    with open(path, "rb") as f:
        while offset + 8 <= size:
            f.seek(offset)
            header = f.read(16)
            box_size, kind = int.from_bytes(header[:4], "big"), header[4:8]
            if box_size == 1 and len(header) == 16:  # 64-bit size follows the type
                box_size = int.from_bytes(header[8:16], "big")
            if not kinds and kind != b"ftyp":
                return False
            kinds.append(kind)
            if box_size < 8:  # 0 means "to the end of the file"; anything else below 8 is not a box
                break
            offset += box_size
    return b"moov" not in kinds and offset > size


class _Deadline:
    """The per-file time limit, on the monotonic clock (threads cannot use signal.alarm)."""

    def __init__(self, path: str, seconds: float):
        self.path, self.seconds = path, seconds
        self.at = time.monotonic() + seconds

    def remaining(self) -> float:
        return max(0.0, self.at - time.monotonic())

    def check(self, what: str) -> None:
        if time.monotonic() > self.at:
            raise self.error(what)

    def error(self, what: str) -> MediaError:
        return MediaError(self.path, "timed_out", f"{what} took longer than the {self.seconds:g} s limit")


def _open(path: str, deadline: _Deadline):
    try:
        # `timeout` installs PyAV's interrupt callback: opening, probing, and each later read
        # (demux) stop with ExitError once one of them blocks for this long.
        return av.open(path, metadata_errors="ignore", timeout=deadline.remaining())
    except av.error.ExitError as e:
        raise deadline.error("opening the file") from e
    except av.error.FFmpegError as e:
        if _mp4_cut_off(path):
            raise MediaError(path, "truncated", f"mp4 cut off before its index (moov) was written: {e}") from e
        raise MediaError(path, "undecodable", f"cannot open: {e}") from e
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise MediaError(path, "undecodable", f"cannot open: {e}") from e


def video_stream_of(path: str, container):
    """The first video stream that is not cover art. A stream without a decoder (its header is
    too damaged to name a codec, or this FFmpeg lacks it) is skipped; if that leaves none, the
    file is undecodable."""
    streams = [s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
    if not streams:
        return None
    for stream in streams:
        if stream.codec_context is not None:
            return stream
    raise MediaError(path, "undecodable", "no decoder for the video stream (a damaged header or an unsupported codec)")


def decode_clip(path: str | os.PathLike, spec: MediaSpec, start_seconds: float = 0.0, *,
                timeout_seconds: float | None = None, threads: int = 0) -> Clip:
    """Decodes whole snippets of `path` from `start_seconds` (measured from the first frame) on,
    at most `spec.max_snippets` of them, within `timeout_seconds` (None: DECODE_TIMEOUT_SECONDS).
    `threads`: FFmpeg's decoding threads per stream (0: as many as it sees fit; 1 where the
    caller runs one decode per core itself, as Beam workers do). Raises MediaError; see the
    module docstring for timing. `path` may be in a bucket (`gs://...`): it is copied to a local
    temporary file first, and errors name it as given."""
    path = os.fspath(path)
    if "://" in path:
        return _decode_remote(path, spec, start_seconds, timeout_seconds=timeout_seconds, threads=threads)
    start = Fraction(start_seconds).limit_denominator(1_000_000)
    if start < 0:
        raise ValueError(f"decode_clip: start_seconds must be >= 0, got {start_seconds}")
    timeout = DECODE_TIMEOUT_SECONDS if timeout_seconds is None else timeout_seconds
    if not timeout > 0:
        raise ValueError(f"decode_clip: timeout_seconds must be > 0, got {timeout_seconds}")
    deadline = _Deadline(path, timeout)
    try:
        _check_file(path)  # inside: a file removed between its checks is a MediaError too
        with _open(path, deadline) as container:
            return _decode(path, container, spec, start, deadline, threads)
    except MediaError:
        raise
    except (av.error.FFmpegError, OSError, ValueError, RuntimeError) as e:
        raise MediaError(path, "undecodable", f"{type(e).__name__}: {e}") from e
    except MemoryError as e:  # a damaged header can claim a frame or table too large to allocate
        raise MediaError(path, "undecodable", f"out of memory while decoding: {e}") from e
    except Exception as e:
        # Safety net: a caller gets a MediaError for any file. "unexpected" marks a cause not
        # handled above; the fuzz tests fail on it, so each new one gets its own fix.
        raise MediaError(path, "undecodable", f"unexpected {type(e).__name__} in the decoder: {e}") from e


def audio_stream_of(container):
    """The first audio stream with a decoder, or None: a track whose header is too damaged to name
    a codec, or whose codec this FFmpeg lacks, is not read."""
    return next((s for s in container.streams.audio if s.codec_context is not None), None)


def _decode_remote(uri: str, spec: MediaSpec, start_seconds: float, **kwargs) -> Clip:
    """`decode_clip` of a file in a bucket: PyAV reads local files, so it is copied to a temporary one."""
    from etils import epath

    try:
        source = epath.Path(uri)
        if not source.exists():
            raise MediaError(uri, "not_found", "no such object")
        with tempfile.TemporaryDirectory(prefix="decode_clip_") as tmp:
            local = os.path.join(tmp, "clip" + os.path.splitext(uri)[1])
            with source.open("rb") as src, open(local, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
            try:
                return decode_clip(local, spec, start_seconds, **kwargs)
            except MediaError as e:
                raise MediaError(uri, e.reason, e.detail.replace(local, uri)) from None
    except MediaError:
        raise
    except Exception as e:  # the bucket's client: permissions, network
        raise MediaError(uri, "unreadable", f"cannot read it: {type(e).__name__}: {e}") from e


def _decode(path: str, container, spec: MediaSpec, start: Fraction, deadline: _Deadline, threads: int) -> Clip:
    video_stream = video_stream_of(path, container)
    if video_stream is None:
        raise MediaError(path, "no_video_stream", f"streams: {[s.type for s in container.streams] or 'none'}")
    audio_stream = audio_stream_of(container)
    video = VideoTrack(video_stream, spec, start)
    audio = AudioTrack(audio_stream, spec.sample_rate) if audio_stream is not None else None
    for stream in (video_stream, audio_stream):
        if stream is not None:
            stream.thread_type = "AUTO"
            stream.thread_count = threads

    seeked = start > _SEEK_AFTER and video.origin is not None
    if seeked:
        target = video.origin + start - _SEEK_LEAD
        container.seek(int(target / video.tb), stream=video_stream, backward=True)

    failure = _read(container, video, audio, start, deadline)
    if audio is not None:
        audio.packet(None)
    video.finish()

    if not video.decoded:
        raise MediaError(path, "undecodable", "no video frame could be decoded"
                                              + (f" ({failure[0]}: {failure[1]})" if failure else ""))
    if failure:
        raise MediaError(path, "truncated", f"{failure[0]} failed after {video.decoded} frames: {failure[1]}")
    _check_complete(path, container, video_stream, video, audio, seeked)

    clip_start = video.origin + start
    usable = video.end - clip_start
    num_snippets = min(spec.max_snippets, max(0, math.floor((video.reach - clip_start) * video.fps
                                                            / spec.snippet_frames)))
    if num_snippets < 1:
        raise MediaError(path, "too_short", f"{float(max(usable, 0)):.3f} s of video from {float(start):.3f} s; "
                                            f"one snippet needs {spec.snippet_seconds:.3f} s")
    num_frames = num_snippets * spec.snippet_frames
    num_samples = num_snippets * spec.samples_per_snippet
    assert len(video.images) >= num_frames, (len(video.images), num_frames)

    samples, coverage = (audio.place(video.origin, start, num_samples, spec.sample_rate) if audio is not None
                         else (np.zeros(num_samples, np.float32), np.zeros(num_samples, bool)))
    covered = float(coverage.mean())
    audio_missing = covered < MIN_AUDIO_COVERAGE
    if audio_missing:
        what = ("the file has no audio track" if not container.streams.audio else
                "no decoder for the audio track (a damaged header or an unsupported codec)" if audio is None else
                f"audio covers only {covered:.0%} of the {num_samples / spec.sample_rate:.2f} s window"
                + (f" ({audio.errors} audio packets failed to decode)" if audio.errors else ""))
        if spec.missing_audio == "skip":
            raise MediaError(path, "no_audio_track", what)
        samples = np.zeros(num_samples, np.float32)

    span = video.end - video.first
    return Clip(
        video=np.stack(video.images[:num_frames]),
        audio=samples,
        num_snippets=num_snippets,
        audio_missing=audio_missing,
        source_fps=float(video.packets / span) if span > 0 else float(video_stream.average_rate or 0),
        source_sample_rate=audio_stream.sample_rate if audio_stream is not None else None,
        duration=float(video.end - video.origin),
    )


def _read(container, video: VideoTrack, audio: AudioTrack | None, start: Fraction,
          deadline: _Deadline) -> tuple[str, Exception] | None:
    """Feeds every packet to its track, then flushes the video decoder. Returns what stopped the
    pass early (reading the file or decoding the video, and the error), or None. Raises
    "timed_out" past the deadline."""
    streams = [video.stream] + ([audio.stream] if audio is not None else [])
    packets = iter(container.demux(*streams))
    while True:
        deadline.check(f"reading and decoding (after {video.packets} video packets)")
        try:
            packet = next(packets, None)
        except av.error.ExitError as e:  # the interrupt callback: one read blocked past the limit
            raise deadline.error(f"a read (after {video.packets} video packets)") from e
        except av.error.FFmpegError as e:
            return "reading", e
        if audio is not None and audio.decode_until is None and video.origin is not None:
            audio.decode_from = video.origin + start - _AUDIO_MARGIN
            audio.decode_until = video.window_end + _AUDIO_MARGIN
        try:
            if packet is None or packet.stream.index == video.stream.index:
                video.packet(packet)
            else:
                audio.packet(packet)
        except av.error.FFmpegError as e:
            return "decoding video", e
        if packet is None:
            return None


def _check_complete(path, container, video_stream, video: VideoTrack, audio: AudioTrack | None, seeked: bool) -> None:
    """Raises "truncated" when the file holds far less than its header promises."""
    promised = video_stream.frames
    if promised and not seeked and video.packets < promised - max(1, promised // 50):
        raise MediaError(path, "truncated", f"{video.packets} video frames of the {promised} the header lists")
    if container.duration:
        header_end = Fraction(container.duration, av.time_base) + Fraction(container.start_time or 0, av.time_base)
        ends = [video.end] + ([audio.end] if audio is not None and audio.end is not None else [])
        present = max(ends)
        if header_end - present > max(Fraction(1, 4), header_end / 50):
            raise MediaError(path, "truncated", f"media ends at {float(present):.2f} s, the header says "
                                                f"{float(header_end):.2f} s")
