"""How clips are stored (`data/storage.py`): every frame within the PSNR floor of its decode, in the
smaller codec that holds it; audio as int16."""

from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from mirasol3b_data import storage
from mirasol3b_data.media import decode_clip
from mirasol3b_data.spec import MediaSpec

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "samples"
BASE = MediaSpec(fps=6.25, num_frames=128, snippet_frames=16, image_size=224)  # configs/mirasol3b.py's geometry


def _decoded(encoded: bytes) -> np.ndarray:
    return tf.io.decode_image(encoded, channels=3).numpy()  # what the input pipeline reads


def test_psnr():
    a = np.full((8, 8, 3), 100, np.uint8)
    assert storage.psnr_db(a, a) == float("inf")
    b = a.copy()
    b[0, 0, 0] += 16  # MSE = 256 / 192
    assert storage.psnr_db(a, b) == pytest.approx(10 * np.log10(255 ** 2 * 192 / 256), rel=1e-6)


def test_a_textured_frame_is_a_jpeg_within_the_floor():
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:224, 0:224]
    smooth = np.stack([128 + 60 * np.sin(x / 17.0 + c) * np.cos(y / 23.0) for c in range(3)], -1)
    frame = np.clip(smooth + rng.normal(0, 2, smooth.shape), 0, 255).astype(np.uint8)  # camera-like grain
    encoded, _ = storage.encode_frame(frame)
    assert encoded[:2] == b"\xff\xd8"  # JPEG
    assert storage.psnr_db(frame, _decoded(encoded)) >= storage.PSNR_FLOOR_DB
    assert len(encoded) < len(tf.io.encode_png(frame).numpy()) / 3


def test_a_flat_coloured_frame_whose_edges_jpeg_would_blur_stays_exact():
    """synthetic_avqa's frames: JPEG falls under the floor at the colour edges; PNG is exact and smaller."""
    frame = np.full((32, 32, 3), 90, np.uint8)
    frame[8:20, 10:24] = (220, 40, 40)
    frame[20:28, 2:9] = (50, 80, 230)
    for quality in (storage.JPEG_QUALITY, 90):
        assert storage.psnr_db(frame, _decoded(tf.io.encode_jpeg(frame, quality=quality).numpy())) < (
            storage.PSNR_FLOOR_DB)
    encoded, _ = storage.encode_frame(frame)
    np.testing.assert_array_equal(_decoded(encoded), frame)


def test_a_clip_that_turns_from_flat_to_textured_keeps_every_frame_within_the_floor():
    """Each frame's ladder starts where the previous frame's ended, less one rung: a scene change
    from synthetic colours (PNG) to grain (JPEG) and back still holds the floor, in the cheaper codec."""
    flat = np.full((6, 64, 64, 3), 90, np.uint8)
    flat[:, 8:40, 10:50] = (220, 40, 40)
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:64, 0:64]
    smooth = np.stack([128 + 60 * np.sin(x / 9.0 + c) * np.cos(y / 11.0) for c in range(3)], -1)
    textured = np.clip(smooth + rng.normal(0, 2, (6, 64, 64, 3)), 0, 255).astype(np.uint8)
    video = np.concatenate([flat, textured, flat])
    encoded = storage.encode_frames(video)
    for frame, data in zip(video, encoded):
        assert storage.psnr_db(frame, _decoded(data)) >= storage.PSNR_FLOOR_DB
    assert [data[:2] for data in encoded] == [b"\x89P"] * 6 + [b"\xff\xd8"] * 6 + [b"\x89P"] * 6


@pytest.mark.skipif(not SAMPLES.is_dir(), reason=f"no shared samples at {SAMPLES}")
def test_real_clips_at_the_paper_geometry_stay_faithful_and_shrink():
    """Every frame of the samples long enough for a base-geometry snippet: >= 35 dB (the faithfulness
    target), and the clip well under its zlib'd raw pixels (the 1.0.0 storage): a third for film
    (chaplin), half for the nearly black no_duration.webm, which zlib already packs tightly."""
    import zlib

    for name, factor in (("chaplin.mp4", 3), ("no_duration.webm", 2)):
        clip = decode_clip(SAMPLES / name, BASE)
        encoded = storage.encode_frames(clip.video)
        assert len(encoded) == len(clip.video)
        for frame, data in zip(clip.video, encoded):
            assert storage.psnr_db(frame, _decoded(data)) >= 35.0, name
        assert sum(map(len, encoded)) < len(zlib.compress(clip.video.tobytes())) / factor, name


def test_audio_is_stored_as_int16_within_half_a_step():
    audio = np.array([-1.5, -1.0, -0.25, 0.0, 1e-5, 0.5, 1.0, 2.0], np.float32)
    pcm = storage.audio_to_int16(audio)
    assert pcm.dtype == np.int16 and pcm[0] == -32767 and pcm[-1] == 32767  # clipped to [-1, 1]
    back = pcm.astype(np.float32) / storage.AUDIO_SCALE
    np.testing.assert_allclose(back[1:-1], audio[1:-1], atol=0.5 / storage.AUDIO_SCALE)
