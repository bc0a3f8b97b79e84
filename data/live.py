"""Reading a live source snippet by snippet: a file (at its own pace, or in real time), a pipe (`-`,
such as ffmpeg writing MPEG-TS to stdout), or any URL or device PyAV opens (rtsp://, http://,
/dev/video0).

Frames and audio go through the tracks of `media.decode_clip` (`tracks.VideoTrack`,
`tracks.AudioTrack`): the same timestamps, frame choice, resizing, resampling and placement, so
snippet k of a file read live is snippet k of its decoded clip (tests/test_live.py). What differs
is only what a stream needs: frames are handed on as soon as a snippet is whole, and audio
already placed is forgotten, so memory stays bounded however long the stream runs.

A source that stalls (no snippet for `stall_seconds`), cannot be read further, or ends is reported by
`LiveStopped` with the stream time reached; every snippet before it was yielded.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import sys
import threading
import time
from collections.abc import Iterator
from fractions import Fraction

import av
import numpy as np

from mirasol3b import errors
# _AUDIO_MARGIN: audio is placed this far past a snippet's end before the snippet is handed on (the
# resampler's edge then falls outside it), and earlier audio is kept this far back, as decode_clip does.
from mirasol3b_data.media import _AUDIO_MARGIN, MediaError, audio_stream_of, video_stream_of
from mirasol3b_data.spec import MediaSpec
from mirasol3b_data.tracks import AudioTrack, VideoTrack

# A snippet whose audio has not arrived by the time the video is this far past its end goes on with
# what there is (silence where none): an audio track that stops must not hold the video back.
AUDIO_WAIT = Fraction(1)
STALL_SECONDS = 10.0
LIVE_REASONS = ("ended", "stalled", "unreadable", "corrupt")


class LiveStopped(errors.Error):
    """The source stopped: `reason` (one of `LIVE_REASONS`), `reached` (seconds of stream handed on)."""

    def __init__(self, source: str, reason: str, reached: float, detail: str):
        super().__init__(f"{source}: {reason} at {reached:.2f} s of stream: {detail}")
        self.source, self.reason, self.reached, self.detail = source, reason, reached, detail


@dataclasses.dataclass
class Snippet:
    index: int
    start: float  # seconds from the stream's first frame
    end: float
    video: np.ndarray  # uint8 [snippet_frames, image_size, image_size, 3]
    audio: np.ndarray  # float32 [samples_per_snippet] in [-1, 1]
    audio_coverage: float  # fraction of the samples that real audio covered (the rest is silence)


def _open(source: str, source_format: str | None, stall_seconds: float):
    fmt = source_format or ("v4l2" if source.startswith("/dev/video") else None)
    try:
        if source == "-":
            # Its own unbuffered handle on stdin's descriptor: a reader blocked in it holds no lock
            # of sys.stdin's, which the interpreter must take to shut down.
            raw = os.fdopen(os.dup(sys.stdin.buffer.fileno()), "rb", buffering=0)
            return av.open(raw, format=fmt, metadata_errors="ignore")
        # `timeout`: PyAV interrupts any open or read that blocks this long (a network source).
        return av.open(source, format=fmt, metadata_errors="ignore", timeout=stall_seconds)
    except av.error.ExitError as e:
        raise LiveStopped(source, "stalled", 0.0, f"opening it took longer than {stall_seconds:g} s") from e
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise LiveStopped(source, "unreadable", 0.0, f"cannot open it: {e}") from e


class _Reader:
    """Demuxes and decodes in a thread (a blocked read must not block the caller's stall check)
    and puts each whole snippet, then one `LiveStopped`, on a queue."""

    def __init__(self, source: str, spec: MediaSpec, source_format: str | None, stall_seconds: float):
        self.source, self.spec = source, spec
        self.source_format, self.stall_seconds = source_format, stall_seconds
        self.container = None
        self.queue: queue.Queue = queue.Queue(maxsize=64)
        self.stop = threading.Event()
        self.emitted = 0

    @property
    def reached(self) -> float:
        return self.emitted * self.spec.snippet_frames / self.spec.fps

    def run(self) -> None:
        try:  # opening too: probing a pipe blocks until enough of it arrives
            self.container = _open(self.source, self.source_format, self.stall_seconds)
            stopped = self._read()
        except LiveStopped as e:
            stopped = e
        except Exception as e:  # the thread's safety net: any failure is reported, never lost
            stopped = LiveStopped(self.source, "corrupt", self.reached, f"{type(e).__name__}: {e}")
        finally:
            if self.container is not None:
                self.container.close()
        self.queue.put(stopped)

    def _read(self) -> LiveStopped:
        video_stream = video_stream_of(self.source, self.container)
        if video_stream is None:
            return LiveStopped(self.source, "unreadable", 0.0, "no video stream")
        audio_stream = audio_stream_of(self.container)
        video = VideoTrack(video_stream, self.spec, Fraction(0))
        audio = AudioTrack(audio_stream, self.spec.sample_rate) if audio_stream is not None else None
        streams = [video_stream] + ([audio_stream] if audio_stream is not None else [])
        packets = iter(self.container.demux(*streams))
        while not self.stop.is_set():
            try:
                packet = next(packets, None)
                if packet is None:
                    break
                (video if packet.stream.index == video_stream.index else audio).packet(packet)
            except av.error.ExitError:
                return LiveStopped(self.source, "stalled", self.reached, "a read blocked past the stall limit")
            except (av.error.FFmpegError, MediaError, OSError) as e:  # OSError: EAGAIN from a decoder fed garbage
                return LiveStopped(self.source, "corrupt", self.reached, f"{type(e).__name__}: {e}")
            self._emit(video, audio, final=False)
        if self.stop.is_set():
            return LiveStopped(self.source, "ended", self.reached, "closed")
        try:
            video.packet(None)
            if audio is not None:
                audio.packet(None)
        except av.error.FFmpegError as e:
            return LiveStopped(self.source, "corrupt", self.reached, f"flushing the decoder: {e}")
        video.finish()
        self._emit(video, audio, final=True)
        left = (video.end - video.target(video.taken)) if video.end is not None and video.origin is not None else 0
        return LiveStopped(self.source, "ended", self.reached,
                           f"end of stream ({max(0.0, float(left)):.2f} s after the last whole snippet not used)")

    def _emit(self, video: VideoTrack, audio: AudioTrack | None, final: bool) -> None:
        spec, frames = self.spec, self.spec.snippet_frames
        seconds = Fraction(frames) / Fraction(str(spec.fps))
        while video.count >= video.taken + frames and not self.stop.is_set():
            start = self.emitted * seconds
            end_time = video.origin + start + seconds
            if final and video.reach < end_time:  # the last frames do not fill the snippet
                return
            ready = (audio is None or final or (audio.end is not None and audio.end >= end_time + _AUDIO_MARGIN)
                     or video.end >= end_time + AUDIO_WAIT)
            if not ready:
                return
            if audio is not None:
                samples, covered = audio.place(video.origin, start, spec.samples_per_snippet, spec.sample_rate)
                audio.forget_before(end_time - _AUDIO_MARGIN)
            else:
                samples, covered = np.zeros(spec.samples_per_snippet, np.float32), np.zeros(1, bool)
            snippet = Snippet(self.emitted, float(start), float(start + seconds), video.take(frames), samples,
                              float(covered.mean()))
            self.emitted += 1
            self.queue.put(snippet)


def snippets(source: str, spec: MediaSpec, *, realtime: bool = False, stall_seconds: float = STALL_SECONDS,
             source_format: str | None = None) -> Iterator[Snippet]:
    """Yields the snippets of `source` as they become whole (`spec.num_frames` is not a limit
    here), then raises `LiveStopped` (reason "ended" when the source ended). `realtime`: hand each
    snippet on no sooner than its end time after the first (a file read as if live)."""
    reader = _Reader(source, dataclasses.replace(spec, num_frames=spec.snippet_frames * 10 ** 9), source_format,
                     stall_seconds)
    thread = threading.Thread(target=reader.run, name="live-reader", daemon=True)
    thread.start()
    began = time.monotonic()
    try:
        while True:
            try:
                item = reader.queue.get(timeout=stall_seconds)
            except queue.Empty:
                raise LiveStopped(source, "stalled", reader.reached,
                                  f"no new snippet for {stall_seconds:g} s") from None
            if isinstance(item, LiveStopped):
                raise item
            if realtime:
                time.sleep(max(0.0, item.end - (time.monotonic() - began)))
            yield item
    finally:
        reader.stop.set()  # a reader blocked in a read stays so (a daemon thread) until the source gives
