"""What a decoded example looks like: the media geometry (`MediaSpec`) and the stored features.

Every builder writes examples with `example_features(spec)`; the SeqIO tasks read them back. One
schema serves question answering, captioning and classification:
  prompt  the question (QA), or the fixed prompt of the task kind (captioning, classification);
  answer  the answer, the caption, or the label's name.
"""

from __future__ import annotations

import dataclasses
from fractions import Fraction

import ml_collections

KINDS = ("qa", "caption", "classification")
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
    """The TFDS FeaturesDict every builder writes.

    `video` uint8 [frames, size, size, 3] and `audio` float32 [frames / fps * sample_rate] hold whole
    snippets only (`num_snippets` of them, at most `spec.max_snippets`); padding to the model's
    length happens in the feature converter.
    """
    import tensorflow as tf
    import tensorflow_datasets as tfds

    s = spec.image_size
    return tfds.features.FeaturesDict({
        "video": tfds.features.Tensor(shape=(None, s, s, 3), dtype=tf.uint8, encoding="zlib"),
        "audio": tfds.features.Tensor(shape=(None,), dtype=tf.float32, encoding="zlib"),
        "num_snippets": tfds.features.Scalar(dtype=tf.int32),
        "audio_missing": tfds.features.Scalar(dtype=tf.bool),  # True: silence was filled in
        "prompt": tfds.features.Text(),
        "answer": tfds.features.Text(),
        "kind": tfds.features.Text(),  # one of KINDS
        "question_type": tfds.features.Text(),  # e.g. "what", "order"; "" where the task has none
        "source": tfds.features.Text(),  # the media file, relative to the manual dir
    })
