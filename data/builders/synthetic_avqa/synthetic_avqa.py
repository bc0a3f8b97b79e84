"""`synthetic_avqa`: generated audio-visual QA clips, the embedded default dataset (no download).

Each example is drawn by `data/synthetic.py`, encoded to a real h264/aac mp4 (`data/encode.py`) and
decoded back with `data/media.py`, the decode path of users' files, so the demo runs the real
pipeline: frame-rate conversion, resizing, audio resampling and codec loss included. A clip is
`num_frames / fps` seconds (1 s at the tiny geometry: 4 snippets); runs of clips share one file
(see `_Maker`). An example is a clip with its questions (`data/spec.py`): the "tiny" config builds
2600 clips with 8600 questions (4 a training clip).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import tempfile
from collections.abc import Sequence

import numpy as np
import tensorflow_datasets as tfds

try:  # `tfds build data/builders/synthetic_avqa` imports this file as `synthetic_avqa.synthetic_avqa`
    import mirasol3b_data.spec  # noqa: F401
except ImportError as e:
    raise ImportError("the data/ package is installed as mirasol3b_data: `make install` (or `pip install -e .`) "
                      "in the repository first") from e

from mirasol3b_data import storage, synthetic
from mirasol3b_data.builders import FileCodePath
from mirasol3b_data.builders.report import SkipExample
from mirasol3b_data.builders.splits import ClipSplits, Text, clip_outcomes, travel_by_value
from mirasol3b_data.spec import MediaSpec, example_features

# Media geometry, equal to what configs/tiny.py asks for (a test keeps them equal); literal here
# because `tfds build` may run where `configs` is not importable.
GEOMETRIES = {"tiny": dict(fps=8.0, num_frames=8, snippet_frames=2, image_size=32, sample_rate=16_000),
              # 32 snippets (8 s), events spread over the clip (`synthetic.LONG_SNIPPETS`): for streaming models
              "long": dict(fps=8.0, num_frames=64, snippet_frames=2, image_size=32, sample_rate=16_000)}
GEOMETRY_OF = {"tiny": "tiny", "tiny_smoke": "tiny", "long": "long"}
# (train, validation, test) examples per config.
SPLIT_SIZES = {"tiny": (2000, 300, 300), "tiny_smoke": (40, 10, 10), "long": (2000, 300, 300)}
# Questions per training clip. With one, the tiny model learnt 2000 clips by heart (train token
# accuracy 1.0) with validation at 69%; with four the answer must depend on the question as well.
TRAIN_QUESTIONS_PER_CLIP = {"tiny": 4, "tiny_smoke": 1, "long": 4}


@dataclasses.dataclass(eq=False)
class SyntheticAvqaConfig(tfds.core.BuilderConfig):
    """Model geometry (as `MediaSpec`), split sizes, seed, and the finer geometry clips are
    rendered at before encoding (`synthetic.SourceSpec`)."""

    fps: float = GEOMETRIES["tiny"]["fps"]
    num_frames: int = GEOMETRIES["tiny"]["num_frames"]
    snippet_frames: int = GEOMETRIES["tiny"]["snippet_frames"]
    image_size: int = GEOMETRIES["tiny"]["image_size"]
    sample_rate: int = GEOMETRIES["tiny"]["sample_rate"]
    train_size: int = SPLIT_SIZES["tiny"][0]
    validation_size: int = SPLIT_SIZES["tiny"][1]
    test_size: int = SPLIT_SIZES["tiny"][2]
    seed: int = 0
    # Questions per training clip: the first is balanced (`synthetic.sample_qa`), the rest are
    # `synthetic.extra_questions` about the same clip. Evaluation splits always ask one. tiny's by
    # default: with one, a model can learn the clips by heart instead of the question.
    train_questions_per_clip: int = TRAIN_QUESTIONS_PER_CLIP["tiny"]
    source_fps: int = 24
    source_image_size: int = 64
    source_sample_rate: int = 44_100
    clips_per_file: int = 16  # clips encoded into one mp4 and decoded together
    workers: int = 2  # runs of clips made at once

    def __post_init__(self):
        self.source  # validates both geometries now rather than mid-build
        if self.clips_per_file < 1 or self.workers < 1 or self.train_questions_per_clip < 1:
            raise ValueError(f"SyntheticAvqaConfig: clips_per_file, workers and train_questions_per_clip must be "
                             f">= 1, got {self.clips_per_file}, {self.workers}, {self.train_questions_per_clip}")
        if self.spec.max_snippets < synthetic.MIN_SNIPPETS:
            raise ValueError(f"SyntheticAvqaConfig: clips need >= {synthetic.MIN_SNIPPETS} snippets, "
                             f"num_frames={self.num_frames} gives {self.spec.max_snippets}")
        if min(self.split_sizes.values()) < 1:
            raise ValueError(f"SyntheticAvqaConfig: every split needs >= 1 example, got {self.split_sizes}")

    @property
    def spec(self) -> MediaSpec:
        return MediaSpec(fps=float(self.fps), num_frames=self.num_frames, snippet_frames=self.snippet_frames,
                         image_size=self.image_size, sample_rate=self.sample_rate)

    @property
    def source(self) -> synthetic.SourceSpec:
        source = synthetic.SourceSpec(snippet_seconds=self.spec.snippet_seconds, fps=self.source_fps,
                                      image_size=self.source_image_size, sample_rate=self.source_sample_rate)
        source.frames_per_snippet, source.samples_per_snippet  # noqa: B018  (raise if not whole)
        return source

    @property
    def split_sizes(self) -> dict[str, int]:
        return dict(zip(synthetic.SPLITS, (self.train_size, self.validation_size, self.test_size)))


def _configs() -> list[SyntheticAvqaConfig]:
    return [SyntheticAvqaConfig(name=name, train_size=train, validation_size=val, test_size=test,
                                train_questions_per_clip=TRAIN_QUESTIONS_PER_CLIP[name],
                                **GEOMETRIES[GEOMETRY_OF[name]],
                                description=f"{GEOMETRY_OF[name]} geometry; {train}/{val}/{test} train/validation/test "
                                            "clips, "
                                            f"{TRAIN_QUESTIONS_PER_CLIP[name]} question(s) per training clip")
            for name, (train, val, test) in SPLIT_SIZES.items()]


class Builder(FileCodePath, ClipSplits, tfds.core.GeneratorBasedBuilder):
    """Generated clips of two coloured shapes and two tones with a question each (`data/synthetic.py`
    lists the templates and the answer set), in the schema of `data/spec.py`.

    Build: `tfds build data/builders/synthetic_avqa --config=tiny --data_dir=OUT`, or from Python
    `Builder(config="tiny", data_dir=OUT).download_and_prepare()`. A custom size or seed:
    `--config='{"name": "mine", "train_size": 500, "seed": 1}'` or `Builder(config=SyntheticAvqaConfig(...))`.
    With `--beam_pipeline_options=...` the runs of clips are made on Apache Beam (`data/builders/splits.py`).
    """

    VERSION = tfds.core.Version("2.1.0")
    RELEASE_NOTES = {"1.0.0": "Initial release.",
                     "1.1.0": "tiny: 4 questions per training clip (was 1).",
                     "2.0.0": "One example per clip holding all its questions (was one per question, each with its "
                              "own copy of the clip); frames stored as PNG/JPEG images, audio as int16.",
                     "2.1.0": "Each question's evidence: the time spans its answer rests on (`synthetic.evidence`)."}
    BUILDER_CONFIGS = _configs()
    builder_config_cls = SyntheticAvqaConfig

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, description=self.builder_config.description,
                                     features=example_features(self.builder_config.spec))

    def _split_generators(self, dl_manager):
        cfg = self.builder_config
        self.report(synthetic.SPLITS)
        make, k = _Maker(cfg, self.decode_threads), cfg.clips_per_file
        return {split: self.split(split, [(split, tuple(range(start, min(start + k, size))))
                                          for start in range(0, size, k)], make, workers=cfg.workers)
                for split, size in cfg.split_sizes.items()}

    def _generate_examples(self, **kwargs):  # `_split_generators` returns the generators itself
        raise NotImplementedError


class _Maker:
    """(split, a run of indices) -> [(key, example) or Skipped] for each clip of the run.

    The run's clips are generated, written one after another into one mp4 (`write_clip`) and
    decoded back in one `decode_clip` call, then cut into clips at snippet boundaries: ffmpeg's
    start-up, not the coding, is most of the cost of a clip this short.
    """

    def __init__(self, cfg: SyntheticAvqaConfig, threads: int = 0):
        self.cfg, self.spec, self.source, self.threads = cfg, cfg.spec, cfg.source, threads

    def questions(self, split: str, index: int, qa: synthetic.QA) -> list[Text]:
        """The clip's questions: one on evaluation splits, `train_questions_per_clip` on train. `line`
        numbers them within the clip (from 1), for the build report."""
        extra = self.cfg.train_questions_per_clip - 1 if split == "train" else 0
        seconds = self.spec.snippet_seconds
        return [Text(q.question, q.answer, "qa", q.question_type, line=j + 1,
                     evidence=tuple((a * seconds, b * seconds) for a, b in synthetic.evidence(q)))
                for j, q in enumerate([qa, *synthetic.extra_questions(self.cfg.seed, split, index, qa, extra)])]

    def __call__(self, item: tuple[str, Sequence[int]]) -> list:
        from mirasol3b_data.encode import write_clip  # imported here: only building needs ffmpeg and PyAV
        from mirasol3b_data.media import MediaError, decode_clip

        split, indices = item
        spec, source = self.spec, self.source
        drawn = [synthetic.generate_example(self.cfg.seed, split, i, spec.max_snippets, source) for i in indices]
        with tempfile.TemporaryDirectory(prefix="synthetic_avqa_") as tmp:
            path = os.path.join(tmp, "clips.mp4")
            write_clip(path, np.concatenate([frames for _, frames, _ in drawn]), source.fps,
                       np.concatenate([audio for _, _, audio in drawn]), source.sample_rate)
            try:
                run = decode_clip(path, dataclasses.replace(spec, num_frames=len(drawn) * spec.num_frames),
                                  threads=self.threads)
            except MediaError as e:
                run = e  # each clip of the run is skipped with it, below
        out = []
        for k, (index, (qa, _, _)) in enumerate(zip(indices, drawn)):
            key, texts = synthetic.source_id(self.cfg.seed, split, index), self.questions(split, index, qa)
            out += clip_outcomes(key, key, texts, functools.partial(self._cut, run, k, key, texts))
        return out

    def _cut(self, run, k: int, key: str, texts: list[Text]) -> dict:
        """The example of clip k of a decoded run; raises the run's MediaError if it failed."""
        if isinstance(run, Exception):
            raise run
        spec, snippets = self.spec, self.spec.max_snippets
        if (k + 1) * snippets > run.num_snippets:  # its last snippets' events would be lost
            raise SkipExample("too_short", f"the run decoded to {run.num_snippets} snippets, clip {k} needs "
                                           f"{(k + 1) * snippets}")
        frames, samples = spec.num_frames, snippets * spec.samples_per_snippet
        return storage.clip_example(run.video[k * frames:(k + 1) * frames], run.audio[k * samples:(k + 1) * samples],
                                    snippets, run.audio_missing, key, texts)


travel_by_value(__name__)
