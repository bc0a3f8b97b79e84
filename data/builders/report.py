"""The build report every builder keeps: which examples were left out and why.

A bad input (an undecodable file, a malformed manifest line, ...) never crashes a build: the builder
records it here and goes on. The report is `skipped.jsonl`, one JSON object per text (question,
caption, label) left out; a clip that cannot be decoded leaves out every text asked of it:

    {"split": "train", "file": "clips/a.mp4", "reason": "no_audio_track", "detail": "...",
     "annotation": "manifest.jsonl", "line": 7}

It lives in the config folder, beside the version folder that holds the dataset
(`<data_dir>/<name>/<config>/skipped.jsonl`, see `skipped_report_path`), not inside it: TFDS
generates into a temporary `incomplete.*` folder that it deletes when the build fails, and the
report must outlive exactly those builds. Each build that generates data starts a fresh report.
`data_dir` may be a URI (`gs://bucket/tfds`): the report goes through `etils.epath.Path`, as TFDS's
own files do. An object in a bucket cannot be appended to (each append re-uploads it, and GCS takes
about one write per second per object), so there rows are held and the report rewritten at most
every `REMOTE_FLUSH_SECONDS`, at the end of each split and when a split's generation stops.

At the end of the build one summary line is printed, e.g.
    local_media/tiny: kept 5 clips with 12 texts, skipped 5 (empty_file 1, no_audio_track 2, ...); report: <path>
A split whose every example was skipped fails the build (an empty split is a silent wrong result).
A Beam build (`splits.py`) writes the same report from its workers' rows when the pipeline ends.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import time
from typing import Iterable, Iterator

from etils import epath

SKIPPED_FILENAME = "skipped.jsonl"
REMOTE_FLUSH_SECONDS = 30.0


class SkipExample(Exception):
    """Raised while making one example that must be left out; `reason` is a short code."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclasses.dataclass(frozen=True)
class Skipped:
    """One text left out of the dataset, and why (`reason`: a short code)."""

    file: str
    reason: str
    detail: str = ""
    annotation: str = ""
    line: int | None = None

    def row(self, split: str) -> dict:
        """Its line of `skipped.jsonl`."""
        return {"split": split, **dataclasses.asdict(self)}


class EmptySplitError(RuntimeError):
    """Every example of a split was skipped."""


def skipped_report_path(builder) -> epath.Path:
    """`<data_dir>/<name>/<config>/skipped.jsonl` for a TFDS builder (with or without configs).

    Same answer during the build (when `builder.data_path` is TFDS's temporary folder, a sibling of
    the version folder) and after it.
    """
    # epath, not pathlib: `pathlib.Path("gs://b/x")` collapses the scheme to "gs:/b/x".
    return epath.Path(builder.data_path).parent / SKIPPED_FILENAME


def skippable() -> tuple[type[BaseException], ...]:
    # Imported here so that report.py stays usable by builders that never decode media.
    from mirasol3b_data.media import MediaError

    return (MediaError, SkipExample)


class BuildReport:
    """Counts kept clips and texts and skipped texts per split, and appends each skip to `skipped.jsonl`.

    Create it once per build (in `_split_generators`, which TFDS calls once) with the names of the
    splits that will be generated; wrap each split's outcomes in `generate`. Every skip is appended
    and flushed at once, so the file is complete whatever order the splits run in and even if a
    later split crashes the build.
    """

    def __init__(self, builder, splits: Iterable[str]):
        config = getattr(builder, "builder_config", None)
        self.name = f"{builder.name}/{config.name}" if config is not None else builder.name
        self.path = skipped_report_path(builder)
        self.splits = list(splits)
        self.kept: collections.Counter[str] = collections.Counter()  # texts
        self.clips: collections.Counter[str] = collections.Counter()
        self.skipped: collections.Counter[str] = collections.Counter()
        self.reasons: collections.Counter[str] = collections.Counter()
        self._finished: set[str] = set()
        self._remote = "://" in os.fspath(self.path)
        self._rows: list[str] = []  # every row so far, when remote: the file is rewritten whole
        self._flushed_at, self._unflushed = time.monotonic(), False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")  # a rebuild must not append to the previous build's report

    def skip(self, split: str, skipped: Skipped) -> None:
        text = json.dumps(skipped.row(split), ensure_ascii=False) + "\n"
        self.skipped[split] += 1
        self.reasons[skipped.reason] += 1
        if not self._remote:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(text)
            return
        self._rows.append(text)
        self._unflushed = True
        if time.monotonic() - self._flushed_at >= REMOTE_FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        """Writes the rows held back (a report in a bucket); a local report is always complete."""
        if self._unflushed:
            self.path.write_text("".join(self._rows), encoding="utf-8")
            self._flushed_at, self._unflushed = time.monotonic(), False

    def keep(self, split: str, clips: int, texts: int) -> None:
        self.clips[split] += clips
        self.kept[split] += texts

    def summary(self) -> str:
        text = f"{self.name}: kept {sum(self.clips.values())} clips with {sum(self.kept.values())} texts"
        if len(self.splits) > 1:  # a failed split stops the build: the ones after it never ran
            text += " (" + ", ".join(f"{s} {self.clips[s]} with {self.kept[s]}" if s in self._finished
                                     else f"{s} not reached" for s in self.splits) + ")"
        text += f", skipped {sum(self.skipped.values())}"
        if self.reasons:
            text += " (" + ", ".join(f"{r} {n}" for r, n in sorted(self.reasons.items())) + ")"
        return f"{text}; report: {self.path}"

    def finish_split(self, split: str) -> None:
        """Fails on an empty split; prints the summary once every split is done."""
        self.flush()
        self._finished.add(split)
        if not self.kept[split]:
            raise EmptySplitError(
                f"{self.name}: every example of split {split!r} was skipped ({self.skipped[split]} of them), "
                f"so no dataset was written; see {self.path} for each file and reason. {self.summary()}")
        if self._finished >= set(self.splits):
            print(self.summary(), flush=True)

    def generate(self, split: str, outcomes: Iterable[list]) -> Iterator[tuple[str, dict]]:
        """Yields the `(key, example)`s of a split's outcome lists (`splits.py`), recording each `Skipped`.
        Fails the build on an empty split once they are done."""
        try:
            for made in outcomes:
                for outcome in made:
                    if isinstance(outcome, Skipped):
                        self.skip(split, outcome)
                        continue
                    self.keep(split, clips=1, texts=len(outcome[1]["texts"]))
                    yield outcome
        finally:  # a crash in the split (or TFDS closing the generator) keeps the rows of its skips
            self.flush()
        self.finish_split(split)
