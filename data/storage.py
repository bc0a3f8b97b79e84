"""How a decoded clip is stored: each frame as an image (JPEG, or PNG where JPEG would not stay
faithful) and the audio as 16-bit PCM. The codecs are TensorFlow's, the ones the input pipeline
decodes with (`tf.io.decode_image` reads either format), so what is checked here is what training
reads.

Frames. Each frame is encoded as JPEG at quality 80 (4:2:0 chroma) and decoded back; while the
decoded frame's PSNR against the uncompressed decode is under `PSNR_FLOOR_DB`, qualities 85, 90,
then 95 with full chroma are tried. The first that holds the floor is kept; at 95, lossless PNG is
kept instead where it is smaller, or where no JPEG holds the floor (heavy sensor noise). Measured on frames decoded at the `base` geometry (224 px):
  chaplin.mp4 (film grain)  JPEG q80: 11.9 KB a frame, min PSNR 36.3 dB (q90: 16.5 KB, 39.9 dB;
                            zlib'd raw pixels, the 1.0.0 storage: 50.1 KB)
  no_duration.webm          JPEG q90: 2.2 KB, 45.5 dB (zlib: 4.8 KB)
and on synthetic_avqa's flat-coloured 32 px frames, where JPEG blurs the colour edges (q95 4:2:0:
min 30.2 dB; q95 4:4:4: 36.1 dB and 957 B) and PNG is both exact and smaller (440 B).
Audio. int16 PCM (zlib'd by the feature): half of float32, and its rounding error (1.5e-5 of full
scale, -96 dB) is far below what a 16 kHz log-mel resolves.
"""

from __future__ import annotations

import numpy as np

# The faithfulness target is 35 dB; one dB of margin for readers that decode JPEG with
# another library (IDCT variants differ in the last bit).
PSNR_FLOOR_DB = 36.0
JPEG_QUALITY = 80
# (quality, 4:2:0 chroma) tried in turn until one holds the floor; at the last, PNG too.
_JPEG_LADDER = ((JPEG_QUALITY, True), (85, True), (90, True), (95, False))
PNG_RUNG = len(_JPEG_LADDER)
AUDIO_SCALE = 32767.0  # float32 in [-1, 1] <-> int16


def psnr_db(reference: np.ndarray, decoded: np.ndarray) -> float:
    """PSNR of uint8 images; inf where they are equal."""
    mse = np.mean((reference.astype(np.float32) - decoded.astype(np.float32)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def _png(frame: np.ndarray) -> bytes:
    """Lossless; Pillow's encoder (TensorFlow's costs ~0.2 ms of op overhead on a 32 px frame)."""
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(frame).save(out, format="PNG")
    return out.getvalue()


def encode_frame(frame: np.ndarray, first_rung: int = 0) -> tuple[bytes, int]:
    """uint8 [H, W, 3] -> (JPEG or PNG bytes whose decode is within `PSNR_FLOOR_DB` of `frame`, the
    rung it stopped at: an index of `_JPEG_LADDER`, or `PNG_RUNG`). The ladder starts at `first_rung`."""
    import tensorflow as tf

    jpeg = None
    for rung in range(first_rung, len(_JPEG_LADDER)):
        quality, subsample_chroma = _JPEG_LADDER[rung]
        encoded = tf.io.encode_jpeg(frame, quality=quality, chroma_downsampling=subsample_chroma).numpy()
        # decode_jpeg: the kernel tf.io.decode_image runs for JPEG, without its eager fallback path
        # (6% of a Beam worker's time in a profile).
        if psnr_db(frame, tf.io.decode_jpeg(encoded, channels=3).numpy()) >= PSNR_FLOOR_DB:
            if rung < len(_JPEG_LADDER) - 1:
                return encoded, rung  # a natural frame: PNG would be several times larger
            jpeg = encoded
    png = _png(frame)  # exact; smaller than JPEG on flat, sharp-edged pictures
    return (png, PNG_RUNG) if jpeg is None or len(png) <= len(jpeg) else (jpeg, len(_JPEG_LADDER) - 1)


def encode_frames(video: np.ndarray) -> list[bytes]:
    """uint8 [F, H, W, 3] -> F encoded images, for a `tfds.features.Video` feature. A clip's frames
    look alike, so each frame starts where the previous one ended: one rung below it on the JPEG
    ladder (most natural frames then cost one encode and one decode), or, after a PNG, with PNG,
    kept while it stays under a quarter of the raw frame (flat pictures; the full ladder
    otherwise). `synthetic_avqa/tiny` built 11% slower than in 1.0.0's layout when every frame
    climbed the whole ladder."""
    out, rung = [], 0
    for frame in video:
        if rung == PNG_RUNG:
            png = _png(frame)
            if len(png) <= frame.nbytes // 4:
                out.append(png)
                continue
            rung = 0
        encoded, rung = encode_frame(frame, max(rung - 1, 0))
        out.append(encoded)
    return out


def audio_to_int16(audio: np.ndarray) -> np.ndarray:
    """float32 [S] in [-1, 1] -> int16 [S] (what is stored)."""
    return np.round(np.clip(audio, -1.0, 1.0) * AUDIO_SCALE).astype(np.int16)


def clip_example(video: np.ndarray, audio: np.ndarray, num_snippets: int, audio_missing: bool, source: str,
                 texts) -> dict:
    """The stored example (`data/spec.py`) of one decoded clip and its texts (objects with the
    `spec.TEXT_FIELDS` and `evidence`, spans in seconds from the clip's first frame, as attributes,
    e.g. `mirasol3b_data.builders.splits.Text`)."""
    from mirasol3b_data.spec import TEXT_FIELDS

    if not texts:
        raise ValueError(f"clip_example: {source} has no text")
    spans = [(i, float(a), float(b)) for i, t in enumerate(texts) for a, b in t.evidence]
    bad = [(i, a, b) for i, a, b in spans if not 0 <= a < b]
    if bad:
        raise ValueError(f"clip_example: {source}: text {bad[0][0]} has evidence span {bad[0][1:]}; expected "
                         "0 <= start < end seconds")
    return {"video": encode_frames(video), "audio": audio_to_int16(audio), "num_snippets": num_snippets,
            "audio_missing": audio_missing, "source": source,
            "texts": [{field: getattr(t, field) for field in TEXT_FIELDS} for t in texts],
            "evidence": {"text": np.array([i for i, _, _ in spans], np.int32),
                         "start": np.array([a for _, a, _ in spans], np.float32),
                         "end": np.array([b for _, _, b in spans], np.float32)}}
