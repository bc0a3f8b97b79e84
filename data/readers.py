"""Annotations, read into manifest-style records: the local manifest and the public formats of
MSRVTT-QA, ActivityNet-QA, NExT-QA (and NExT-GQA's), VGG-Sound and Kinetics(-Sound), read from
files the user already has (nothing is downloaded).

A record is a dict as one manifest line would be:
    {"video": path, "question": ..., "answer": ..., "question_type": ...}   question answering
    {"video": path, "caption": ...}                                          captioning
    {"video": path, "label": ...}                                            classification
with optional "start" (seconds into the file) and "split", and for a question optional
"evidence": [[start, end], ...], the seconds of the file its answer rests on. Every reader yields
`(line, item)`: `line` is the 1-based line of a JSONL/CSV file or the 1-based entry of a JSON
list, `item` is a record or, for a row that cannot be read, a `BadRow` — never an exception — so
that a builder counts it in its report and goes on. `check_record` turns a record into the text
fields of an example (`data/spec.py`) or a `BadRow`. Files and folders may be local or in a bucket
(`gs://`): they are read through `etils.epath`.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import io
import json
import math
import os
import re
from typing import Any, Iterable, Iterator

from etils import epath

from mirasol3b_data.spec import DEFAULT_PROMPTS

MANIFEST_FIELDS = ("video", "question", "answer", "question_type", "caption", "label", "start", "split",
                   "evidence")
# Split names go into file names; TFDS reserves "all".
_SPLIT_NAME = re.compile(r"[a-z][a-z0-9_]*")
# The public releases' split names -> TFDS's.
SPLIT_ALIASES = {"val": "validation", "valid": "validation", "validate": "validation"}
STANDARD_SPLITS = ("train", "validation", "test")
# ActivityNet-QA's answer "type" codes (dataset/README.md of MILVLG/activitynet-qa).
ACTIVITYNET_QA_TYPES = {0: "motion", 1: "spatial_relation", 2: "temporal_relation", 3: "yes_no", 4: "color",
                        5: "object", 6: "location", 7: "number", 8: "other"}
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm")
# UTF-8, with the byte-order mark that a file re-saved by Excel or a Windows editor starts with.
ENCODING = "utf-8-sig"


@dataclasses.dataclass(frozen=True)
class BadRow:
    """An annotation row that cannot become an example: `reason` is the report's code."""

    reason: str
    detail: str
    video: str = ""  # best effort, for the report
    split: str | None = None  # best effort: the row's own split when it names a valid one


@dataclasses.dataclass(frozen=True)
class Record:
    """A checked record: where the media is and the text fields of its example."""

    video: str
    start: float
    split: str | None  # None: the split of the file it came from
    kind: str
    prompt: str
    answer: str
    question_type: str
    evidence: tuple[tuple[float, float], ...] = ()  # (start, end) seconds in the file


def split_name(name: str) -> str:
    return SPLIT_ALIASES.get(name, name)


def _text(record: dict, key: str) -> str:
    value = record[key]
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{key!r} must be a non-empty string, got {value!r}")
    return value


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _spans(value, duration: float | None = None) -> tuple[tuple[float, float], ...]:
    """[[start, end], ...] seconds -> ((start, end), ...), each end cut to `duration` when given;
    ValueError unless every span is two numbers with 0 <= start < end."""
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"'evidence' must be a list of [start, end] seconds, got {value!r}")
    spans = []
    for span in value:
        if not (isinstance(span, (list, tuple)) and len(span) == 2 and all(map(_number, span))):
            raise ValueError(f"evidence span {span!r} is not [start, end] seconds")
        start, end = float(span[0]), float(span[1]) if duration is None else min(float(span[1]), duration)
        if not 0 <= start < end:
            within = "" if duration is None else f" within the video's {duration:g} s"
            raise ValueError(f"evidence span {span!r} is not 0 <= start < end seconds{within}")
        spans.append((start, end))
    return tuple(spans)


def check_record(record: Any) -> Record | BadRow:
    """Validates one manifest-style record. Unknown field -> "unknown_field"; anything else wrong
    (not an object, a missing or mistyped field, no or several kinds) -> "bad_manifest_line"."""
    if not isinstance(record, dict):
        return BadRow("bad_manifest_line", f"expected a JSON object, got {type(record).__name__}")
    video = record.get("video") if isinstance(record.get("video"), str) else ""
    split = record.get("split")
    split = split_name(split) if isinstance(split, str) and _SPLIT_NAME.fullmatch(split_name(split)) else None
    unknown = [k for k in record if k not in MANIFEST_FIELDS]
    if unknown:
        return BadRow("unknown_field", f"unknown field {unknown[0]!r} (allowed: {', '.join(MANIFEST_FIELDS)})",
                      video, split)
    try:
        if not video:
            raise ValueError(f"'video' must be a non-empty string, got {record.get('video')!r}")
        if "split" in record and split is None:
            raise ValueError(f"'split' must be a lowercase name like 'train', got {record['split']!r}")
        typo = split and split not in STANDARD_SPLITS and difflib.get_close_matches(split, STANDARD_SPLITS, 1, 0.75)
        if typo:  # other names are allowed (each its own split), but not one a letter off a standard one
            raise ValueError(f"'split' {split!r} looks like a misspelling of {typo[0]!r}")
        start = record.get("start", 0.0)
        if isinstance(start, bool) or not isinstance(start, (int, float)) or not start >= 0:
            raise ValueError(f"'start' must be a number of seconds >= 0, got {start!r}")
        kinds = [k for k in ("question", "caption", "label") if k in record]
        if len(kinds) != 1:
            raise ValueError(f"needs exactly one of 'question' (with 'answer'), 'caption', 'label'; got {kinds}")
        for field in ("answer", "evidence"):
            if field in record and kinds != ["question"]:
                raise ValueError(f"'{field}' goes with 'question'")
        evidence = _spans(record.get("evidence", ()))
        question_type = record.get("question_type", "")
        if not isinstance(question_type, str):
            raise ValueError(f"'question_type' must be a string, got {question_type!r}")
        if kinds == ["question"]:
            if "answer" not in record:
                raise ValueError("'question' without 'answer'")
            kind, prompt, answer = "qa", _text(record, "question"), _text(record, "answer")
        elif kinds == ["caption"]:
            kind, prompt, answer = "caption", DEFAULT_PROMPTS["caption"], _text(record, "caption")
        else:
            kind, prompt, answer = "classification", DEFAULT_PROMPTS["classification"], _text(record, "label")
    except ValueError as e:
        return BadRow("bad_manifest_line", str(e), video, split)
    return Record(video, float(start), split, kind, prompt, answer, question_type, evidence)


def _open_text(path, newline: str | None = None) -> io.StringIO:
    """A text file, local or in a bucket, read whole (annotation files are small) as `open` would
    give it (`newline=""` for CSV)."""
    return io.StringIO(epath.Path(path).read_bytes().decode(ENCODING), newline=newline)


def _listdir(folder) -> list[str]:
    folder = epath.Path(folder)
    return [p.name for p in folder.iterdir()] if folder.is_dir() else []


def _walk(folder):
    """(folder, dirs, files) below `folder`; locally through symlinked folders too."""
    if "://" not in os.fspath(folder):
        yield from os.walk(folder, followlinks=True)
        return
    for root, dirs, files in epath.Path(folder).walk():
        yield os.fspath(root), dirs, files


def read_manifest(path: str | os.PathLike) -> Iterator[tuple[int, dict | BadRow]]:
    """`manifest.jsonl`: one JSON object per line; blank lines are ignored. A line that is not
    JSON is a `BadRow("bad_manifest_line")`; fields are checked by `check_record`."""
    with _open_text(path) as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield line_number, json.loads(line)
            except json.JSONDecodeError as e:
                yield line_number, BadRow("bad_manifest_line", f"not JSON: {e}")


def _bad(detail: str, video: str = "") -> BadRow:
    return BadRow("bad_annotation", detail, video)


def _load_json(path, kind: type | None = None):
    """The JSON in `path`; a ValueError naming the file when it is not JSON, or not a `kind` (list or dict)."""
    try:
        with _open_text(path) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); a truncated download?") from e
    if kind is not None and not isinstance(data, kind):
        raise ValueError(f"{path}: expected a JSON {'list of entries' if kind is list else 'object'}, "
                         f"got {type(data).__name__}")
    return data


def read_msrvtt_qa(annotation_json, video_dir) -> Iterator[tuple[int, dict | BadRow]]:
    """MSRVTT-QA (`train_qa.json`, `val_qa.json`, `test_qa.json` of the released annotations): a
    JSON list of {"answer", "category_id", "id", "question", "video_id"}, `video_id` an int N (or
    the string "videoN") for the file `video{N}.mp4` of MSR-VTT. `question_type` is the question's
    first word (what/who/how/when/where), the groups per-type accuracy is reported in."""
    for i, entry in enumerate(_load_json(annotation_json, list), 1):
        try:
            vid = entry["video_id"]
            number = int(vid[len("video"):] if isinstance(vid, str) and vid.startswith("video") else vid)
            question, answer = entry["question"], entry["answer"]
            if not (isinstance(question, str) and question.split() and isinstance(answer, str) and answer.strip()):
                raise ValueError(f"empty or non-text question/answer: {question!r} / {answer!r}")
        except (KeyError, TypeError, ValueError) as e:
            yield i, _bad(f"entry {i}: {type(e).__name__}: {e}")
            continue
        yield i, {"video": os.path.join(video_dir, f"video{number}.mp4"), "question": question,
                  "answer": answer, "question_type": question.split()[0].lower()}


def _find_video(video_dir, names: Iterable[str], listing: dict[str, str]) -> str:
    """The file in `video_dir` named one of `names` with one of VIDEO_EXTENSIONS; else the first
    candidate (which then fails as "not_found" when decoded)."""
    names = list(names)
    for name in names:
        if name in listing:
            return os.path.join(video_dir, listing[name])
    return os.path.join(video_dir, names[0] + VIDEO_EXTENSIONS[0])


class _VideoIndex:
    """Where a clip file is: `video_dir/NAME`, else the one file of that name anywhere below it
    (walked once, on the first miss); else `video_dir/NAME` (which then fails as "not_found")."""

    def __init__(self, video_dir):
        self.video_dir = video_dir
        self.top = set(_listdir(video_dir))
        self.below: dict[str, str] | None = None

    def path(self, name: str) -> str:
        if name not in self.top:
            if self.below is None:
                self.below = {}
                for root, dirs, files in _walk(self.video_dir):
                    dirs.sort()  # the first of several copies (e.g. arrange_by_classes links) is stable
                    for file in sorted(files):
                        self.below.setdefault(file, os.path.join(root, file))
            if name in self.below:
                return self.below[name]
        return os.path.join(self.video_dir, name)


def _listing(video_dir) -> dict[str, str]:
    """stem -> file name for the videos in `video_dir` (one listing instead of a stat per row);
    the earliest of VIDEO_EXTENSIONS wins when a stem has several."""
    out: dict[str, str] = {}
    for name in _listdir(video_dir):
        stem, ext = os.path.splitext(name)
        if ext in VIDEO_EXTENSIONS and (stem not in out or VIDEO_EXTENSIONS.index(ext) <
                                        VIDEO_EXTENSIONS.index(os.path.splitext(out[stem])[1])):
            out[stem] = name
    return out


def read_activitynet_qa(questions_json, answers_json, video_dir) -> Iterator[tuple[int, dict | BadRow]]:
    """ActivityNet-QA (MILVLG/activitynet-qa `dataset/{train,val,test}_{q,a}.json`): questions
    [{"video_name", "question", "question_id"}], answers [{"answer", "type", "question_id"}] with
    `type` an int code (`ACTIVITYNET_QA_TYPES`, e.g. 0 motion, 3 yes/no). `video_name` is the
    YouTube id; the file is `v_{video_name}` (ActivityNet's naming) or `{video_name}`, with
    whichever of .mp4/.mkv/.webm exists. `line` counts entries of the questions file."""
    answers: dict[str, dict] = {}
    for entry in _load_json(answers_json, list):
        if isinstance(entry, dict) and "question_id" in entry:
            answers[str(entry["question_id"])] = entry
    listing = _listing(video_dir)
    for i, entry in enumerate(_load_json(questions_json, list), 1):
        try:
            name, question, qid = entry["video_name"], entry["question"], str(entry["question_id"])
            if qid not in answers:
                raise ValueError(f"no answer for question_id {qid!r} in {os.path.basename(answers_json)}")
            answer = answers[qid]["answer"]
            type_code = answers[qid].get("type")
            if not all(isinstance(s, str) and s.strip() for s in (name, question, answer)):
                raise ValueError(f"empty or non-text video_name/question/answer: {name!r} / {question!r} / {answer!r}")
        except (KeyError, TypeError, ValueError) as e:
            yield i, _bad(f"entry {i}: {type(e).__name__}: {e}")
            continue
        yield i, {"video": _find_video(video_dir, (f"v_{name}", name), listing), "question": question,
                  "answer": answer, "question_type": ACTIVITYNET_QA_TYPES.get(type_code, str(type_code or ""))}


def _csv_rows(path, header: bool) -> Iterator[tuple[int, dict | list]]:
    """(line number, row) of a CSV file; a DictReader's rows when it has a header."""
    with _open_text(path, newline="") as f:
        rows = csv.DictReader(f) if header else csv.reader(f)
        for row in rows:
            if row and any((v or "").strip() for v in (row.values() if header else row) if isinstance(v, str)):
                yield rows.line_num, row


def read_nextqa(csv_path, video_dir, map_json=None, grounding_json=None) -> Iterator[tuple[int, dict | BadRow]]:
    """NExT-QA (doc-doc/NExT-QA `dataset/nextqa/{train,val,test}.csv`): columns
    video,frame_count,width,height,question,answer,qid,type,a0,a1,a2,a3,a4 where `answer` is the
    index of the correct option, so the record's answer is the text of option a{answer}; `type` is
    the question type (CW, CH, TN, TC, TP, DC, DL, DO). NExT-GQA (doc-doc/NExT-GQA
    `datasets/nextgqa/{train,val,test}.csv`, told apart by its first column, `video_id`) gives the
    answer's text itself. The file is `{map[video]}.mp4` with `map_vid_vidorID.json` (video id ->
    "dir/vidor id") when given, else `{video}.mp4`.

    `grounding_json`, NExT-GQA's `gsub_{val,test}.json`: {video id: {"duration": seconds,
    "location": {qid: [[start, end], ...]}, "fps": ...}}. A question it locates gets "evidence",
    those seconds of the video with each end cut to the duration (some run a little past it); one
    it does not list gets none; a malformed entry makes the question's row a `BadRow`."""
    mapping = None if map_json is None else {str(k): v for k, v in _load_json(map_json, dict).items()}
    grounding = None if grounding_json is None else _load_json(grounding_json, dict)
    for line, row in _csv_rows(csv_path, header=True):
        try:
            vid, question = (row["video_id" if "video_id" in row else "video"] or "").strip(), row["question"]
            answer = _nextqa_answer(row)
            if not vid or not (question or "").strip() or not (answer or "").strip():
                raise ValueError(f"empty video/question/answer: {vid!r} / {question!r} / {answer!r}")
            if mapping is not None and vid not in mapping:
                raise ValueError(f"video {vid} is not in {os.path.basename(map_json)}")
            evidence = None if grounding is None else _nextgqa_spans(
                grounding, os.path.basename(grounding_json), vid, (row["qid"] or "").strip())
        except (KeyError, TypeError, ValueError) as e:
            yield line, _bad(f"line {line}: {type(e).__name__}: {e}")
            continue
        relative = mapping[vid] if mapping is not None else vid
        record = {"video": os.path.join(video_dir, f"{relative}.mp4"), "question": question.strip(),
                  "answer": answer.strip(), "question_type": (row.get("type") or "").strip()}
        if evidence is not None:
            record["evidence"] = evidence
        yield line, record


def _nextqa_answer(row: dict) -> str:
    """The answer's text: NExT-GQA's `answer` itself, NExT-QA's option a{answer}."""
    if "video_id" in row:
        return row["answer"]
    index = (row["answer"] or "").strip()
    if not index.isdigit() or int(index) > 4:
        raise ValueError(f"answer {index!r} is not an option index 0..4 (a file of text answers, NExT-GQA's, "
                         "names its first column video_id)")
    return row[f"a{int(index)}"]


def _nextgqa_spans(grounding: dict, name: str, vid: str, qid: str) -> list | None:
    """The [[start, end], ...] seconds that NExT-GQA's grounding file `name` gives question `qid`
    of video `vid`, each end cut to the video's duration; None where it does not locate it."""
    entry = grounding.get(vid)
    if entry is None:
        return None
    if not isinstance(entry, dict) or not isinstance(entry.get("location"), dict):
        raise ValueError(f"{name}: the entry of video {vid} is not {{\"duration\", \"location\": {{qid: spans}}}}")
    if qid not in entry["location"]:
        return None
    duration = entry.get("duration")
    if not _number(duration) or duration <= 0:
        raise ValueError(f"{name}: the entry of video {vid} has duration {duration!r}, not seconds > 0")
    try:
        return [list(span) for span in _spans(entry["location"][qid], float(duration))]
    except ValueError as e:
        raise ValueError(f"{name}: question {qid} of video {vid}: {e}") from None


def _seconds(value: str) -> int:
    seconds = float(value)
    if not seconds >= 0 or seconds != int(seconds):
        raise ValueError(f"start/end {value!r} is not a whole number of seconds >= 0")
    return int(seconds)


def read_vggsound(csv_path, video_dir, filename_template: str = "{youtube_id}_{start:06d}.mp4",
                  split: str | None = None) -> Iterator[tuple[int, dict | BadRow]]:
    """VGG-Sound (`vggsound.csv`, no header): youtube_id, start_seconds, label, split ("train" or
    "test"); labels may hold commas (quoted). Files are named by `filename_template` with
    {youtube_id}, {start} (int seconds): by default `{youtube_id}_{start:06d}.mp4`, 10 s clips
    already cut at `start`. Records carry the row's split; `split` keeps only that one."""
    for line, row in _csv_rows(csv_path, header=False):
        try:
            if len(row) != 4:
                raise ValueError(f"expected 4 columns (youtube_id, start_seconds, label, split), got {len(row)}")
            youtube_id, start, label, row_split = (v.strip() for v in row)
            start = _seconds(start)
            if not youtube_id or not label or not row_split:
                raise ValueError(f"empty youtube_id/label/split in {row}")
        except ValueError as e:
            yield line, _bad(f"line {line}: {e}")
            continue
        row_split = split_name(row_split)
        if split is None or row_split == split_name(split):
            yield line, {"video": os.path.join(video_dir, filename_template.format(youtube_id=youtube_id, start=start)),
                         "label": label, "split": row_split}


class UnlabelledSplitFile(ValueError):
    """An annotation file without labels (Kinetics-600/700's test.csv): no example can come of it."""


def read_kinetics_sound(csv_path, video_dir, classes: Iterable[str] | None = None,
                        filename_template: str = "{youtube_id}_{start:06d}_{end:06d}.mp4"
                        ) -> Iterator[tuple[int, dict | BadRow]]:
    """Kinetics (`train.csv`, `validate.csv` or `val.csv`, `test.csv` of Kinetics-400/600/700): header
    label,youtube_id,time_start,time_end,split[,is_cc]. Rows whose label is not in `classes` (the
    Kinetics-Sound class list, when given) are left out silently: they are not part of the dataset.
    Files are named by `filename_template` with {youtube_id}, {start}, {end} (int seconds): by
    default `{youtube_id}_{start:06d}_{end:06d}.mp4`, the clips the common downloaders cut, found in
    `video_dir` or any folder below it (the crawler's `<label>/`, CVDF's `<split>/`). A file with
    no label column (the 600/700 test sets) raises `UnlabelledSplitFile` before any row."""
    keep = None if classes is None else {c.strip() for c in classes if c.strip()}
    with _open_text(csv_path, newline="") as f:
        header = next(csv.reader(f), [])
    if "label" not in [h.strip() for h in header]:
        raise UnlabelledSplitFile(f"{csv_path} has no label column (header {','.join(header)}): an unlabelled "
                                  "split, such as Kinetics-600/700's test set, gives no classification examples")
    videos = _VideoIndex(video_dir)
    for line, row in _csv_rows(csv_path, header=True):
        try:
            label, youtube_id = (row["label"] or "").strip(), (row["youtube_id"] or "").strip()
            start, end = _seconds(row["time_start"]), _seconds(row["time_end"])
            row_split = (row.get("split") or "").strip()
            if not label or not youtube_id:
                raise ValueError(f"empty label/youtube_id: {label!r} / {youtube_id!r}")
        except (KeyError, TypeError, ValueError) as e:
            yield line, _bad(f"line {line}: {type(e).__name__}: {e}")
            continue
        if keep is not None and label not in keep:
            continue
        record = {"video": videos.path(filename_template.format(youtube_id=youtube_id, start=start, end=end)),
                  "label": label}
        if row_split:
            record["split"] = split_name(row_split)
        yield line, record


def read_class_list(path) -> list[str]:
    """One class name per line (blank lines and '#' comments ignored), e.g. the Kinetics-Sound classes."""
    return [s.strip() for s in _open_text(path).read().splitlines() if s.strip() and not s.lstrip().startswith("#")]
