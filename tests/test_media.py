"""Behaviour of the one decode path (`mirasol3b_data.media.decode_clip`) on clips encoded at test time with
`mirasol3b_data.encode.write_clip`, on the real sample files in ../shared/samples, and on broken files."""

import dataclasses
import math
import pickle
import shutil
import subprocess
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from mirasol3b_data import media
from mirasol3b_data.encode import ffmpeg_exe, write_clip
from mirasol3b_data.media import MEDIA_EXTENSIONS, Clip, MediaError, decode_clip
from mirasol3b_data.spec import MediaSpec

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "samples"
TINY = MediaSpec(fps=8, num_frames=32, snippet_frames=2, image_size=32, sample_rate=16_000)
SILENCE = MediaSpec(fps=8, num_frames=32, snippet_frames=2, image_size=32, missing_audio="silence")

# The synthetic clip: 3 s; each frame's colour spells its own index k (base 8, one digit per RGB
# channel), so every decoded frame says which source frame it is. The audio is a quiet 440 Hz tone
# that becomes a loud 1000 Hz tone at SWITCH seconds, a snippet boundary of TINY (0.25 s snippets).
SECONDS, SWITCH, AUDIO_RATE = 3.0, 1.5, 44_100
LOW, HIGH = (440.0, 0.2), (1000.0, 0.6)


def _index_colour(k: np.ndarray) -> np.ndarray:
    """Frame indices [N] -> RGB uint8 [N, 3]; 25 levels apart, far beyond codec error."""
    digits = np.stack([k % 8, k // 8 % 8, k // 64 % 8], axis=-1)
    return (40 + 25 * digits).astype(np.uint8)


def _colour_index(rgb: np.ndarray) -> np.ndarray:
    """Decoded frames [N, H, W, 3] -> the frame index each spells [N]."""
    digits = np.clip(np.round((rgb.reshape(len(rgb), -1, 3).mean(axis=1) - 40) / 25), 0, 7).astype(int)
    return digits[:, 0] + 8 * digits[:, 1] + 64 * digits[:, 2]


def _tone(seconds: float, rate: int) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    low = LOW[1] * np.sin(2 * np.pi * LOW[0] * t)
    high = HIGH[1] * np.sin(2 * np.pi * HIGH[0] * t)
    return np.where(t < SWITCH, low, high).astype(np.float32)


def _write_index_clip(path: Path, fps: Fraction, size=(48, 64), seconds=SECONDS, audio=True, audio_seconds=None,
                      audio_codec=None) -> Path:
    n = math.ceil(seconds * fps)
    frames = np.broadcast_to(_index_colour(np.arange(n))[:, None, None, :], (n, *size, 3))
    sound = _tone(n / fps if audio_seconds is None else audio_seconds, AUDIO_RATE) if audio else None
    write_clip(path, np.ascontiguousarray(frames), fps, sound, AUDIO_RATE, audio_codec=audio_codec)
    return path


def _write_timed_clip(path: Path, pts: list, time_base: Fraction, rate: int) -> Path:
    """Frame k at pts[k] (in `time_base`), spelling its own index; mjpeg, no audio. The muxer
    gives the last frame 1 / `rate` s."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mjpeg", rate=rate)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuvj420p"
        stream.time_base = stream.codec_context.time_base = time_base
        stream.options = {"q:v": "2"}
        for k, ts in enumerate(pts):
            image = np.broadcast_to(_index_colour(np.array([k]))[0], (48, 64, 3))
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            frame.pts, frame.time_base = ts, time_base
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path


def _dominant_hz(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x)), n=8 * len(x)))
    return float(np.argmax(spectrum) * rate / (8 * len(x)))


def _switch_seconds(audio: np.ndarray, rate: int) -> float:
    """When the loud tone starts: where a 5 ms moving RMS crosses halfway between the two levels."""
    window = rate // 200
    rms = np.sqrt(np.convolve(audio.astype(np.float64) ** 2, np.ones(window) / window, mode="same"))
    half = (LOW[1] + HIGH[1]) / 2 / np.sqrt(2)
    return float(np.argmax(rms > half) / rate)


def _check_shapes(clip: Clip, spec: MediaSpec):
    assert 1 <= clip.num_snippets <= spec.max_snippets
    assert clip.video.dtype == np.uint8
    assert clip.video.shape == (clip.num_snippets * spec.snippet_frames, spec.image_size, spec.image_size, 3)
    assert clip.audio.dtype == np.float32
    assert clip.audio.shape == (clip.num_snippets * spec.samples_per_snippet,)
    assert np.all(np.abs(clip.audio) <= 1.0)
    if clip.audio_missing:
        assert not clip.audio.any()


# --------------------------------------------------------------------------- timing and alignment


@pytest.mark.parametrize("fps,suffix", [(Fraction(30000, 1001), ".mp4"), (Fraction(25), ".mp4"),
                                        (Fraction(25), ".webm")])
def test_frames_and_audio_come_from_the_same_time(tmp_path, fps, suffix):
    path = _write_index_clip(tmp_path / f"clip{suffix}", fps)
    clip = decode_clip(path, TINY)
    _check_shapes(clip, TINY)
    assert clip.num_snippets == 12  # 3 s of 0.25 s snippets (the spec allows 16)
    assert clip.source_fps == pytest.approx(float(fps), rel=2e-3)
    assert clip.source_sample_rate == (AUDIO_RATE if suffix == ".mp4" else 48_000)  # opus is 48 kHz
    assert clip.duration == pytest.approx(math.ceil(SECONDS * fps) / fps, abs=0.002)
    assert not clip.audio_missing

    # Target frame i is the last source frame shown at i / 8 s.
    expected = [math.floor(Fraction(i, 8) * fps) for i in range(len(clip.video))]
    assert _colour_index(clip.video).tolist() == expected

    rate = TINY.sample_rate
    switch = round(SWITCH * rate)
    assert _dominant_hz(clip.audio[:switch], rate) == pytest.approx(LOW[0], abs=2)
    assert _dominant_hz(clip.audio[switch:], rate) == pytest.approx(HIGH[0], abs=2)
    # The tone changes where it does in the source (same measurement on the ideal tone), within 4
    # samples, and on the same snippet boundary as the frames of that time.
    error = _switch_seconds(clip.audio, rate) - _switch_seconds(_tone(SECONDS, rate), rate)
    assert abs(error) <= 4 / rate, f"audio is {error * 1000:.2f} ms off the video"
    boundary = SWITCH * TINY.fps / TINY.snippet_frames
    assert boundary == int(boundary)
    for k in range(clip.num_snippets):
        frames = clip.video[k * TINY.snippet_frames:(k + 1) * TINY.snippet_frames]
        sound = clip.audio[k * TINY.samples_per_snippet:(k + 1) * TINY.samples_per_snippet]
        loud_video = all((f + 1) / fps > SWITCH for f in _colour_index(frames))  # on screen at SWITCH or later
        loud_audio = np.sqrt(np.mean(sound ** 2)) > (LOW[1] + HIGH[1]) / 2 / np.sqrt(2)
        assert loud_video == loud_audio == (k >= boundary), k


def test_start_seconds_shifts_both_streams(tmp_path, monkeypatch):
    fps = Fraction(30000, 1001)
    path = _write_index_clip(tmp_path / "clip.mp4", fps)
    start = Fraction(1, 2)
    clip = decode_clip(path, TINY, start_seconds=float(start))
    assert clip.num_snippets == 10
    assert _colour_index(clip.video).tolist() == [math.floor((start + Fraction(i, 8)) * fps)
                                                  for i in range(len(clip.video))]
    rate = TINY.sample_rate
    shift = _switch_seconds(_tone(SECONDS, rate), rate) - _switch_seconds(clip.audio, rate)
    assert abs(shift - float(start)) <= 4 / rate
    # Seeking (done for late starts) gives the same clip as decoding from the beginning.
    monkeypatch.setattr(media, "_SEEK_AFTER", 0.0)
    sought = decode_clip(path, TINY, start_seconds=float(start))
    np.testing.assert_array_equal(sought.video, clip.video)
    # Audio runs are placed to the nearest output sample, so where decoding starts moves the
    # resampled waveform by under half a sample (31 us).
    np.testing.assert_allclose(sought.audio, clip.audio, atol=0.02)


def test_variable_frame_rate_picks_the_frame_on_screen(tmp_path):
    """Frames at irregular times (mkv, 1 ms clock): target i shows the last frame with pts <= i / fps."""
    times_ms = [0, 100, 480, 550, 1200, 1300, 1900, 2600]
    path = _write_timed_clip(tmp_path / "vfr.mkv", times_ms, Fraction(1, 1000), rate=25)
    spec = MediaSpec(fps=5, num_frames=20, snippet_frames=1, image_size=32, missing_audio="silence")
    clip = decode_clip(path, spec)
    # The muxer stored 40 ms (1 / 25 s) as the last frame's duration: the video ends at 2.64 s.
    assert clip.duration == pytest.approx(2.64, abs=0.001)
    assert clip.num_snippets == 13
    expected = [max(k for k, ms in enumerate(times_ms) if ms <= 200 * i) for i in range(13)]
    assert _colour_index(clip.video).tolist() == expected
    assert clip.source_fps == pytest.approx(len(times_ms) / 2.64, rel=0.01)


def test_end_short_only_by_timestamp_rounding_keeps_the_last_snippet(tmp_path):
    """24 frames at 24 fps on Matroska's 1 ms clock: the last frame's pts (958.3 -> 958) and
    duration (41.7 -> 41) round down, so the video ends at 0.999 s, yet every frame the fourth
    0.25 s snippet shows (0.75 s, 0.875 s) is there. The PCM track ends 10 ms before the window."""
    path = _write_index_clip(tmp_path / "clip.mkv", Fraction(24), seconds=1, audio_seconds=0.99,
                             audio_codec="pcm_s16le")
    clip = decode_clip(path, TINY)
    _check_shapes(clip, TINY)
    assert clip.duration == pytest.approx(0.999, abs=1e-9)  # the rounding this test is about
    assert clip.num_snippets == 4
    assert _colour_index(clip.video).tolist() == [3 * i for i in range(8)]  # frame floor(i / 8 * 24)
    # The audio is kept (99% of the window); the 10 ms it lacks are zeros, not other samples.
    end = round(0.99 * TINY.sample_rate)
    assert not clip.audio_missing
    assert np.sqrt(np.mean(clip.audio[end - 400:end] ** 2)) > LOW[1] / 2 and not clip.audio[end:].any()


@pytest.mark.parametrize("name,spec,start,snippets", [
    # 23 frames at 24 fps on a 1 ms clock: one whole frame short of 1 s.
    ("webm", TINY, 0, 3),
    # The same frames on a 1/24 s clock, where 2 ticks of rounding would be 2 frames.
    ("avi", SILENCE, 0, 3),
    # 4 frames at 4 fps from 0.125 s: half a source frame short of 8 snippets at 8 fps, but a
    # whole target frame (the one at 1.0 s, after the video ends).
    ("avi_4fps", MediaSpec(fps=8, num_frames=16, snippet_frames=1, image_size=32, missing_audio="silence"),
     0.125, 7),
])
def test_clip_short_by_a_frame_does_not_get_the_snippet(tmp_path, name, spec, start, snippets):
    if name == "webm":
        path = _write_index_clip(tmp_path / "clip.webm", Fraction(24), seconds=Fraction(23, 24))
    elif name == "avi":
        path = _write_timed_clip(tmp_path / "clip.avi", list(range(23)), Fraction(1, 24), rate=24)
    else:
        path = _write_timed_clip(tmp_path / "clip.avi", list(range(4)), Fraction(1, 4), rate=4)
    clip = decode_clip(path, spec, start_seconds=start)
    _check_shapes(clip, spec)
    assert clip.num_snippets == snippets


def test_non_square_source_is_resized_on_the_short_side_and_centre_cropped(tmp_path):
    frame = np.zeros((48, 64, 3), np.uint8)
    frame[:, :6] = frame[:, -6:] = (255, 0, 0)  # red side borders: cropped away
    frame[16:32, 24:40] = 255  # white 16x16 centre square: becomes 32/48 * 16 ~ 10.7 px, still square
    path = tmp_path / "wide.mp4"
    write_clip(path, np.stack([frame] * 10), 25, None, 16_000)
    spec = MediaSpec(fps=25, num_frames=5, snippet_frames=5, image_size=32, missing_audio="silence")
    image = decode_clip(path, spec).video[0].astype(int)
    white = image.min(axis=-1) > 128
    rows, cols = np.flatnonzero(white.any(axis=1)), np.flatnonzero(white.any(axis=0))
    assert 10 <= len(rows) <= 12 and 10 <= len(cols) <= 12  # square: aspect kept
    assert abs((rows[0] + rows[-1]) / 2 - 15.5) <= 1 and abs((cols[0] + cols[-1]) / 2 - 15.5) <= 1  # centred
    assert (image[..., 0] - image[..., 1]).max() < 60  # no red border left


# ------------------------------------------------------------------------------------ bad files


def _reason(path, spec=TINY, **kwargs) -> str:
    with pytest.raises(MediaError) as info:
        decode_clip(path, spec, **kwargs)
    assert info.value.path == str(path) and info.value.detail
    return info.value.reason


def test_bad_files_raise_their_true_reason(tmp_path):
    assert _reason(tmp_path / "missing.mp4") == "not_found"
    (tmp_path / "empty.mp4").write_bytes(b"")
    assert _reason(tmp_path / "empty.mp4") == "empty_file"
    (tmp_path / "notes.txt").write_text("not a video")
    assert _reason(tmp_path / "notes.txt") == "wrong_extension"
    (tmp_path / "noise.mp4").write_bytes(np.random.default_rng(0).bytes(20_000))
    assert _reason(tmp_path / "noise.mp4") == "undecodable"
    # 5 frames at 25 fps is 0.2 s: less than one 0.25 s snippet.
    short = _write_index_clip(tmp_path / "short.mp4", Fraction(25), seconds=0.2)
    assert _reason(short) == "too_short"
    assert _reason(_write_index_clip(tmp_path / "clip.mp4", Fraction(25)), start_seconds=2.9) == "too_short"


@pytest.mark.parametrize("suffix,faststart", [(".mp4", False), (".mp4", True), (".mkv", False), (".webm", False)])
def test_cut_off_file_is_truncated(tmp_path, suffix, faststart):
    """40% of the bytes: an mp4 loses its index (written last) or, with the index first
    (faststart), 60% of the frames it lists; a Matroska file loses its last 60%."""
    whole = _write_index_clip(tmp_path / f"whole{suffix}", Fraction(25))
    if faststart:
        moved = tmp_path / f"faststart{suffix}"
        subprocess.run([ffmpeg_exe(), "-v", "error", "-i", str(whole), "-c", "copy", "-movflags", "+faststart",
                        str(moved)], check=True)
        whole = moved
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(whole.read_bytes()[:int(whole.stat().st_size * 0.4)])
    assert _reason(cut) == "truncated"


def test_missing_audio_is_skipped_or_silenced(tmp_path):
    path = _write_index_clip(tmp_path / "mute.mp4", Fraction(25), audio=False)
    assert _reason(path) == "no_audio_track"
    clip = decode_clip(path, SILENCE)
    _check_shapes(clip, SILENCE)
    assert clip.audio_missing and clip.source_sample_rate is None and not clip.audio.any()


def test_media_error_keeps_its_fields_through_pickle():
    error = pickle.loads(pickle.dumps(MediaError("a.mp4", "truncated", "cut")))
    assert (error.path, error.reason, error.detail) == ("a.mp4", "truncated", "cut")


# ------------------------------------------------------------------------------ real sample files


def _sample(name: str) -> Path:
    if not SAMPLES.is_dir():
        pytest.skip(f"real media samples not found at {SAMPLES} (shared/ must sit beside the repository)")
    return SAMPLES / name


def test_sample_chaplin_mp3_audio_at_44k():
    clip = decode_clip(_sample("chaplin.mp4"), TINY)
    _check_shapes(clip, TINY)
    assert clip.num_snippets == TINY.max_snippets  # 9.6 s is more than the spec keeps
    assert clip.source_fps == pytest.approx(25, rel=1e-3)
    assert clip.source_sample_rate == 44_100
    assert clip.duration == pytest.approx(9.64, abs=0.01)
    assert not clip.audio_missing and np.sqrt(np.mean(clip.audio ** 2)) > 0.01


def test_sample_big_buck_bunny_one_second_webm():
    clip = decode_clip(_sample("big_buck_bunny_432_433.webm"), TINY)
    _check_shapes(clip, TINY)
    # The 1 ms clock rounds the end down to 0.999 s; the four 0.25 s snippets' frames are all there.
    assert clip.duration == pytest.approx(0.999, abs=1e-9)
    assert clip.num_snippets == 4
    frames = clip.video.reshape(len(clip.video), -1).astype(int)
    assert all(np.abs(frames[i] - frames[i - 1]).mean() > 1 for i in range(1, len(frames)))  # 8 distinct pictures
    assert clip.source_fps == pytest.approx(24, rel=0.01)
    assert clip.source_sample_rate == 44_100 and not clip.audio_missing and clip.audio.any()


def test_sample_no_duration_webm_is_measured_by_decoding():
    path = _sample("no_duration.webm")
    assert av.open(str(path)).duration is None  # the header really has no duration
    clip = decode_clip(path, TINY)
    _check_shapes(clip, TINY)
    # The stream runs at 15000/1001 fps (the samples README calls it 29.97: half of that).
    assert clip.source_fps == pytest.approx(15000 / 1001, rel=0.01)
    assert clip.duration == pytest.approx(4.94, abs=0.02)
    # Its Opus track is present for the whole clip (it holds digital silence).
    assert clip.source_sample_rate == 48_000 and not clip.audio_missing


def test_sample_fire2_audio_ends_early():
    """By its timestamps fire2's AAC track has one 21 ms frame, a 155 ms gap, then sound to 2.42 s:
    the gap stays silent and the rest is placed where its timestamps say."""
    clip = decode_clip(_sample("fire2.mp4"), TINY)
    _check_shapes(clip, TINY)
    assert clip.num_snippets == 9  # 2.38 s of video
    assert clip.source_fps == pytest.approx(10.5, abs=0.05)
    assert clip.source_sample_rate == 48_000 and not clip.audio_missing
    rate = TINY.sample_rate
    assert not clip.audio[round(0.03 * rate):round(0.17 * rate)].any()
    assert np.sqrt(np.mean(clip.audio[round(0.2 * rate):] ** 2)) > 1e-3
    # The file's display matrix turns the picture by 180 degrees: frames match ffmpeg's own
    # (auto-rotated, area-scaled, centre-cropped) rendering of the first frame.
    size = TINY.image_size
    reference = subprocess.run(
        [ffmpeg_exe(), "-v", "error", "-i", str(_sample("fire2.mp4")), "-frames:v", "1", "-vf",
         f"scale=-1:{size}:flags=area,crop={size}:{size}", "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
        capture_output=True, check=True).stdout
    reference = np.frombuffer(reference, np.uint8).reshape(size, size, 3)
    assert np.abs(clip.video[0].astype(int) - reference).mean() < 1
    # A window that is mostly the gap has too little audio: treated as a missing track.
    first = MediaSpec(fps=8, num_frames=2, snippet_frames=2, image_size=32)
    assert _reason(_sample("fire2.mp4"), first) == "no_audio_track"
    assert decode_clip(_sample("fire2.mp4"), dataclasses.replace(first, missing_audio="silence")).audio_missing


@pytest.mark.parametrize("name,seconds,fps", [("example.mp4", 2.0, 25), ("-video-with-dash-.mp4", 5.0, 1)])
def test_samples_without_audio(name, seconds, fps):
    path = _sample(name)
    assert _reason(path) == "no_audio_track"
    clip = decode_clip(path, SILENCE)
    _check_shapes(clip, SILENCE)
    assert clip.audio_missing and clip.source_sample_rate is None
    assert clip.duration == pytest.approx(seconds, abs=0.01)
    assert clip.source_fps == pytest.approx(fps, rel=1e-3)
    assert clip.num_snippets == min(SILENCE.max_snippets, int(seconds * SILENCE.fps / SILENCE.snippet_frames))


def test_sample_audio_only(tmp_path):
    path = _sample("crunching.mp3")
    assert path.suffix not in MEDIA_EXTENSIONS and _reason(path) == "wrong_extension"
    renamed = tmp_path / "crunching.mp4"
    shutil.copyfile(path, renamed)
    assert _reason(renamed) == "no_video_stream"
