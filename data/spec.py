"""What a decoded example looks like: the media geometry (`MediaSpec`) and the stored features.

Every builder writes one example per clip with `example_features(spec)`; the SeqIO tasks read them
back and expand each clip into one example per text. One schema serves question answering,
captioning and classification; each text has
  prompt         the question (QA), or the fixed prompt of the task kind (captioning, classification);
  answer         the answer, the caption, or the label's name;
  kind           one of KINDS;
  question_type  e.g. "what", "order"; "" where the task has none.
and the time spans its answer rests on (`evidence`, seconds from the clip's first frame; none where
the source has no such annotation): `synthetic_avqa` records them for every question, `local_media`
reads NExT-GQA's and the manifest's.
"""

from __future__ import annotations

import dataclasses
from fractions import Fraction

import ml_collections

KINDS = ("qa", "caption", "classification")
# The fields of each entry of an example's `texts`.
TEXT_FIELDS = ("prompt", "answer", "kind", "question_type")
# Prompts for kinds that have no question of their own.
DEFAULT_PROMPTS = {"caption": "describe the video.", "classification": "what is happening?"}


@dataclasses.dataclass(frozen=True)
class MediaSpec:
    """Geometry of decoded media: frames are resampled to `fps`, at most `num_frames` of them,
    kept in whole snippets of `snippet_frames`; audio is mono at `sample_rate`."""

    fps: float
    num_frames: int
    snippet_frames: int
    image_size: int
    sample_rate: int = 16_000
    # A file without an audio track: "skip" it (counted in the build report) or fill "silence".
    missing_audio: str = "skip"

    def __post_init__(self):
        if self.num_frames % self.snippet_frames:
            raise ValueError(f"MediaSpec.num_frames ({self.num_frames}) must be a multiple of "
                             f"snippet_frames ({self.snippet_frames})")
        if self.missing_audio not in ("skip", "silence"):
            raise ValueError(f"MediaSpec.missing_audio must be 'skip' or 'silence', got {self.missing_audio!r}")
        if self.samples_per_snippet_exact.denominator != 1:
            raise ValueError(f"MediaSpec: {self.snippet_frames} frames at {self.fps} fps is not a whole number of "
                             f"samples at {self.sample_rate} Hz")

    @property
    def samples_per_snippet_exact(self) -> Fraction:
        return Fraction(self.snippet_frames) / Fraction(str(self.fps)) * self.sample_rate

    @property
    def samples_per_snippet(self) -> int:
        return int(self.samples_per_snippet_exact)

    @property
    def max_snippets(self) -> int:
        return self.num_frames // self.snippet_frames

    @property
    def snippet_seconds(self) -> float:
        return self.snippet_frames / self.fps

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, missing_audio: str = "skip") -> "MediaSpec":
        """The spec a model config expects (`config.model.video/audio`, `config.data.num_frames`)."""
        v = config.model.video
        return cls(fps=float(v.fps), num_frames=config.data.num_frames, snippet_frames=v.snippet_frames,
                   image_size=v.image_size, sample_rate=config.model.audio.sample_rate, missing_audio=missing_audio)


def example_features(spec: MediaSpec):
    """The TFDS FeaturesDict every builder writes: one example per clip, with all its texts.

    `video` [frames, size, size, 3] uint8 (stored as one image a frame, `data/storage.py`) and
    `audio` [frames / fps * sample_rate] int16 PCM hold whole snippets only (`num_snippets` of them,
    at most `spec.max_snippets`); padding to the model's length happens in the feature converter.
    `texts` holds one entry per question, caption or label asked of the clip (at least one); the
    SeqIO tasks expand a clip into one training example per text (`mirasol3b_data.tasks.per_text`).
    `evidence` holds the spans each text's answer rests on, as (text index, start, end) rows.
    """
    import numpy as np
    import tensorflow_datasets as tfds

    s = spec.image_size
    return tfds.features.FeaturesDict({
        "video": tfds.features.Video(shape=(None, s, s, 3), encoding_format="jpeg"),  # JPEG or PNG frames
        # A Tensor, not tfds.features.Audio: TFDS 4.9.10's Audio skips `encoding` for arrays.
        "audio": tfds.features.Tensor(shape=(None,), dtype=np.int16, encoding="zlib",
                                      doc=f"mono 16-bit PCM at {spec.sample_rate} Hz"),
        "num_snippets": tfds.features.Scalar(dtype=np.int32),
        "audio_missing": tfds.features.Scalar(dtype=np.bool_),  # True: silence was filled in
        "source": tfds.features.Text(),  # the media file, relative to the manual dir
        "texts": tfds.features.Sequence({field: tfds.features.Text() for field in TEXT_FIELDS}),
        # One row per span, flat over the clip's texts: TFDS 4.9.10 cannot store a ragged [spans, 2]
        # inside the `texts` Sequence (its serializer stacks rows of different lengths).
        "evidence": tfds.features.Sequence({
            "text": tfds.features.Scalar(dtype=np.int32, doc="index into texts"),
            "start": tfds.features.Scalar(dtype=np.float32, doc="seconds from the clip's first frame"),
            "end": tfds.features.Scalar(dtype=np.float32, doc="seconds, > start")}),
    })
