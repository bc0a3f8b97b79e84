"""`synthetic_avqa`: generated audio-visual QA clips, the embedded default dataset (no download).

Each example is drawn by `data/synthetic.py`, encoded to a real h264/aac mp4 (`data/encode.py`) and
decoded back with `data/media.py`, the decode path of users' files, so the demo runs the real
pipeline: frame-rate conversion, resizing, audio resampling and codec loss included. A clip is
`num_frames / fps` seconds (1 s at the tiny geometry: 4 snippets); runs of clips share one file
(see `_Maker`). The "tiny" config builds 2600 clips, 8600 examples (4 questions a training clip),
in ~2.5 minutes on 2 cores.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

try:
    import data.spec  # noqa: F401
except ImportError:  # `tfds build data/builders/synthetic_avqa` imports this file as `synthetic_avqa.synthetic_avqa`
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from data import synthetic
from data.builders import FileCodePath
from data.builders.report import BuildReport, SkipExample
from data.spec import MediaSpec, example_features

# Media geometry, equal to what configs/tiny.py asks for (a test keeps them equal); literal here
# because `tfds build` may run where `configs` is not importable.
GEOMETRIES = {"tiny": dict(fps=8.0, num_frames=8, snippet_frames=2, image_size=32, sample_rate=16_000)}
# (train, validation, test) examples per config.
SPLIT_SIZES = {"tiny": (2000, 300, 300), "tiny_smoke": (40, 10, 10)}
# Questions per training clip. With one, the tiny model learnt 2000 clips by heart (train token
# accuracy 1.0) with validation at 69%; with four the answer must depend on the question as well.
TRAIN_QUESTIONS_PER_CLIP = {"tiny": 4, "tiny_smoke": 1}


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
                                train_questions_per_clip=TRAIN_QUESTIONS_PER_CLIP[name], **GEOMETRIES["tiny"],
                                description=f"tiny geometry; {train}/{val}/{test} train/validation/test clips, "
                                            f"{TRAIN_QUESTIONS_PER_CLIP[name]} question(s) per training clip")
            for name, (train, val, test) in SPLIT_SIZES.items()]


class Builder(FileCodePath, tfds.core.GeneratorBasedBuilder):
    """Generated clips of two coloured shapes and two tones with a question each (`data/synthetic.py`
    lists the templates and the answer set), in the schema of `data/spec.py`.

    Build: `tfds build data/builders/synthetic_avqa --config=tiny --data_dir=OUT`, or from Python
    `Builder(config="tiny", data_dir=OUT).download_and_prepare()`. A custom size or seed:
    `--config='{"name": "mine", "train_size": 500, "seed": 1}'` or `Builder(config=SyntheticAvqaConfig(...))`.
    """

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.0.0": "Initial release.",
                     "1.1.0": "tiny: 4 questions per training clip (was 1)."}
    BUILDER_CONFIGS = _configs()
    builder_config_cls = SyntheticAvqaConfig

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, description=self.builder_config.description,
                                     features=example_features(self.builder_config.spec))

    def _split_generators(self, dl_manager):
        cfg = self.builder_config
        report = BuildReport(self, synthetic.SPLITS)
        make = _Maker(cfg)
        return {split: report.generate(split, self._made(make, split, size), _unpack, _describe(cfg, split))
                for split, size in cfg.split_sizes.items()}

    def _made(self, make: "_Maker", split: str, size: int) -> Iterator[tuple[int, int, dict | Exception]]:
        k = self.builder_config.clips_per_file
        runs = (range(start, min(start + k, size)) for start in range(0, size, k))
        for made in _ordered_map(functools.partial(make, split), runs, self.builder_config.workers):
            yield from made

    def _generate_examples(self, **kwargs):  # `_split_generators` returns the generators itself
        raise NotImplementedError


class _Maker:
    """A run of indices of one split -> [(index, example or the error that skips it)].

    The run's clips are generated, written one after another into one mp4 (`write_clip`) and
    decoded back in one `decode_clip` call, then cut into clips at snippet boundaries: ffmpeg's
    start-up, not the coding, is most of the cost of a clip this short.
    """

    def __init__(self, cfg: SyntheticAvqaConfig):
        self.cfg, self.spec, self.source = cfg, cfg.spec, cfg.source

    def __call__(self, split: str, indices: Sequence[int]) -> list[tuple[int, int, dict | Exception]]:
        """-> [(index, question number, example or the error that skips the clip)]; a skipped clip
        is one item, whatever its number of questions."""
        from data.encode import write_clip  # imported here: only building needs ffmpeg and PyAV
        from data.media import MediaError, decode_clip

        spec, source, snippets = self.spec, self.source, self.spec.max_snippets
        drawn = [synthetic.generate_example(self.cfg.seed, split, i, snippets, source) for i in indices]
        with tempfile.TemporaryDirectory(prefix="synthetic_avqa_") as tmp:
            path = os.path.join(tmp, "clips.mp4")
            write_clip(path, np.concatenate([frames for _, frames, _ in drawn]), source.fps,
                       np.concatenate([audio for _, _, audio in drawn]), source.sample_rate)
            try:
                run = decode_clip(path, dataclasses.replace(spec, num_frames=len(drawn) * spec.num_frames))
            except MediaError as e:
                return [(i, 0, e) for i in indices]  # raised (and reported) by the consumer, see `_unpack`
        frames, samples = spec.num_frames, snippets * spec.samples_per_snippet
        extra = self.cfg.train_questions_per_clip - 1 if split == "train" else 0
        out = []
        for k, (index, (qa, _, _)) in enumerate(zip(indices, drawn)):
            if (k + 1) * snippets > run.num_snippets:  # its last snippets' events would be lost
                out.append((index, 0, SkipExample("too_short", f"the run decoded to {run.num_snippets} snippets, "
                                                               f"clip {k} needs {(k + 1) * snippets}")))
                continue
            media = {"video": run.video[k * frames:(k + 1) * frames], "audio": run.audio[k * samples:(k + 1) * samples],
                     "num_snippets": snippets, "audio_missing": run.audio_missing, "kind": "qa",
                     "source": synthetic.source_id(self.cfg.seed, split, index)}
            questions = [qa, *synthetic.extra_questions(self.cfg.seed, split, index, qa, extra)]
            out.extend((index, j, {**media, "prompt": q.question, "answer": q.answer, "question_type": q.question_type})
                       for j, q in enumerate(questions))
        return out


def _unpack(item: tuple[int, int, dict | Exception]) -> dict:
    example = item[2]
    if isinstance(example, Exception):
        raise example
    return example


def _describe(cfg: SyntheticAvqaConfig, split: str) -> Callable[[tuple], dict]:
    def describe(item):
        source = synthetic.source_id(cfg.seed, split, item[0])
        return {"key": source + (f"/q{item[1]}" if item[1] else ""), "file": source}
    return describe


def _ordered_map(fn: Callable, items: Iterable, workers: int) -> Iterator:
    """`map(fn, items)` run on `workers` threads, in order, at most 2 * workers results ahead."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        pending = collections.deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
