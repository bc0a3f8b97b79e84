"""`local_media`: a TFDS dataset built from media files and annotations the user already has."""

from __future__ import annotations

import collections
import dataclasses
import sys
from pathlib import Path

import tensorflow_datasets as tfds

try:
    import data.spec  # noqa: F401
except ImportError:  # `tfds build data/builders/local_media` imports this file as `local_media.local_media`
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from data import readers
from data.builders import FileCodePath
from data.builders.report import BuildReport, SkipExample
from data.spec import MediaSpec, example_features

# Media geometry presets, equal to what configs/tiny.py and configs/mirasol3b.py ask for (a test keeps
# them equal); literal here because `tfds build` may run where `configs` is not importable.
GEOMETRIES = {
    "tiny": dict(fps=8.0, num_frames=8, snippet_frames=2, image_size=32, sample_rate=16_000),
    "base": dict(fps=6.25, num_frames=128, snippet_frames=16, image_size=224, sample_rate=16_000),
}
SOURCES = ("manifest", "msrvtt_qa", "activitynet_qa", "nextqa", "vggsound", "kinetics_sound")
VIDEO_DIR = "videos"  # where the public formats' videos are, inside the manual dir
KINETICS_SOUND_CLASSES = "kinetics_sound_classes.txt"
# Public releases' per-split files: (file stem, TFDS split); Kinetics names its validation file "validate".
_SPLIT_FILES = (("train", "train"), ("val", "validation"), ("test", "test"))
_KINETICS_SPLIT_FILES = (("train", "train"), ("validate", "validation"), ("test", "test"))


@dataclasses.dataclass(eq=False)
class LocalMediaConfig(tfds.core.BuilderConfig):
    """Media geometry (as `MediaSpec`), what to do with a file without audio, and which annotations
    the manual dir holds (`source`: "manifest" or one of the public formats, see `Builder`)."""

    fps: float = GEOMETRIES["tiny"]["fps"]
    num_frames: int = GEOMETRIES["tiny"]["num_frames"]
    snippet_frames: int = GEOMETRIES["tiny"]["snippet_frames"]
    image_size: int = GEOMETRIES["tiny"]["image_size"]
    sample_rate: int = GEOMETRIES["tiny"]["sample_rate"]
    missing_audio: str = "skip"
    source: str = "manifest"

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f"LocalMediaConfig.source must be one of {SOURCES}, got {self.source!r}")
        self.spec  # validates the geometry now rather than mid-build

    @property
    def spec(self) -> MediaSpec:
        return MediaSpec(fps=float(self.fps), num_frames=self.num_frames, snippet_frames=self.snippet_frames,
                         image_size=self.image_size, sample_rate=self.sample_rate, missing_audio=self.missing_audio)


def _configs() -> list[LocalMediaConfig]:
    """"tiny", "tiny_silence", "base", "base_silence" read manifest.jsonl; "{source}_{geometry}[_silence]"
    read a public format."""
    out = []
    for source in SOURCES:
        for geometry, values in GEOMETRIES.items():
            for missing_audio in ("skip", "silence"):
                name = geometry if source == "manifest" else f"{source}_{geometry}"
                name += "_silence" if missing_audio == "silence" else ""
                out.append(LocalMediaConfig(
                    name=name, source=source, missing_audio=missing_audio, **values,
                    description=f"{source} annotations, {geometry} geometry ({values['fps']} fps, "
                                f"{values['num_frames']} frames, {values['image_size']} px); files without "
                                f"audio are {'filled with silence' if missing_audio == 'silence' else 'skipped'}"))
    return out


class Builder(FileCodePath, tfds.core.GeneratorBasedBuilder):
    """Media files plus annotations in a manual dir -> examples with the schema of `data/spec.py`.

    Build (always name a config; without one `tfds build` builds every config):
        tfds build data/builders/local_media --config=tiny --manual_dir=MEDIA --data_dir=OUT
    or from Python: `Builder(config="tiny", data_dir=OUT).download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=MEDIA))`.

    Manual dir, by config `source`:
      manifest (configs "tiny", "base", and "*_silence"): `manifest.jsonl`, one JSON object per line
        {"video": "rel/path.mp4", "question": ..., "answer": ..., "question_type": ...} (QA),
        {"video": ..., "caption": ...} (captioning) or {"video": ..., "label": ...} (classification),
        each with optional "start" (seconds) and "split" (default "train"; "val" means "validation").
        Paths are relative to the manual dir.
      msrvtt_qa: {train,val,test}_qa.json; videos/video{N}.mp4.
      activitynet_qa: {train,val,test}_q.json and _a.json; videos/v_{name}.{mp4,mkv,webm}.
      nextqa: {train,val,test}.csv, optional map_vid_vidorID.json; videos/{path}.mp4.
      vggsound: vggsound.csv (its split column); videos/{youtube_id}_{start:06d}.mp4.
      kinetics_sound: {train,validate,test}.csv of Kinetics plus kinetics_sound_classes.txt (one
        class per line); videos/{youtube_id}_{start:06d}_{end:06d}.mp4.
      (Per-split files: whichever exist; `data/readers.py` documents each layout.)
    A file or line that cannot become an example is skipped and listed in `skipped.jsonl` (see
    `data/builders/report.py`); a split with no example left fails the build.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = _configs()
    builder_config_cls = LocalMediaConfig  # `tfds build --config='{"name": ..., "fps": ...}'` builds a custom one
    MANUAL_DOWNLOAD_INSTRUCTIONS = ("Put the annotations (manifest.jsonl, or a public format's files) and the media in "
                                    "one folder and pass it as --manual_dir; the docstring of local_media.Builder "
                                    "gives the layout of each config's source.")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, description=self.builder_config.description,
                                     features=example_features(self.builder_config.spec))

    def _split_generators(self, dl_manager):
        manual_dir = Path(dl_manager.manual_dir)
        splits = collections.defaultdict(list)
        for annotation, line, item, default_split in _annotations(self.builder_config.source, manual_dir):
            checked = item if isinstance(item, readers.BadRow) else readers.check_record(item)
            splits[checked.split or default_split].append((annotation, line, checked))
        if not splits:
            raise ValueError(f"{self.name}/{self.builder_config.name}: the annotations in {manual_dir} hold no entries")
        report = BuildReport(self, sorted(splits))
        spec = self.builder_config.spec
        return {split: report.generate(split, _decode_order(items), _Maker(manual_dir, spec), _describe(manual_dir))
                for split, items in sorted(splits.items())}

    def _generate_examples(self, **kwargs):  # `_split_generators` returns the generators itself
        raise NotImplementedError


def _annotations(source: str, manual_dir: Path):
    """Yields (annotation file, line, record or BadRow, default split) for the manual dir's annotations."""
    videos = str(manual_dir / VIDEO_DIR)
    if source == "manifest":
        files = [("manifest.jsonl", "train", lambda p: readers.read_manifest(p))]
    elif source == "msrvtt_qa":
        files = [(f"{stem}_qa.json", split, lambda p: readers.read_msrvtt_qa(p, videos)) for stem, split in _SPLIT_FILES]
    elif source == "activitynet_qa":
        files = [(f"{stem}_q.json", split, lambda p: readers.read_activitynet_qa(
            p, str(p).removesuffix("_q.json") + "_a.json", videos)) for stem, split in _SPLIT_FILES]
    elif source == "nextqa":
        mapping = manual_dir / "map_vid_vidorID.json"
        files = [(f"{stem}.csv", split, lambda p: readers.read_nextqa(p, videos, mapping if mapping.exists() else None))
                 for stem, split in _SPLIT_FILES]
    elif source == "vggsound":
        files = [("vggsound.csv", "train", lambda p: readers.read_vggsound(p, videos))]
    else:
        classes = manual_dir / KINETICS_SOUND_CLASSES
        if not classes.exists():
            raise FileNotFoundError(f"local_media/{source}: expected the Kinetics-Sound class list (one class per "
                                    f"line) at {classes}")
        names = readers.read_class_list(classes)
        files = [(f"{stem}.csv", split, lambda p: readers.read_kinetics_sound(p, videos, names))
                 for stem, split in _KINETICS_SPLIT_FILES]
    present = [(name, split, read) for name, split, read in files if (manual_dir / name).exists()]
    if not present:
        raise FileNotFoundError(f"local_media/{source}: no annotations in the manual dir; expected "
                                f"{' or '.join(str(manual_dir / name) for name, _, _ in files)}")
    for name, split, read in present:
        for line, item in read(manual_dir / name):
            yield name, line, item, split


def _decode_order(items):
    """Questions on the same clip come next to each other, so `_Maker` decodes each clip once."""
    return sorted(items, key=lambda it: (isinstance(it[2], readers.BadRow), getattr(it[2], "video", ""),
                                         getattr(it[2], "start", 0.0), it[0], it[1]))


def _media_path(manual_dir: Path, video: str) -> Path:
    return manual_dir / video  # an absolute `video` stays as it is


def _source(manual_dir: Path, video: str) -> str:
    """The media file relative to the manual dir (as given when it lies elsewhere)."""
    path = _media_path(manual_dir, video)
    try:
        return path.relative_to(manual_dir).as_posix()
    except ValueError:
        return str(path)


def _describe(manual_dir: Path):
    def describe(item):
        annotation, line, record = item
        return {"key": f"{annotation}:{line}", "file": _source(manual_dir, record.video) if record.video else "",
                "annotation": annotation, "line": line}
    return describe


class _Maker:
    """Record -> example; keeps the last decoded clip (or its error) for the next record on the same clip."""

    def __init__(self, manual_dir: Path, spec: MediaSpec):
        from data.media import MediaError, decode_clip  # imported here: the decoder is only needed to build

        self.manual_dir, self.spec, self.decode, self.error_type = manual_dir, spec, decode_clip, MediaError
        self.last = (None, None)  # ((video, start), Clip or MediaError)

    def clip(self, record: readers.Record):
        key = (record.video, record.start)
        if self.last[0] != key:
            try:
                result = self.decode(_media_path(self.manual_dir, record.video), self.spec, start_seconds=record.start)
            except self.error_type as e:
                result = e
            self.last = (key, result)
        if isinstance(self.last[1], Exception):
            raise self.last[1]
        return self.last[1]

    def __call__(self, item) -> dict:
        _, _, record = item
        if isinstance(record, readers.BadRow):
            raise SkipExample(record.reason, record.detail)
        clip = self.clip(record)
        if clip.audio_missing and self.spec.missing_audio != "silence":  # the decoder's job; a cheap guard
            raise SkipExample("no_audio_track", "the decoder returned silence under missing_audio='skip'")
        return {"video": clip.video, "audio": clip.audio, "num_snippets": clip.num_snippets,
                "audio_missing": clip.audio_missing, "prompt": record.prompt, "answer": record.answer,
                "kind": record.kind, "question_type": record.question_type,
                "source": _source(self.manual_dir, record.video)}
