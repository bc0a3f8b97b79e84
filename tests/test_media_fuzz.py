"""Damaged copies of the real sample files through `mirasol3b_data.media.decode_clip`: cut anywhere, bytes
flipped, 4 KB zeroed, codec names in the stream headers changed, and other formats under a video
name. Each must give a sane Clip or a MediaError that names the file and a known reason, never
another exception and never one the decoder's safety net caught ("unexpected": a new root cause to
fix), and each must end in time. Also the per-file time limit itself. Every copy is made from fixed
offsets and seeds, so a failure names a case that can be rebuilt."""

import concurrent.futures
import dataclasses
import io
import itertools
import time
import types
import wave
from pathlib import Path

import numpy as np
import pytest

from mirasol3b_data import media
from mirasol3b_data.media import REASONS, Clip, MediaError, decode_clip
from mirasol3b_data.spec import MediaSpec
from test_media import _check_shapes, _sample  # _sample skips the test when ../shared/samples is absent

VIDEO_SAMPLES = ("chaplin.mp4", "big_buck_bunny_432_433.webm", "no_duration.webm", "fire2.mp4", "example.mp4",
                 "-video-with-dash-.mp4")
SPEC = MediaSpec(fps=8.0, num_frames=8, snippet_frames=2, image_size=32)
SILENCE = dataclasses.replace(SPEC, missing_audio="silence")
# Every case here decodes in well under a second; the limit stops a hang, and the test allows
# twice it (a blocking read is stopped after the limit, the packet loop then checks the total).
CASE_TIMEOUT = 10.0


def _outcome(path: Path, spec: MediaSpec) -> Clip | MediaError:
    """decode_clip's Clip or MediaError for `path`, after checking the contract both must meet."""
    begin = time.monotonic()
    try:
        result = decode_clip(path, spec, timeout_seconds=CASE_TIMEOUT)
    except MediaError as e:
        result = e
    elapsed = time.monotonic() - begin
    assert elapsed < 2 * CASE_TIMEOUT, f"{path.name}: decode_clip took {elapsed:.1f} s"
    if isinstance(result, MediaError):
        assert result.reason in REASONS and result.path == str(path) and str(path) in str(result), result
        assert "unexpected" not in result.detail, f"the safety net caught a new root cause: {result}"
    else:
        _check_shapes(result, spec)
        assert result.video.shape[1:] == (32, 32, 3) and np.isfinite(result.audio).all()
    return result


def _check(path: Path) -> Clip | MediaError:
    """Both specs' outcomes for `path`. They differ only where audio is missing, so the one that
    fills silence runs only then (half the decodes)."""
    result = _outcome(path, SPEC)
    if isinstance(result, MediaError) and result.reason == "no_audio_track":
        silent = _outcome(path, SILENCE)
        assert isinstance(silent, MediaError) or silent.audio_missing, path.name
    return result


def _cuts(size: int) -> list[int]:
    # Fixed offsets land in the headers (1100: inside fire2's audio sample description, its index
    # being at the front); the fractions spread over the media, up to a few bytes short of the end.
    fixed = [64, 512, 1100, 5000, size - 16]
    spread = [round(size * f) for f in (0.02, 0.1, 0.25, 0.4, 0.55, 0.7, 0.85, 0.97)]
    return sorted({o for o in fixed + spread if 0 < o < size})


def _flipped(data: bytes, seed: int) -> bytes:
    """4 bytes XORed with nonzero values: in the first 4 KB (headers; an mp4's index when it comes
    first), the last 16 KB (an mp4's index when it comes last), or anywhere, by seed."""
    rng = np.random.default_rng(seed)
    region = [(0, min(4096, len(data))), (max(0, len(data) - 16384), len(data)), (0, len(data))][seed % 3]
    out = bytearray(data)
    for offset in rng.integers(*region, size=4):
        out[offset] ^= int(rng.integers(1, 256))
    return bytes(out)


def _codec_name_offsets(data: bytes) -> list[int]:
    """Last byte of each codec name in the stream headers: an mp4 sample description's fourcc
    ("stsd", version, entry count, entry size, then "avc1"), a Matroska CodecID ("V_VP8", "A_OPUS")."""
    offsets = []
    if data[4:8] == b"ftyp":
        at = data.find(b"stsd")
        while at >= 0:
            offsets.append(at + 19)
            at = data.find(b"stsd", at + 4)
    elif data[:4] == b"\x1a\x45\xdf\xa3":  # EBML: the track headers come before the media
        for prefix in (b"V_", b"A_"):
            start = data.find(prefix, 1, 4096)
            if start > 0 and data[start - 1] & 0x80:  # the CodecID's one-byte size: 0x80 | length
                offsets.append(start + (data[start - 1] & 0x7F) - 1)
    return [o for o in offsets if o < len(data)]


def _damaged(data: bytes) -> dict[str, bytes]:
    size = len(data)
    cases = {f"cut{o}": data[:o] for o in _cuts(size)}
    cases.update({f"flip{seed}": _flipped(data, seed) for seed in range(12)})
    for offset in sorted({max(0, min(round(size * f), size - 4096)) for f in (0, 0.1, 0.3, 0.5, 0.7, 0.9, 1)}):
        cases[f"zero{offset}"] = data[:offset] + bytes(min(4096, size - offset)) + data[offset + 4096:]
    for offset in _codec_name_offsets(data):
        cases[f"codec{offset}"] = data[:offset] + bytes([data[offset] ^ 1]) + data[offset + 1:]
    return cases


@pytest.mark.parametrize("name", VIDEO_SAMPLES)
def test_damaged_samples_give_a_clip_or_a_media_error(tmp_path, name):
    data = _sample(name).read_bytes()
    outcomes, failures = {}, []
    for case, damaged in _damaged(data).items():
        path = tmp_path / f"{case}-{name}"  # keeps the sample's extension
        path.write_bytes(damaged)
        try:
            outcomes[case] = _check(path)
        except AssertionError as e:  # every failing case in the report, not just the first
            failures.append(f"{case}: {e}")
    assert not failures, "\n".join(failures)
    assert isinstance(outcomes["cut64"], MediaError)  # 64 bytes hold no frame


def _wav(seconds: float, rate: int = 16_000) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((3000 * np.sin(np.arange(round(seconds * rate)) / 5)).astype("<i2").tobytes())
    return out.getvalue()


def test_other_formats_under_a_video_name(tmp_path):
    read = lambda name: _sample(name).read_bytes()  # noqa: E731  (skips without the samples)
    # FFmpeg finds the format from the bytes, not the name: a container under another container's
    # name still decodes, as do trailing zeros; zeros in front hide the format.
    cases = {
        "chaplin-as.webm": (read("chaplin.mp4"), None),
        "chaplin-as.mkv": (read("chaplin.mp4"), None),
        "bunny-as.mp4": (read("big_buck_bunny_432_433.webm"), None),
        "noise.mp4": (np.random.default_rng(0).bytes(50_000), "undecodable"),
        "crunching.mp4": (read("crunching.mp3"), "no_video_stream"),
        "tone.mp4": (_wav(1.0), "no_video_stream"),
        "zeros.mp4": (bytes(65_536), "undecodable"),
        "chaplin-zero-padded.mp4": (read("chaplin.mp4") + bytes(65_536), None),
        "example-zeros-in-front.mp4": (bytes(4096) + read("example.mp4"), "undecodable"),
        "text.mp4": (b"not a video\n" * 1000, "undecodable"),
    }
    for name, (data, reason) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        result = _check(path)
        assert (result.reason if isinstance(result, MediaError) else None) == reason, (name, result)


def test_truncated_file_reaches_answer_as_a_media_error(tmp_path):
    """mirasol3b.answer decodes through decode_clip and its CLI turns a MediaError into an
    `error: cannot read video ...` line (tests/test_evaluate.py runs that CLI on unreadable files)."""
    from configs import tiny
    from mirasol3b import answer

    cut = tmp_path / "fire2.mp4"
    cut.write_bytes(_sample("fire2.mp4").read_bytes()[:1100])
    with pytest.raises(MediaError) as info:
        answer.prepare(tiny.get_config(), str(cut), "what burns?")
    assert info.value.path == str(cut) and info.value.reason in REASONS and "unexpected" not in info.value.detail


# --------------------------------------------------------------------------------- time limit


def test_time_limit_stops_opening_in_any_thread(monkeypatch):
    path = _sample("chaplin.mp4")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # no signal.alarm: it works off the main thread
        for timeout in (1e-6, None):
            if timeout is None:  # the module's limit
                monkeypatch.setattr(media, "DECODE_TIMEOUT_SECONDS", 1e-6)
            begin = time.monotonic()
            with pytest.raises(MediaError) as info:
                pool.submit(decode_clip, path, SPEC, timeout_seconds=timeout).result(timeout=30)
            assert time.monotonic() - begin < 5
            assert info.value.reason == "timed_out" and str(path) in str(info.value), info.value
            assert info.value.detail.startswith("opening the file took longer")  # PyAV's interrupt callback
    with pytest.raises(ValueError, match="timeout_seconds"):
        decode_clip(path, SPEC, timeout_seconds=0)


def test_time_limit_stops_the_packet_loop(monkeypatch):
    """A clock that moves 1 s per reading passes the 40 s limit inside the packet loop, after
    PyAV (on the real clock) has opened the file."""
    ticks = itertools.count()
    monkeypatch.setattr(media, "time", types.SimpleNamespace(monotonic=lambda: float(next(ticks))))
    with pytest.raises(MediaError) as info:
        decode_clip(_sample("chaplin.mp4"), SPEC, timeout_seconds=40)
    assert info.value.reason == "timed_out" and "40 s limit" in info.value.detail
    assert "reading and decoding (after" in info.value.detail and "(after 0 video" not in info.value.detail
