"""The two tracks of one decode (`media.decode_clip`): the video track picks the target frames out of
the decoded stream and measures where it ends; the audio track collects decoded audio near the
window as runs of contiguous samples, each placed at its own timestamp (the module docstring of
`media.py` says how time is kept)."""

from __future__ import annotations

import dataclasses
from fractions import Fraction

import av
import numpy as np

from mirasol3b_data.spec import MediaSpec

# Consecutive audio frames whose timestamps differ from the running sample count by more than
# this start a new placed run (a real gap or overlap), rather than being concatenated.
_AUDIO_GAP = Fraction(1, 200)


def _flush(stream) -> list:
    """Frames still buffered in the stream's decoder; none if the demuxer's final empty packet
    already drained it, or if the stream has no decoder (a damaged header names no codec)."""
    if stream.codec_context is None:
        return []
    try:
        return stream.codec_context.decode(None)
    except av.error.EOFError:
        return []


def _seconds(ts: int | None, time_base: Fraction) -> Fraction | None:
    return None if ts is None else ts * time_base


# ----------------------------------------------------------------------------------------- video


def _frame_to_image(frame: av.VideoFrame, size: int, sample_aspect: Fraction) -> np.ndarray:
    """Display-correct RGB image of `frame`: pixel aspect and rotation applied, shorter side resized
    to `size`, centre crop. Returns uint8 [size, size, 3]."""
    width = frame.width * sample_aspect  # display width of the stored (unrotated) picture
    scale = Fraction(size) / min(width, frame.height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(frame.height * scale))
    # AREA averages when shrinking (no aliasing); it degrades to bilinear-like when enlarging.
    image = frame.reformat(width=new_w, height=new_h, format="rgb24", interpolation="AREA").to_ndarray()
    # The display matrix says how far the picture is turned counter-clockwise when stored.
    quarter_turns = round((frame.rotation or 0) / 90) % 4
    image = np.rot90(image, quarter_turns)
    top, left = (image.shape[0] - size) // 2, (image.shape[1] - size) // 2
    return np.ascontiguousarray(image[top:top + size, left:left + size])


class VideoTrack:
    """Picks target frames out of the decoded video stream and measures where it ends."""

    def __init__(self, stream, spec: MediaSpec, start: Fraction):
        self.stream, self.spec, self.start = stream, spec, start
        self.tb = stream.time_base
        self.fps = Fraction(str(spec.fps))
        sar = stream.sample_aspect_ratio
        self.sample_aspect = Fraction(sar) if sar and sar > 0 else Fraction(1)
        self.origin: Fraction | None = _seconds(stream.start_time, self.tb)
        self.images: list[np.ndarray] = []  # target frames found so far and not yet taken, in order
        self.taken = 0  # target frames handed on by `take` (a live source's earlier snippets)
        self.prev = None  # (time, frame, cached image) of the latest frame at or before the next target
        self.decoded = 0
        self.decoding = True  # False once the window is filled: later packets are only timed
        self.packets = 0
        self.first: Fraction | None = None
        self.end: Fraction | None = None  # time just after the last frame seen
        self.step: Fraction = Fraction(0)  # last frame's duration (or typical interval)

    @property
    def count(self) -> int:
        """Target frames found so far."""
        return self.taken + len(self.images)

    def take(self, n: int) -> np.ndarray:
        """The next `n` target frames, uint8 [n, size, size, 3], dropped from the track."""
        frames, self.images = np.stack(self.images[:n]), self.images[n:]
        self.taken += n
        return frames

    def target(self, i: int) -> Fraction:
        return self.origin + self.start + i / self.fps

    @property
    def window_end(self) -> Fraction:
        return self.target(self.spec.num_frames)

    @property
    def reach(self) -> Fraction:
        """How far whole snippets may reach: the end of the last frame, with the slack of rounding
        (pts and duration each round to the time base, so the end can read 2 ticks early; a
        missing frame must still count)."""
        return self.end + min(2 * self.tb, self.step / 2, 1 / (2 * self.fps))

    def _extend(self, t: Fraction, duration: Fraction | None) -> None:
        if duration:
            self.step = duration
        elif self.end is not None and t > self.end - self.step:
            self.step = t - (self.end - self.step)  # interval from the previous frame
        self.first = t if self.first is None else min(self.first, t)
        self.end = t + self.step if self.end is None else max(self.end, t + self.step)

    def packet(self, packet) -> None:
        """Feeds one demuxed packet (None: flush). Decoding errors propagate to the caller."""
        if packet is not None:
            self.packets += packet.size > 0
            if not self.decoding:
                t = _seconds(packet.pts if packet.pts is not None else packet.dts, self.tb)
                if t is not None:
                    self._extend(t, _seconds(packet.duration, self.tb))
                return
        for frame in packet.decode() if packet is not None else _flush(self.stream):
            self._frame(frame)

    def _frame(self, frame) -> None:
        t = _seconds(frame.pts if frame.pts is not None else frame.dts, self.tb)
        if t is None:  # no timestamp at all: assume the stream's nominal rate
            rate = self.stream.average_rate or self.stream.guessed_rate or 25
            t = (self.end if self.end is not None else Fraction(0))
            self._extend(t, 1 / Fraction(rate))
        else:
            self._extend(t, _seconds(frame.duration, self.tb))
        self.decoded += 1
        if self.origin is None:
            self.origin = t
        # Every target before this frame's time shows the previous frame.
        while self.count < self.spec.num_frames and self.target(self.count) < t:
            self._emit(self.prev or (t, frame, None))
        self.prev = (t, frame, None)
        self.decoding = not (self.count == self.spec.num_frames and self.end >= self.window_end)

    def _emit(self, prev) -> None:
        t, frame, image = prev
        if image is None:
            image = _frame_to_image(frame, self.spec.image_size, self.sample_aspect)
            self.prev = (t, frame, image) if self.prev is prev else self.prev
        self.images.append(image)

    def finish(self) -> None:
        """After the stream ends: targets before the end of the last frame show it."""
        while (self.prev is not None and self.count < self.spec.num_frames
               and self.target(self.count) < self.end):
            self._emit(self.prev)


# ----------------------------------------------------------------------------------------- audio


def _frame_to_mono(frame: av.AudioFrame) -> np.ndarray:
    """Mean of the channels of one decoded audio frame, float32 [samples] in [-1, 1]."""
    data = frame.to_ndarray()
    channels = frame.layout.nb_channels
    if not frame.format.is_planar:  # packed: one row of interleaved samples
        data = data.reshape(-1, channels).T
    if data.dtype == np.uint8:
        data = (data.astype(np.float32) - 128) / 128
    elif np.issubdtype(data.dtype, np.integer):
        data = data.astype(np.float32) / float(-np.iinfo(data.dtype).min)
    return data.astype(np.float32).mean(axis=0)


class _Resampler:
    """Mono float32 at one rate -> float32 at `target` (libswresample), fed in pieces: the output is
    that of the whole signal at once, so audio resampled as it is decoded (a live source) and
    audio resampled at the end (a file) agree sample for sample."""

    def __init__(self, rate: int, target: int):
        self.rate = rate
        self.resampler = None if rate == target else av.AudioResampler(format="flt", layout="mono", rate=target)

    def __call__(self, x: np.ndarray | None) -> list[np.ndarray]:
        """The output `x` completes (None: the rest, at the end)."""
        if self.resampler is None:
            return [] if x is None else [x]
        frame = None
        if x is not None:
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(x[None, :]), format="flt", layout="mono")
            frame.sample_rate = self.rate
        return [f.to_ndarray().reshape(-1) for f in self.resampler.resample(frame)]


@dataclasses.dataclass
class _Run:
    """Audio samples that follow each other without a gap, from `start` seconds on, kept resampled
    to the clip's rate (`chunks`, of which the first `dropped` samples were forgotten)."""

    start: Fraction
    rate: int  # the source's
    resample: _Resampler
    chunks: list  # mono float32 arrays at the clip's rate
    samples: int = 0  # source samples decoded into this run
    dropped: int = 0

    @property
    def end(self) -> Fraction:
        return self.start + Fraction(self.samples, self.rate)


class AudioTrack:
    """Collects decoded audio near the window as runs of contiguous samples, each placed at its
    first frame's timestamp and resampled to `sample_rate` as it is decoded."""

    def __init__(self, stream, sample_rate: int):
        self.stream, self.tb, self.sample_rate = stream, stream.time_base, sample_rate
        self.runs: list[_Run] = []
        # Set once the video origin is known: audio outside [decode_from, decode_until) is not kept.
        self.decode_from: Fraction | None = None
        self.decode_until: Fraction | None = None
        self.end: Fraction | None = None  # time just after the last audio seen
        self.errors = 0  # packets that failed to decode

    def packet(self, packet) -> None:
        """Feeds one demuxed packet (None: flush). A packet that fails to decode is skipped: it
        leaves a silent gap, and a file cut short is caught by its end time instead."""
        if packet is not None:
            t = _seconds(packet.pts, self.tb)
            if t is not None and self.decode_until is not None and t >= self.decode_until:
                self._extend(t + (_seconds(packet.duration, self.tb) or 0))
                return
        try:
            frames = packet.decode() if packet is not None else _flush(self.stream)
        except av.error.FFmpegError:
            self.errors += 1
            frames = []
        for frame in frames:
            self._frame(frame)
        if packet is None:  # the resamplers' last samples
            for run in self.runs:
                run.chunks += run.resample(None)

    def _extend(self, end: Fraction) -> None:
        self.end = end if self.end is None else max(self.end, end)

    def _frame(self, frame) -> None:
        run = self.runs[-1] if self.runs else None
        t = _seconds(frame.pts, self.tb)
        if t is None:  # untimed frame: it follows the previous one
            if run is None:
                return
            t = run.end
        duration = Fraction(frame.samples, frame.sample_rate)
        self._extend(t + duration)
        if self.decode_from is not None and t + duration < self.decode_from:
            return
        if run is None or run.rate != frame.sample_rate or abs(t - run.end) > _AUDIO_GAP:
            if run is not None:
                run.chunks += run.resample(None)
            run = _Run(t, frame.sample_rate, _Resampler(frame.sample_rate, self.sample_rate), [])
            self.runs.append(run)
        run.chunks += run.resample(_frame_to_mono(frame))
        run.samples += frame.samples

    def forget_before(self, t: Fraction) -> None:
        """Drops the placed samples before `t` (a live source's audio already handed on)."""
        for run in self.runs:
            while run.chunks:
                first_end = run.start + Fraction(run.dropped + len(run.chunks[0]), self.sample_rate)
                if first_end > t:
                    break
                run.dropped += len(run.chunks.pop(0))
        self.runs = [run for run in self.runs[:-1] if run.chunks] + self.runs[-1:]  # the open run stays

    def place(self, origin: Fraction, start: Fraction, num_samples: int, sample_rate: int):
        """Puts the runs on the clip's clock. Returns (float32 [num_samples], bool [num_samples]
        coverage): sample j is at time origin + start + j / sample_rate."""
        out = np.zeros(num_samples, np.float32)
        covered = np.zeros(num_samples, bool)
        if sample_rate != self.sample_rate:
            raise ValueError(f"AudioTrack.place: the track resamples to {self.sample_rate} Hz, not {sample_rate}")
        for run in self.runs:
            if not run.chunks:
                continue
            y = np.concatenate(run.chunks)
            # To the nearest output sample: placement is exact to half a sample (31 us at 16 kHz).
            offset = round((run.start - origin - start) * sample_rate) + run.dropped
            lo, hi = max(0, offset), min(num_samples, offset + len(y))
            if lo < hi:
                out[lo:hi] = y[lo - offset:hi - offset]
                covered[lo:hi] = True
        return np.clip(out, -1.0, 1.0), covered
