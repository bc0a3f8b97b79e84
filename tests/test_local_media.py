"""Behaviour of the `local_media` builder, its build report and the public-format readers.

Clips are tiny real h264/aac files (64x48, 1.5 s) built with `mirasol3b_data.encode.write_clip`; every build
uses the "tiny" geometry (8 fps, 2-frame snippets, 32 px), so 1.5 s of video gives 4 snippets.
"""

import collections
import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import tensorflow_datasets as tfds

from mirasol3b_data import readers
from mirasol3b_data.builders.local_media import local_media
from mirasol3b_data.builders.report import EmptySplitError, skipped_report_path
from mirasol3b_data.encode import ffmpeg_exe, write_clip
from mirasol3b_data.media import MediaError, decode_clip
from test_remote_paths import fake_bucket  # noqa: F401
from mirasol3b_data.spec import DEFAULT_PROMPTS, MediaSpec

REPO = Path(__file__).resolve().parents[1]
SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "samples"
TINY = MediaSpec(**local_media.GEOMETRIES["tiny"])
FULL_SNIPPETS = TINY.max_snippets  # a 1.5 s clip fills the tiny window (1 s)
FEATURES = {"video", "audio", "num_snippets", "audio_missing", "prompt", "answer", "kind", "question_type", "source",
            "evidence"}

# Every bad input of the mixed manifest, with the reason the report must give.
BAD_FILES = {
    "clips/garbage.mp4": "undecodable",
    "clips/zero.mp4": "empty_file",
    "clips/trunc.mp4": "truncated",
    "clips/notes.txt": "wrong_extension",
    "clips/audio_only.mp4": "no_video_stream",
    "clips/no_audio.mp4": "no_audio_track",
    "clips/short.mp4": "too_short",
    "clips/missing.mp4": "not_found",
}


def _clip(path: Path, seconds=1.5, audio=True, fps=16, seed=0):
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 256, (int(round(seconds * fps)), 48, 64, 3), dtype=np.uint8)
    sound = (0.3 * np.sin(np.arange(int(seconds * 16_000)) * 0.07)).astype(np.float32) if audio else None
    write_clip(path, frames, fps, sound, 16_000)


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    """A folder `clips/` with two good clips and every kind of bad file."""
    root = tmp_path_factory.mktemp("media")
    clips = root / "clips"
    clips.mkdir()
    _clip(clips / "good1.mp4", seed=1)
    _clip(clips / "good2.mp4", seed=2)
    _clip(clips / "no_audio.mp4", audio=False)
    _clip(clips / "short.mp4", seconds=0.125)  # half a snippet
    (clips / "zero.mp4").write_bytes(b"")
    (clips / "garbage.mp4").write_bytes(np.random.default_rng(0).bytes(5000))
    good = (clips / "good1.mp4").read_bytes()
    (clips / "trunc.mp4").write_bytes(good[: len(good) // 2])  # the mp4 index (moov) is written last
    (clips / "notes.txt").write_text("not a video")
    subprocess.run([ffmpeg_exe(), "-loglevel", "error", "-i", str(clips / "good1.mp4"), "-vn", "-c:a", "copy",
                    str(clips / "audio_only.mp4")], check=True)
    return root


def _manual_dir(tmp_path: Path, media: Path, lines: list, name="manual") -> Path:
    """A manual dir holding `media`'s clips and a manifest.jsonl of `lines` (dicts, or raw strings)."""
    manual = tmp_path / name
    shutil.copytree(media, manual)
    (manual / "manifest.jsonl").write_text(
        "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return manual


def _build(manual: Path, data_dir: Path, config="tiny"):
    builder = local_media.Builder(config=config, data_dir=str(data_dir))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
    return builder


def _report(builder) -> list[dict]:
    return [json.loads(line) for line in skipped_report_path(builder).read_text().splitlines()]


def _clips(builder, split="train") -> list[dict]:
    """The stored examples: one per clip, with its `texts`."""
    return list(tfds.as_numpy(builder.as_dataset(split=split)))


def _examples(builder, split="train") -> list[dict]:
    """One dict per text, with its clip's fields (what `mirasol3b_data.tasks.per_text` gives training)."""
    return [{**{k: v for k, v in clip.items() if k != "texts"}, **{f: clip["texts"][f][i] for f in clip["texts"]}}
            for clip in _clips(builder, split) for i in range(len(clip["texts"]["prompt"]))]


def _text(example, key):
    return example[key].decode()


def _check_schema(example):
    assert set(example) == FEATURES
    n = int(example["num_snippets"])
    assert 1 <= n <= TINY.max_snippets
    assert example["video"].shape == (n * TINY.snippet_frames, TINY.image_size, TINY.image_size, 3)
    assert example["video"].dtype == np.uint8
    assert example["audio"].shape == (n * TINY.samples_per_snippet,) and example["audio"].dtype == np.int16


MIXED = [
    {"video": "clips/good1.mp4", "question": "what moves?", "answer": "noise", "question_type": "what"},
    {"video": "clips/good2.mp4", "caption": "static and a tone", "split": "test"},
    {"video": "clips/good1.mp4", "label": "noise", "start": 0.25},
    *({"video": path, "label": "bad"} for path in BAD_FILES),
    {"video": "clips/good2.mp4", "label": "noise", "colour": "red"},  # unknown field
    '{"video": "clips/good1.mp4", "label": ',  # not JSON
    {"video": "clips/good2.mp4", "question": "who?"},  # no answer
]


def _check_mixed_build(builder, output: str):
    rows = _report(builder)
    assert {r["file"]: r["reason"] for r in rows if r["file"] in BAD_FILES} == BAD_FILES
    by_line = {r["line"]: r for r in rows}
    assert by_line[12]["reason"] == "unknown_field" and "colour" in by_line[12]["detail"]
    assert by_line[13]["reason"] == "bad_manifest_line" and by_line[14]["reason"] == "bad_manifest_line"
    assert len(rows) == len(BAD_FILES) + 3 and all(r["annotation"] == "manifest.jsonl" for r in rows)

    # good1.mp4 from 0 s and from 0.25 s are two clips.
    summary = [line for line in output.splitlines() if line.startswith("local_media/tiny: kept 3 clips with 3 texts")]
    assert len(summary) == 1, output
    assert "skipped 11" in summary[0] and "bad_manifest_line 2" in summary[0]
    assert summary[0].endswith(f"report: {skipped_report_path(builder)}")

    train = sorted(_examples(builder, "train"), key=lambda e: _text(e, "kind"))
    test = _examples(builder, "test")
    assert [_text(e, "kind") for e in train] == ["classification", "qa"] and len(test) == 1
    for example in train + test:
        _check_schema(example)
        assert int(example["num_snippets"]) == FULL_SNIPPETS and not example["audio_missing"]
        assert np.abs(example["audio"]).max() > 0.1 * 32767
    label, qa = train
    assert (_text(qa, "prompt"), _text(qa, "answer"), _text(qa, "question_type"), _text(qa, "source")) == (
        "what moves?", "noise", "what", "clips/good1.mp4")
    assert _text(label, "prompt") == DEFAULT_PROMPTS["classification"] and _text(label, "question_type") == ""
    assert _text(test[0], "prompt") == DEFAULT_PROMPTS["caption"] and _text(test[0], "answer") == "static and a tone"


def test_python_build_skips_and_reports_every_bad_input(media, tmp_path, capsys):
    builder = _build(_manual_dir(tmp_path, media, MIXED), tmp_path / "out")
    assert skipped_report_path(builder) == tmp_path / "out" / "local_media" / "tiny" / "skipped.jsonl"
    _check_mixed_build(builder, capsys.readouterr().out)


def test_tfds_build_command(media, tmp_path):
    """The same build through the `tfds` command (the venv's console script), finding the builder
    from its folder."""
    manual = _manual_dir(tmp_path, media, MIXED)
    flags = ["data/builders/local_media", "--config=tiny", f"--manual_dir={manual}", f"--data_dir={tmp_path / 'out'}"]
    command = [str(Path(sys.executable).parent / "tfds"), "build", *flags]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    _check_mixed_build(local_media.Builder(config="tiny", data_dir=str(tmp_path / "out")), done.stdout)

    # The same command after an edit of the manifest fails (it used to reuse the old dataset with rc 0).
    (manual / "manifest.jsonl").write_text((manual / "manifest.jsonl").read_text().replace('"test"', '"train"'))
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "ManualDirChangedError" in done.stderr, done.stderr[-3000:]
    assert f"{manual / 'manifest.jsonl'} changed since the build" in done.stderr and "--overwrite" in done.stderr


def test_missing_audio_is_silence_only_with_the_silence_config(media, tmp_path):
    manual = _manual_dir(tmp_path, media, [{"video": "clips/good1.mp4", "label": "a"},
                                           {"video": "clips/no_audio.mp4", "label": "b"}])
    silence = {_text(e, "source"): e for e in _examples(_build(manual, tmp_path / "out", "tiny_silence"))}
    assert silence["clips/no_audio.mp4"]["audio_missing"] and not silence["clips/no_audio.mp4"]["audio"].any()
    assert not silence["clips/good1.mp4"]["audio_missing"] and silence["clips/good1.mp4"]["audio"].any()
    for example in silence.values():
        _check_schema(example)
    skip = _build(manual, tmp_path / "out", "tiny")
    assert [_text(e, "source") for e in _examples(skip)] == ["clips/good1.mp4"]
    assert [(r["file"], r["reason"]) for r in _report(skip)] == [("clips/no_audio.mp4", "no_audio_track")]


def _assert_no_dataset(data_dir: Path):
    builder = local_media.Builder(config="tiny", data_dir=str(data_dir))
    assert not builder.is_prepared()
    with pytest.raises(Exception):
        tfds.load("local_media/tiny", data_dir=str(data_dir), download=False)
    config_dir = data_dir / "local_media" / "tiny"
    assert not (config_dir / str(local_media.Builder.VERSION)).exists()
    assert not [p for p in config_dir.iterdir() if "incomplete" in p.name]  # TFDS cleaned its temporary dir


def test_a_failed_split_reports_the_splits_after_it_as_not_reached(tmp_path):
    from types import SimpleNamespace

    from mirasol3b_data.builders.report import BuildReport, Skipped

    builder = SimpleNamespace(name="b", builder_config=SimpleNamespace(name="c"), data_path=str(tmp_path / "c" / "1"))
    report = BuildReport(builder, ["test", "train", "validation"])
    with pytest.raises(EmptySplitError, match=r"kept 0 clips with 0 texts \(test 0 with 0, train not reached, "
                                              r"validation not reached\)"):
        list(report.generate("test", [[Skipped("a", "not_found")]]))


def test_failed_builds_leave_no_dataset_and_a_rebuild_starts_a_fresh_report(media, tmp_path, monkeypatch):
    out = tmp_path / "out"
    # Every example of a split skipped: the build fails and names the report.
    all_bad = _manual_dir(tmp_path, media, [{"video": path, "label": "x"} for path in BAD_FILES], "all_bad")
    with pytest.raises(EmptySplitError, match="skipped.jsonl") as failure:
        _build(all_bad, out)
    assert "'train'" in str(failure.value)
    assert {r["file"]: r["reason"] for r in _report(local_media.Builder(config="tiny", data_dir=str(out)))} == BAD_FILES
    _assert_no_dataset(out)

    # A crash (a bug, not a bad file) half-way through: nothing that loads is left either.
    manual = _manual_dir(tmp_path, media, [{"video": "clips/good1.mp4", "label": "a"},
                                           {"video": "clips/good2.mp4", "label": "b"},
                                           {"video": "clips/good1.mp4", "question": "q?", "answer": "c"},
                                           {"video": "clips/missing.mp4", "label": "d"}])
    calls = []
    make = local_media._Maker.__call__

    def crash_on_third(self, item):
        calls.append(item)
        if len(calls) == 3:
            raise RuntimeError("simulated bug")
        return make(self, item)

    monkeypatch.setattr(local_media._Maker, "__call__", crash_on_third)
    with pytest.raises(RuntimeError, match="simulated bug"):
        _build(manual, out)
    assert len(calls) == 3
    _assert_no_dataset(out)
    monkeypatch.undo()

    builder = _build(manual, out)
    assert builder.is_prepared() and len(_examples(builder)) == 3
    assert [(r["file"], r["reason"]) for r in _report(builder)] == [("clips/missing.mp4", "not_found")]


def test_a_split_name_a_letter_off_a_standard_one_is_a_bad_line():
    from mirasol3b_data import readers

    for typo, meant in (("valdiation", "validation"), ("trian", "train"), ("tset", "test")):
        row = readers.check_record({"video": "a.mp4", "caption": "x", "split": typo})
        assert row.reason == "bad_manifest_line" and f"misspelling of {meant!r}" in row.detail
    for name, split in (("holdout", "holdout"), ("val", "validation"), ("test", "test")):  # a split of its own, an alias
        assert readers.check_record({"video": "a.mp4", "caption": "x", "split": name}).split == split


def test_manifest_evidence_is_checked_and_stored_from_the_clip_start(media, tmp_path):
    """"evidence" goes with a question: [[start, end], ...] seconds of the file, 0 <= start < end. The
    example stores it from the clip's first frame (the file's "start"), cut to the clip."""
    question = {"video": "a.mp4", "question": "when?", "answer": "soon"}
    assert readers.check_record({**question, "evidence": [[0, 1.5], [2, 3.25]]}).evidence == ((0.0, 1.5), (2.0, 3.25))
    assert readers.check_record({**question, "evidence": []}).evidence == () == readers.check_record(question).evidence
    for evidence, detail in (([[2, 1]], "not 0 <= start < end"), ([[-1, 2]], "not 0 <= start < end"),
                             ([[1, 1]], "not 0 <= start < end"), ([[1]], "is not [start, end]"),
                             ([0, 1], "is not [start, end]"), ([["0", 2]], "is not [start, end]"),
                             ([[True, 2]], "is not [start, end]"), ([[0, float("nan")]], "is not [start, end]"),
                             ("0-1", "must be a list")):
        row = readers.check_record({**question, "evidence": evidence})
        assert row.reason == "bad_manifest_line" and detail in row.detail, (evidence, row)
    row = readers.check_record({"video": "a.mp4", "caption": "x", "evidence": [[0, 1]]})
    assert row.reason == "bad_manifest_line" and "'evidence' goes with 'question'" in row.detail

    manual = _manual_dir(tmp_path, media, [  # the clip: 0.25 s to 1.25 s of the file
        {"video": "clips/good1.mp4", "label": "noise", "start": 0.25},
        {**question, "video": "clips/good1.mp4", "start": 0.25, "evidence": [[0.0, 0.5], [0.75, 1.0], [1.3, 1.5]]}])
    (clip,) = _clips(_build(manual, tmp_path / "out"))
    assert [k.decode() for k in clip["texts"]["kind"]] == ["classification", "qa"]
    evidence = clip["evidence"]
    assert [(int(i), round(float(a), 4), round(float(b), 4)) for i, a, b in
            zip(evidence["text"], evidence["start"], evidence["end"])] == [(1, 0.0, 0.25), (1, 0.5, 0.75)]


def test_a_manual_dir_in_a_bucket_builds_as_a_local_one(media, tmp_path, fake_bucket, capsys):  # noqa: F811
    """What a cluster's workers read: annotations and clips in gs:// (here the fake bucket of
    test_remote_paths), built here and on Beam (in-process runner), with every skip reported."""
    shutil.copytree(_manual_dir(tmp_path, media, MIXED), fake_bucket / "bucket" / "media")
    for name, options in (("local", None), ("beam", ["--direct_running_mode=in_memory"])):
        import apache_beam as beam

        config = tfds.download.DownloadConfig(manual_dir="gs://bucket/media", beam_options=options and
                                              beam.options.pipeline_options.PipelineOptions(options))
        builder = local_media.Builder(config="tiny", data_dir=str(tmp_path / name))
        builder.download_and_prepare(download_config=config)
        _check_mixed_build(builder, capsys.readouterr().out)
        missing = next(r for r in _report(builder) if r["file"] == "clips/missing.mp4")
        assert missing["detail"] == "no such object"  # looked for in the bucket, not on this disk
    with pytest.raises(MediaError, match="gs://bucket/media/clips/garbage.mp4: undecodable"):
        decode_clip("gs://bucket/media/clips/garbage.mp4", TINY)


def test_a_rebuild_over_changed_annotations_or_media_fails_until_overwrite(media, tmp_path, monkeypatch):
    """The manual dir's annotations and listed media are part of what a build is: reusing a dataset built
    from other ones fails (it used to reuse it silently); an unchanged manual dir is reused without a look
    at the media; `--overwrite` (REUSE_CACHE_IF_EXISTS) rebuilds; loading without a manual dir is as before."""
    out = tmp_path / "out"
    manual = _manual_dir(tmp_path, media, [{"video": "clips/good1.mp4", "label": "a", "split": "holdout"},
                                           {"video": "clips/later.mp4", "label": "b", "split": "holdout"}])
    manifest = manual / "manifest.jsonl"
    built = _build(manual, out)
    assert list(built.info.splits) == ["holdout"] and len(_examples(built, "holdout")) == 1

    def no_generation(*args, **kwargs):
        raise AssertionError("the dataset was rebuilt instead of reused")

    monkeypatch.setattr(local_media.Builder, "_split_generators", no_generation)
    monkeypatch.setattr(local_media._Maker, "__call__", no_generation)
    _build(manual, out)  # unchanged: reused
    local_media.Builder(config="tiny", data_dir=str(out)).download_and_prepare()  # no manual dir: reused

    manifest.write_text(manifest.read_text().replace("holdout", "test"))
    with pytest.raises(local_media.ManualDirChangedError) as failure:
        _build(manual, out)
    message = str(failure.value)
    for expected in (str(out / "local_media" / "tiny" / str(local_media.Builder.VERSION)), str(manifest),
                     "changed since the build",
                     "--overwrite", "--data_dir"):
        assert expected in message, message
    local_media.Builder(config="tiny", data_dir=str(out)).download_and_prepare()  # no manual dir: still loads
    assert list(local_media.Builder(config="tiny", data_dir=str(out)).info.splits) == ["holdout"]  # left as it was

    manifest.write_text(manifest.read_text().replace("test", "holdout"))  # back as built: reused again
    _build(manual, out)
    shutil.copy(manual / "clips" / "good2.mp4", manual / "clips" / "later.mp4")  # a file it lacked, added
    with pytest.raises(local_media.ManualDirChangedError, match="media files"):
        _build(manual, out)

    monkeypatch.undo()
    manifest.write_text(manifest.read_text().replace("holdout", "test"))
    rebuilt = local_media.Builder(config="tiny", data_dir=str(out))
    rebuilt.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=str(manual), download_mode=tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS))
    assert list(rebuilt.info.splits) == ["test"]
    assert sorted(_text(e, "answer") for e in _examples(rebuilt, "test")) == ["a", "b"]
    assert _report(rebuilt) == []
    monkeypatch.setattr(local_media._Maker, "__call__", no_generation)
    _build(manual, out)  # the rebuilt dataset is reused

    # A dataset built before fingerprints were recorded: reused, with a warning (nothing to compare).
    (out / "local_media" / "tiny" / str(local_media.Builder.VERSION) / "metadata.json").unlink()
    manifest.write_text(manifest.read_text().replace('"b"', '"c"'))
    with mock.patch.object(local_media.logging, "warning") as warning:
        _build(manual, out)
    assert "records no fingerprint" in warning.call_args.args[0]


def test_missing_manifest_names_the_expected_path(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    (manual / "clip.mp4").write_bytes(b"x")  # TFDS refuses an empty manual dir before we get to look
    with pytest.raises(FileNotFoundError, match=re.escape(str(manual / "manifest.jsonl"))):
        _build(manual, tmp_path / "out")


def test_presets_match_the_model_configs():
    import configs.long_video
    import configs.mirasol3b
    import configs.tiny

    for preset, module in (("tiny", configs.tiny), ("base", configs.mirasol3b), ("long", configs.long_video)):
        expected = MediaSpec.from_config(module.get_config())
        assert MediaSpec(**local_media.GEOMETRIES[preset]) == expected
        assert local_media.Builder.builder_configs[preset].spec == expected
        silence = local_media.Builder.builder_configs[f"{preset}_silence"].spec
        assert silence == MediaSpec.from_config(module.get_config(), missing_audio="silence")


# ------------------------------------------------------------------------------ public formats


def _write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def _write_csv(path: Path, rows, header=None) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        if header:
            writer.writerow(header)
        writer.writerows(rows)
    return path


def _split_items(items):
    items = list(items)
    good = {line: item for line, item in items if not isinstance(item, readers.BadRow)}
    bad = {line: item for line, item in items if isinstance(item, readers.BadRow)}
    assert all(b.reason == "bad_annotation" for b in bad.values())
    return good, bad


def test_read_msrvtt_qa(tmp_path):
    path = _write_json(tmp_path / "test_qa.json", [
        {"answer": "man", "category_id": 3, "id": 0, "question": "who is talking?", "video_id": 7010},
        {"answer": "cook", "category_id": 3, "id": 1, "question": "What is a woman doing?", "video_id": "video7011"},
        {"answer": "dog", "id": 2, "question": "what runs?"},  # no video_id
    ])
    good, bad = _split_items(readers.read_msrvtt_qa(path, "videos"))
    assert good == {
        1: {"video": "videos/video7010.mp4", "question": "who is talking?", "answer": "man", "question_type": "who"},
        2: {"video": "videos/video7011.mp4", "question": "What is a woman doing?", "answer": "cook",
            "question_type": "what"}}
    assert list(bad) == [3]


def test_read_activitynet_qa(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "v_abc.webm").write_bytes(b"x")
    (videos / "def.mkv").write_bytes(b"x")
    questions = _write_json(tmp_path / "val_q.json", [
        {"video_name": "abc", "question": "what is the man doing", "question_id": "v_abc_0"},
        {"video_name": "def", "question": "is it sunny", "question_id": "v_def_1"},
        {"video_name": "ghi", "question": "what color is the car", "question_id": "v_ghi_2"},
        {"video_name": "jkl", "question": "how many people", "question_id": "v_jkl_3"},  # no answer
    ])
    answers = _write_json(tmp_path / "val_a.json", [
        {"answer": "dancing", "question_id": "v_abc_0", "type": 0},
        {"answer": "yes", "question_id": "v_def_1", "type": 3},
        {"answer": "red", "question_id": "v_ghi_2", "type": 4},
    ])
    good, bad = _split_items(readers.read_activitynet_qa(questions, answers, str(videos)))
    assert good == {
        1: {"video": str(videos / "v_abc.webm"), "question": "what is the man doing", "answer": "dancing",
            "question_type": "motion"},
        2: {"video": str(videos / "def.mkv"), "question": "is it sunny", "answer": "yes", "question_type": "yes_no"},
        3: {"video": str(videos / "v_ghi.mp4"), "question": "what color is the car", "answer": "red",
            "question_type": "color"}}  # no file: the .mp4 name, reported "not_found" when built
    assert list(bad) == [4] and "v_jkl_3" in bad[4].detail


NEXTQA_HEADER = ["video", "frame_count", "width", "height", "question", "answer", "qid", "type",
                 "a0", "a1", "a2", "a3", "a4"]


def test_read_nextqa(tmp_path):
    path = _write_csv(tmp_path / "val.csv", [
        [4010069381, 369, 640, 480, "why did the boy pick up one present", 2, 6, "CW",
         "to play with", "to eat", "to give to the girl", "to throw", "to open"],
        [4010069382, 100, 640, 480, "what did the dog do after running", 0, 1, "TN",
         "sit down", "bark", "jump", "sleep", "eat"],
        [4010069383, 100, 640, 480, "how many people", 7, 2, "DC", "one", "two", "three", "four", "five"],
    ], NEXTQA_HEADER)
    mapping = _write_json(tmp_path / "map_vid_vidorID.json", {"4010069381": "1025/4010069381",
                                                              "4010069382": "0000/4010069382"})
    good, bad = _split_items(readers.read_nextqa(path, "videos", mapping))
    assert good == {
        2: {"video": "videos/1025/4010069381.mp4", "question": "why did the boy pick up one present",
            "answer": "to give to the girl", "question_type": "CW"},
        3: {"video": "videos/0000/4010069382.mp4", "question": "what did the dog do after running",
            "answer": "sit down", "question_type": "TN"}}
    assert list(bad) == [4]  # answer index 7
    without_map, _ = _split_items(readers.read_nextqa(path, "videos"))
    assert without_map[2]["video"] == "videos/4010069381.mp4"


def test_read_vggsound(tmp_path):
    path = _write_csv(tmp_path / "vggsound.csv", [
        ["---g-f_I2yQ", "1", "people marching", "test"],
        ["--0PQM4-hqg", "30", "engine accelerating, revving, vroom", "train"],
        ["--56QUhyDQM", "not-a-number", "playing tennis", "train"],
    ])
    good, bad = _split_items(readers.read_vggsound(path, "videos"))
    assert good == {
        1: {"video": "videos/---g-f_I2yQ_000001.mp4", "label": "people marching", "split": "test"},
        2: {"video": "videos/--0PQM4-hqg_000030.mp4", "label": "engine accelerating, revving, vroom",
            "split": "train"}}
    assert list(bad) == [3]
    only_test, _ = _split_items(readers.read_vggsound(path, "v", "{youtube_id}.mp4", split="test"))
    assert only_test == {1: {"video": "v/---g-f_I2yQ.mp4", "label": "people marching", "split": "test"}}


def test_read_kinetics_sound(tmp_path):
    path = _write_csv(tmp_path / "validate.csv", [
        ["playing bagpipes", "0wCCl6Zr6Pk", "14", "24", "val"],
        ["abseiling", "3caPS4FHFF8", "36", "46", "val"],  # not a Kinetics-Sound class
        ["playing drums", "zzz", "x", "10", "val"],
        ["tapping guitar", "8sLRSm2E4Wc", "0", "10", "val"],
    ], ["label", "youtube_id", "time_start", "time_end", "split"])
    good, bad = _split_items(readers.read_kinetics_sound(path, "videos", ["playing bagpipes", "tapping guitar",
                                                                           "playing drums"]))
    assert good == {
        2: {"video": "videos/0wCCl6Zr6Pk_000014_000024.mp4", "label": "playing bagpipes", "split": "validation"},
        5: {"video": "videos/8sLRSm2E4Wc_000000_000010.mp4", "label": "tapping guitar", "split": "validation"}}
    assert list(bad) == [4]
    every_class, _ = _split_items(readers.read_kinetics_sound(path, "videos"))
    assert sorted(every_class) == [2, 3, 5]


def test_kinetics_as_its_current_hosts_ship_it(tmp_path):
    """CVDF's val.csv, the 600/700 test sets' missing label column, clips in the crawler's
    <label>/ folders or CVDF's <split>/ folders."""
    header = ["label", "youtube_id", "time_start", "time_end", "split"]
    manual = tmp_path / "manual"
    (manual / "videos" / "playing bagpipes").mkdir(parents=True)
    (manual / "videos" / "playing bagpipes" / "0wCCl6Zr6Pk_000014_000024.mp4").write_bytes(b"x")
    (manual / "videos" / "8sLRSm2E4Wc_000000_000010.mp4").write_bytes(b"x")
    (manual / local_media.KINETICS_SOUND_CLASSES).write_text("playing bagpipes\ntapping guitar\n")
    _write_csv(manual / "val.csv", [["playing bagpipes", "0wCCl6Zr6Pk", "14", "24", "val"],
                                    ["tapping guitar", "8sLRSm2E4Wc", "0", "10", "val"],
                                    ["tapping guitar", "missing", "0", "10", "val"]], header)
    _write_csv(manual / "test.csv", [["zzz", "0", "10", "test"]], header[1:])  # no labels
    records, _ = local_media._read("kinetics_sound", manual)
    videos = {r.video: r.split for _, _, r, _ in records}
    assert videos == {str(manual / "videos" / "playing bagpipes" / "0wCCl6Zr6Pk_000014_000024.mp4"): "validation",
                      str(manual / "videos" / "8sLRSm2E4Wc_000000_000010.mp4"): "validation",
                      str(manual / "videos" / "missing_000000_000010.mp4"): "validation"}  # not_found at decode
    with pytest.raises(readers.UnlabelledSplitFile, match="test.csv has no label column"):
        list(readers.read_kinetics_sound(manual / "test.csv", str(manual / "videos")))
    _write_csv(manual / "validate.csv", [["tapping guitar", "8sLRSm2E4Wc", "0", "10", "val"]], header)
    with pytest.raises(ValueError, match="validate.csv and .*val.csv are both the validation split"):
        local_media._read("kinetics_sound", manual)
    # A companion file gone (the class list) is an error, not "no annotations here, reuse the dataset".
    (manual / local_media.KINETICS_SOUND_CLASSES).unlink()
    builder = local_media.Builder(config="kinetics_sound_tiny", data_dir=str(tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match="class list"):
        builder._check_manual_dir(None, tfds.download.DownloadConfig(manual_dir=str(manual)))
    assert builder._check_manual_dir(None, tfds.download.DownloadConfig(manual_dir=str(tmp_path))) is None


def test_annotation_files_with_a_byte_order_mark_or_cut_short(tmp_path):
    bom = "\ufeff"
    msrvtt = tmp_path / "train_qa.json"
    msrvtt.write_text(bom + json.dumps([{"answer": "a", "id": 0, "question": "what?", "video_id": 3}]), "utf-8")
    good, _ = _split_items(readers.read_msrvtt_qa(msrvtt, "videos"))
    assert [g["video"] for g in good.values()] == ["videos/video3.mp4"]
    vgg = tmp_path / "vggsound.csv"
    vgg.write_text(bom + "---g-f_I2yQ,1,people marching,test\n", "utf-8")
    good, _ = _split_items(readers.read_vggsound(vgg, "videos"))
    assert good[1]["video"] == "videos/---g-f_I2yQ_000001.mp4"
    msrvtt.write_text(json.dumps([{"answer": "a", "id": 0, "question": "what?", "video_id": 3}])[:30])
    with pytest.raises(ValueError, match=f"{msrvtt}: not valid JSON"):
        list(readers.read_msrvtt_qa(msrvtt, "videos"))


def test_msrvtt_qa_build_end_to_end(media, tmp_path):
    manual = tmp_path / "manual"
    (manual / "videos").mkdir(parents=True)
    shutil.copy(media / "clips" / "good1.mp4", manual / "videos" / "video0.mp4")
    shutil.copy(media / "clips" / "good2.mp4", manual / "videos" / "video7010.mp4")
    _write_json(manual / "train_qa.json", [
        {"answer": "noise", "category_id": 0, "id": 0, "question": "what is shown?", "video_id": 0},
        {"answer": "tone", "category_id": 0, "id": 1, "question": "how does it sound?", "video_id": 0},
        {"answer": "cat", "category_id": 0, "id": 2, "question": "who is there?", "video_id": 5},  # no file
        {"answer": "x", "category_id": 0, "id": 3, "question": "", "video_id": 0},  # malformed
    ])
    _write_json(manual / "test_qa.json", [
        {"answer": "static", "category_id": 0, "id": 4, "question": "where is it?", "video_id": 7010}])
    builder = _build(manual, tmp_path / "out", "msrvtt_qa_tiny")
    train = {_text(e, "question_type"): e for e in _examples(builder, "train")}
    assert sorted(train) == ["how", "what"]
    assert _text(train["how"], "answer") == "tone" and _text(train["how"], "source") == "videos/video0.mp4"
    assert len(_clips(builder, "train")) == 1  # one clip, stored once with both questions
    (test,) = _examples(builder, "test")
    assert (_text(test, "question_type"), _text(test, "source")) == ("where", "videos/video7010.mp4")
    for example in [*train.values(), test]:
        _check_schema(example)
    assert {(r["file"], r["reason"], r["annotation"], r["line"]) for r in _report(builder)} == {
        ("videos/video5.mp4", "not_found", "train_qa.json", 3), ("", "bad_annotation", "train_qa.json", 4)}

    # The built-in task asks each question of the stored clip: once per evaluation pass, once per epoch.
    from mirasol3b_data import pipeline
    from test_data_pipeline import ids, make_config

    config = make_config(task="local_media_msrvtt_qa_tiny", tfds_data_dir=str(tmp_path / "out"), batch_size=4)
    (batch,) = list(pipeline.make_eval_iterator(config, "train", 0, 1))
    assert sorted(ids(batch)) == ["how does it sound?", "what is shown?"]
    trained = pipeline.make_input_iterator(config, "train", 0, 1)
    asked = collections.Counter(q for _ in range(5) for q in ids(next(trained)))  # 10 epochs of 2 questions
    assert sorted(asked) == ["how does it sound?", "what is shown?"] and min(asked.values()) >= 4, asked


@pytest.mark.skipif(not SAMPLES.is_dir(), reason=f"no shared samples at {SAMPLES}")
def test_build_from_the_shared_samples(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    files = sorted(p.name for p in SAMPLES.iterdir() if p.name != "README.md")
    for name in files:
        shutil.copy(SAMPLES / name, manual / name)
    (manual / "manifest.jsonl").write_text(
        "".join(json.dumps({"video": name, "question": "what happens?", "answer": "something"}) + "\n"
                for name in files))
    expected_skips = {"crunching.mp3": "wrong_extension", "example.mp4": "no_audio_track",
                      "-video-with-dash-.mp4": "no_audio_track"}

    builder = _build(manual, tmp_path / "out")
    kept = {_text(e, "source"): e for e in _examples(builder)}
    skipped = {r["file"]: r["reason"] for r in _report(builder)}
    assert skipped == expected_skips
    assert sorted([*kept, *skipped]) == files  # every file is an example or a skipped row
    for example in kept.values():
        _check_schema(example)
        assert not example["audio_missing"]

    silence = {_text(e, "source"): e for e in _examples(_build(manual, tmp_path / "out", "tiny_silence"))}
    assert sorted(silence) == sorted(set(files) - {"crunching.mp3"})
    assert all(silence[name]["audio_missing"] for name in ("example.mp4", "-video-with-dash-.mp4"))
