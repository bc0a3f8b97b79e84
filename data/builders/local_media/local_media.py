"""`local_media`: a TFDS dataset built from media files and annotations the user already has."""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os

import tensorflow_datasets as tfds
from absl import logging
from etils import epath

try:  # `tfds build data/builders/local_media` imports this file as `local_media.local_media`
    import mirasol3b_data.spec  # noqa: F401
except ImportError as e:
    raise ImportError("the data/ package is installed as mirasol3b_data: `make install` (or `pip install -e .`) "
                      "in the repository first") from e

from mirasol3b_data import readers, storage
from mirasol3b_data.builders import FileCodePath
from mirasol3b_data.builders.report import SkipExample, Skipped
from mirasol3b_data.builders.splits import ClipSplits, Text, clip_outcomes, travel_by_value
from mirasol3b_data.spec import MediaSpec, example_features

# Media geometry presets, equal to what configs/tiny.py, configs/mirasol3b.py and configs/long_video.py
# ask for (a test keeps them equal); literal here because `tfds build` may run where `configs` is not importable.
GEOMETRIES = {
    "tiny": dict(fps=8.0, num_frames=8, snippet_frames=2, image_size=32, sample_rate=16_000),
    "base": dict(fps=6.25, num_frames=128, snippet_frames=16, image_size=224, sample_rate=16_000),
    "long": dict(fps=6.25, num_frames=512, snippet_frames=16, image_size=224, sample_rate=16_000),
}
SOURCES = ("manifest", "msrvtt_qa", "activitynet_qa", "nextqa", "vggsound", "kinetics_sound")
VIDEO_DIR = "videos"  # where the public formats' videos are, inside the manual dir
KINETICS_SOUND_CLASSES = "kinetics_sound_classes.txt"
NEXTQA_MAP = "map_vid_vidorID.json"
NEXTQA_GROUNDING = "gsub_{stem}.json"  # NExT-GQA's time spans of the questions in {stem}.csv
FINGERPRINT_KEY = "manual_dir_fingerprint"  # in the dataset's metadata.json, see `_fingerprint`
# Public releases' per-split files: (file stem, TFDS split); Kinetics' validation file is "validate"
# (DeepMind's release) or "val" (CVDF's).
_SPLIT_FILES = (("train", "train"), ("val", "validation"), ("test", "test"))
_KINETICS_SPLIT_FILES = (("train", "train"), ("validate", "validation"), ("val", "validation"), ("test", "test"))
_OTHER_ANNOTATION_FILES = {  # read beside a source's per-split files, and fingerprinted too
    "nextqa": (NEXTQA_MAP, *(NEXTQA_GROUNDING.format(stem=stem) for stem, _ in _SPLIT_FILES)),
    "kinetics_sound": (KINETICS_SOUND_CLASSES,)}


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


class Builder(FileCodePath, ClipSplits, tfds.core.GeneratorBasedBuilder):
    """Media files plus annotations in a manual dir -> examples with the schema of `data/spec.py`:
    one per clip (a file and a start time), holding every text the annotations ask of it.

    Build (always name a config; without one `tfds build` builds every config):
        tfds build data/builders/local_media --config=tiny --manual_dir=MEDIA --data_dir=OUT
    or from Python: `Builder(config="tiny", data_dir=OUT).download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=MEDIA))`.

    Manual dir, by config `source`:
      manifest (configs "tiny", "base", and "*_silence"): `manifest.jsonl`, one JSON object per line
        {"video": "rel/path.mp4", "question": ..., "answer": ..., "question_type": ...} (QA),
        {"video": ..., "caption": ...} (captioning) or {"video": ..., "label": ...} (classification),
        each with optional "start" (seconds) and "split" (default "train"; "val" means "validation"), and
        a question with optional "evidence": [[start, end], ...], seconds of the file its answer rests on.
        Paths are relative to the manual dir.
      msrvtt_qa: {train,val,test}_qa.json; videos/video{N}.mp4.
      activitynet_qa: {train,val,test}_q.json and _a.json; videos/v_{name}.{mp4,mkv,webm}.
      nextqa: {train,val,test}.csv (NExT-QA's, or NExT-GQA's with text answers), optional map_vid_vidorID.json,
        optional gsub_{val,test}.json (NExT-GQA's grounding); videos/{path}.mp4.
      vggsound: vggsound.csv (its split column); videos/{youtube_id}_{start:06d}.mp4.
      kinetics_sound: {train,validate or val,test}.csv of Kinetics plus kinetics_sound_classes.txt (one
        class per line); videos/{youtube_id}_{start:06d}_{end:06d}.mp4, or in any folder below videos/
        (the crawler's <label>/, CVDF's <split>/). An unlabelled test.csv (600/700) is left out.
      (Per-split files: whichever exist; `data/readers.py` documents each layout.)
    A file or line that cannot become an example is skipped and listed in `skipped.jsonl`, one row per
    text (see `data/builders/report.py`); a split with no example left fails the build.

    A build records a fingerprint of the manual dir (`_fingerprint`) in the dataset's metadata.json. TFDS
    reuses an existing dataset without reading the manual dir; here such a reuse fails with
    `ManualDirChangedError` when the manual dir holds annotations and they, or the media they list,
    differ from the build's (`--overwrite` rebuilds). Without annotations there (a load with no
    manual dir) nothing is compared.
    """

    VERSION = tfds.core.Version("2.1.0")
    RELEASE_NOTES = {"1.0.0": "Initial release.",
                     "2.0.0": "One example per clip holding all its texts (was one per text, each with its own "
                              "copy of the clip); frames stored as JPEG/PNG images, audio as int16. Builds on "
                              "Apache Beam with --beam_pipeline_options.",
                     "2.1.0": "Each text's evidence spans (NExT-GQA's grounding annotations for nextqa, an optional "
                              "\"evidence\" field in the manifest)."}
    BUILDER_CONFIGS = _configs()
    builder_config_cls = LocalMediaConfig  # `tfds build --config='{"name": ..., "fps": ...}'` builds a custom one
    MANUAL_DOWNLOAD_INSTRUCTIONS = ("Put the annotations (manifest.jsonl, or a public format's files) and the media in "
                                    "one folder and pass it as --manual_dir; the docstring of local_media.Builder "
                                    "gives the layout of each config's source.")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, description=self.builder_config.description,
                                     features=example_features(self.builder_config.spec),
                                     metadata=tfds.core.MetadataDict())

    def download_and_prepare(self, *, download_dir=None, download_config=None, **kwargs):
        """TFDS's, after `_check_manual_dir` when TFDS would reuse an existing dataset."""
        mode = (download_config or tfds.download.DownloadConfig()).download_mode
        if (not mode.overwrite_dataset and mode != tfds.download.GenerateMode.UPDATE_DATASET_INFO
                and self.data_path.exists()):
            self._check_manual_dir(download_dir, download_config)
        super().download_and_prepare(download_dir=download_dir, download_config=download_config, **kwargs)

    def _check_manual_dir(self, download_dir, download_config) -> None:
        """Raises `ManualDirChangedError` if the manual dir (TFDS's default one when none is given)
        holds annotations whose fingerprint is not the existing dataset's."""
        given = download_config.manual_dir if download_config else None
        if not given and "://" in os.fspath(download_dir or self.data_dir_root):
            return  # TFDS's default manual dir inside a bucket: no clips could be there to compare
        manual_dir = _manual_dir(given or epath.Path(download_dir or self.data_dir_root / "downloads") / "manual")
        try:
            _, now = _read(self.builder_config.source, manual_dir)
        except NoAnnotationsError:  # nothing there to compare (a missing companion file is an error)
            return
        name = f"{self.name}/{self.builder_config.name}"
        built = (self.info.metadata or {}).get(FINGERPRINT_KEY)
        if built is None:
            logging.warning("%s: the dataset in %s records no fingerprint of its manual dir (it was built before "
                            "they were recorded), so whether %s changed since cannot be told; reusing it. Pass "
                            "--overwrite to rebuild it.", name, self.data_path, manual_dir)
            return
        changes = [f"{manual_dir / file} {what} since the build"
                   for file, what in _changed_files(built["annotations"], now["annotations"])]
        if built["media"] != now["media"]:
            changes.append(f"the media files they list are not the same (a file added, removed or resized: "
                           f"{built['media_files']} listed then, {now['media_files']} now)")
        if changes:
            raise ManualDirChangedError(
                f"{name}: the dataset in {self.data_path} was built from other annotations or media than the "
                f"manual dir {manual_dir} holds now: {'; '.join(changes)}. Reusing it would give the old examples, "
                f"so it is not reused. Rebuild it by adding --overwrite to `tfds build` (from Python: DownloadConfig("
                f"download_mode=tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS)), or keep it and build the new "
                f"one elsewhere with another --data_dir.")

    def _split_generators(self, dl_manager):
        manual_dir = _manual_dir(dl_manager.manual_dir)
        records, fingerprint = _read(self.builder_config.source, manual_dir)
        splits = collections.defaultdict(list)
        for annotation, line, checked, default_split in records:
            splits[checked.split or default_split].append((annotation, line, checked))
        if not splits:
            raise ValueError(f"{self.name}/{self.builder_config.name}: the annotations in {manual_dir} hold no entries")
        self.info.metadata[FINGERPRINT_KEY] = fingerprint  # written with the dataset, only if the build succeeds
        self.report(sorted(splits))
        make = _Maker(manual_dir, self.builder_config.spec, self.decode_threads)
        return {split: self.split(split, _clips(manual_dir, items), make) for split, items in sorted(splits.items())}

    def _generate_examples(self, **kwargs):  # `_split_generators` returns the generators itself
        raise NotImplementedError


class ManualDirChangedError(RuntimeError):
    """The manual dir's annotations or media differ from those the existing dataset was built from."""


class NoAnnotationsError(FileNotFoundError):
    """The manual dir holds none of the source's annotation files."""


def _manual_dir(path) -> epath.Path:
    """The manual dir, a local folder or one in a bucket (`gs://`: epath keeps the scheme, which
    pathlib would turn into `gs:/`). Clips in a bucket are copied to a local temporary file to
    decode (`mirasol3b_data.media.decode_clip`)."""
    path = os.fspath(path)
    return epath.Path(path if "://" in path else os.path.expanduser(path))


def _annotation_files(source: str, manual_dir: epath.Path):
    """[(annotation file name, default split, reader)] of the files present in the manual dir."""
    videos = str(manual_dir / VIDEO_DIR)
    if source == "manifest":
        files = [("manifest.jsonl", "train", lambda p: readers.read_manifest(p))]
    elif source == "msrvtt_qa":
        files = [(f"{stem}_qa.json", split, lambda p: readers.read_msrvtt_qa(p, videos)) for stem, split in _SPLIT_FILES]
    elif source == "activitynet_qa":
        files = [(f"{stem}_q.json", split, lambda p: readers.read_activitynet_qa(
            p, str(p).removesuffix("_q.json") + "_a.json", videos)) for stem, split in _SPLIT_FILES]
    elif source == "nextqa":
        files = [(f"{stem}.csv", split, lambda p: readers.read_nextqa(
            p, videos, _if_present(manual_dir / NEXTQA_MAP),
            _if_present(manual_dir / NEXTQA_GROUNDING.format(stem=p.stem)))) for stem, split in _SPLIT_FILES]
    elif source == "vggsound":
        files = [("vggsound.csv", "train", lambda p: readers.read_vggsound(p, videos))]
    else:
        classes = manual_dir / KINETICS_SOUND_CLASSES
        names = readers.read_class_list(classes) if classes.exists() else None  # required below, if any file
        files = [(f"{stem}.csv", split, lambda p: readers.read_kinetics_sound(p, videos, names))
                 for stem, split in _KINETICS_SPLIT_FILES]
    present = [(name, split, read) for name, split, read in files if (manual_dir / name).exists()]
    if not present:
        raise NoAnnotationsError(f"local_media/{source}: no annotations in the manual dir; expected "
                                 f"{' or '.join(str(manual_dir / name) for name, _, _ in files)}")
    if source == "kinetics_sound" and not (manual_dir / KINETICS_SOUND_CLASSES).exists():
        raise FileNotFoundError(f"local_media/{source}: expected the Kinetics-Sound class list (one class per "
                                f"line) at {manual_dir / KINETICS_SOUND_CLASSES}")
    files_of = collections.defaultdict(list)  # split -> its files
    for name, split, _ in present:
        files_of[split].append(name)
    for split, same in files_of.items():
        if len(same) > 1:  # Kinetics' validate.csv and val.csv: the same split twice
            raise ValueError(f"local_media/{source}: {' and '.join(str(manual_dir / n) for n in same)} are both "
                             f"the {split} split; keep one")
    return present


def _if_present(path: epath.Path) -> epath.Path | None:
    return path if path.exists() else None


def _read(source: str, manual_dir: epath.Path):
    """([(annotation file, line, Record or BadRow, default split)], fingerprint) of the manual dir."""
    manual_dir = epath.Path(manual_dir)
    files = _annotation_files(source, manual_dir)
    records = []
    for name, split, read in files:
        try:
            records += [(name, line, item if isinstance(item, readers.BadRow) else readers.check_record(item), split)
                        for line, item in read(manual_dir / name)]
        except readers.UnlabelledSplitFile as e:
            logging.warning("local_media/%s: %s; leaving the %s split out", source, e, split)
    extra = [name for name in _OTHER_ANNOTATION_FILES.get(source, ()) if (manual_dir / name).exists()]
    return records, _fingerprint(manual_dir, [name for name, _, _ in files] + extra, records)


def _fingerprint(manual_dir: epath.Path, annotation_files, records) -> dict:
    """What a build reads from the manual dir, in short: the SHA-256 of each annotation file, and one of
    the path (relative to the manual dir) and size of every media file the records use (-1: no such
    file). Sizes, not mtimes: copying a folder seldom keeps mtimes, and a replaced clip (re-encoded,
    repaired, added where one was missing) almost never keeps its size. One stat per file, so a check
    over a large dataset's manual dir costs about what listing it does."""
    annotations = {}
    for name in annotation_files:
        digest = hashlib.sha256()
        with (manual_dir / name).open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        annotations[name] = digest.hexdigest()
    media = {}
    for _, _, record, _ in records:
        if isinstance(record, readers.Record) and record.video not in media:
            try:
                media[record.video] = _media_path(manual_dir, record.video).stat().length
            except OSError:
                media[record.video] = -1
    sizes = sorted((_source(manual_dir, video), size) for video, size in media.items())
    return {"annotations": annotations, "media": hashlib.sha256(json.dumps(sizes).encode()).hexdigest(),
            "media_files": len(sizes)}


def _changed_files(built: dict, now: dict):
    """(file, "changed" / "was added" / "was removed") for the annotation files whose hash differs."""
    for name in sorted(built.keys() | now.keys()):
        if built.get(name) != now.get(name):
            yield name, "changed" if name in built and name in now else "was added" if name in now else "was removed"


def _media_path(manual_dir: epath.Path, video: str) -> epath.Path:
    return manual_dir / video  # an absolute `video` stays as it is


def _source(manual_dir: epath.Path, video: str) -> str:
    """The media file relative to the manual dir (as given when it lies elsewhere)."""
    path = _media_path(manual_dir, video)
    try:
        return path.relative_to(manual_dir).as_posix()
    except ValueError:
        return str(path)


def _clips(manual_dir: epath.Path, items) -> list:
    """A split's work items: each clip (video, start, its Texts in annotation order), then each bad
    row as its `Skipped` outcome."""
    texts, bad = collections.defaultdict(list), []
    for annotation, line, record in sorted(items, key=lambda it: (it[0], it[1])):
        if isinstance(record, readers.BadRow):
            bad.append(Skipped(_source(manual_dir, record.video) if record.video else "", record.reason, record.detail,
                               annotation, line))
        else:
            texts[(record.video, record.start)].append(Text(record.prompt, record.answer, record.kind,
                                                            record.question_type, annotation, line, record.evidence))
    return [(video, start, tuple(t)) for (video, start), t in sorted(texts.items())] + bad


class _Maker:
    """Work item -> [(key, example)] or its `Skipped` rows (one per text of a clip that fails)."""

    def __init__(self, manual_dir: epath.Path, spec: MediaSpec, threads: int = 0):
        self.manual_dir, self.spec, self.threads = manual_dir, spec, threads

    def __call__(self, item) -> list:
        if isinstance(item, Skipped):
            return [item]
        video, start, texts = item
        source = _source(self.manual_dir, video)
        return clip_outcomes(f"{source}@{start!r}", source, texts, lambda: self._example(video, start, source, texts))

    def _example(self, video: str, start: float, source: str, texts) -> dict:
        from mirasol3b_data.media import decode_clip  # imported here: the decoder is only needed to build

        clip = decode_clip(_media_path(self.manual_dir, video), self.spec, start_seconds=start, threads=self.threads)
        if clip.audio_missing and self.spec.missing_audio != "silence":  # the decoder's job; a cheap guard
            raise SkipExample("no_audio_track", "the decoder returned silence under missing_audio='skip'")
        length = clip.num_snippets * self.spec.snippet_seconds
        texts = [dataclasses.replace(t, evidence=_clip_spans(t.evidence, start, length)) for t in texts]
        return storage.clip_example(clip.video, clip.audio, clip.num_snippets, clip.audio_missing, source, texts)


def _clip_spans(spans, start: float, length: float) -> tuple[tuple[float, float], ...]:
    """Spans in seconds of the file -> seconds from the first frame of its clip (`start` to `start +
    length`), cut to the clip. A span wholly outside it is left out: its text is kept (the answer
    may still be right), only not located in what is stored."""
    cut = ((max(a - start, 0.0), min(b - start, length)) for a, b in spans)
    return tuple((a, b) for a, b in cut if a < b)


travel_by_value(__name__)
