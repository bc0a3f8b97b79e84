"""How a builder's splits are generated: on this machine (a Python generator) or on Apache Beam (a
`PTransform`), from the same work items and the same `make` function, so both give the same
examples.

A builder lists each split's work items (a clip to decode, or a run of synthetic clips) and a pure
`make(item) -> [outcome]`, where an outcome is `(key, example)` or a `Skipped` row (one per text
left out: a clip that fails to decode skips every question asked of it). `ClipSplits` (a mixin for
`tfds.core.GeneratorBasedBuilder`) picks the path:
  - no Beam options: `BuildReport.generate` runs `make` here (threads where the builder asks);
  - `--beam_pipeline_options` (or a `beam_runner`): each split is `Create(items) | Reshuffle |
    ParDo(make)`, so the items spread over every worker: DirectRunner's processes on one machine
    (`direct_running_mode=multi_processing,direct_num_workers=N`), Dataflow, Flink or Spark on a
    cluster. TFDS's Beam writer then shuffles by key hash as its local writer does.

Skipped rows under Beam are counted with Beam counters (namespace `COUNTERS`) and written by each
worker at the end of its bundle to `skipped.parts/` beside the report; when the pipeline ends, the
builder merges them into `skipped.jsonl` (rows are deterministic, so the copies a retried bundle
writes again are dropped) and prints the summary. A runner retries a failed bundle itself (Dataflow
up to 4 times in batch mode); `make` has no side effects but those rows, so a retry gives the same
examples. A pipeline that fails (on DirectRunner, a worker process killed or out of memory) leaves
no dataset: TFDS writes into a temporary folder that it renames only when every split is written,
and `BeamBuildError` says what happened. DirectRunner alone waits forever for a worker killed before
it connected (tried: a worker killed 3 s after it started hung the build until a 4-minute timeout),
so while a multi-processing DirectRunner build runs, `_WorkerWatch` stops the build as soon as Beam
sees a worker process exit with an error.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import json
import os
import re
import signal
import sys
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from mirasol3b_data.builders.report import BuildReport, EmptySplitError, Skipped, skippable

COUNTERS = "mirasol3b.build"
PARTS_DIR = "skipped.parts"
# TFDS's Beam writer fails a split with no example with this message (tensorflow_datasets/core/writer.py).
_TFDS_EMPTY_SPLIT = re.compile(r"generated examples is 0 for split (\w+)")

Outcome = Any  # (key, example) or Skipped


def travel_by_value(module_name: str) -> None:
    """Call at the end of a builder file: when `tfds build data/builders/NAME` imported it under the
    name `NAME.NAME`, which Beam's worker processes cannot import, its classes and functions are
    pickled by value (the `data` package they use is imported as usual). Tried: without this every
    worker failed with "No module named 'local_media'"."""
    if module_name.startswith("mirasol3b_data.builders."):
        return
    from apache_beam.internal.cloudpickle import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[module_name])


class BeamBuildError(RuntimeError):
    """The Beam pipeline failed; no dataset was written."""


def ordered_map(fn: Callable, items: Iterable, workers: int) -> Iterator:
    """`map(fn, items)` on `workers` threads, in order, at most 2 * workers results ahead."""
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


def _beam_transform(report: BuildReport, split: str, items: Sequence, make: Callable[[Any], list[Outcome]]):
    import apache_beam as beam

    parts = str(report.path.parent / PARTS_DIR)

    class Make(beam.DoFn):
        """item -> its examples; skipped rows are counted and written beside the report."""

        def start_bundle(self):
            self.rows = []

        def process(self, item):
            for outcome in make(item):
                if isinstance(outcome, Skipped):
                    beam.metrics.Metrics.counter(COUNTERS, f"{split}.skipped.{outcome.reason}").inc()
                    self.rows.append(outcome.row(split))
                    continue
                beam.metrics.Metrics.counter(COUNTERS, f"{split}.kept_clips").inc()
                beam.metrics.Metrics.counter(COUNTERS, f"{split}.kept_texts").inc(len(outcome[1]["texts"]))
                yield outcome

        def finish_bundle(self):
            if self.rows:
                from etils import epath

                path = epath.Path(parts) / f"{split}-{uuid.uuid4().hex}.jsonl"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.rows), encoding="utf-8")

    @beam.ptransform_fn
    def generate(pbegin):
        # Reshuffle: Create's one bundle would otherwise keep every item on one worker.
        return pbegin | "Items" >> beam.Create(list(items)) | "Spread" >> beam.Reshuffle() | "Make" >> beam.ParDo(Make())

    return generate()


class ClipSplits:
    """Mixin (list it before `tfds.core.GeneratorBasedBuilder`): `self.split(...)` generates a split
    here or on Beam, whichever `download_and_prepare` was asked for, with one `BuildReport`."""

    _report: BuildReport | None = None
    _on_beam = False
    _beam_result = None

    def download_and_prepare(self, *, download_dir=None, download_config=None, **kwargs):
        self._on_beam = bool(download_config and (download_config.beam_options is not None
                                                  or download_config.beam_runner is not None))
        self._report = self._beam_result = None
        watch = _WorkerWatch.when_needed(download_config)
        try:
            with watch:
                super().download_and_prepare(download_dir=download_dir, download_config=download_config, **kwargs)
        except (Exception, _WorkerDied) as e:
            if self._on_beam and self._report is not None:
                self._finish_beam(failure=e)
            raise
        if self._on_beam and self._report is not None:
            self._finish_beam()

    def _process_pipeline_result(self, pipeline_result) -> None:  # TFDS calls it after the pipeline ran
        self._beam_result = pipeline_result

    def report(self, splits: Iterable[str]) -> BuildReport:
        """The build's report (call once, from `_split_generators`)."""
        self._report = BuildReport(self, splits)
        if self._on_beam:
            from etils import epath

            parts = epath.Path(self._report.path.parent / PARTS_DIR)
            if parts.exists():
                parts.rmtree()
        return self._report

    @property
    def decode_threads(self) -> int:
        """FFmpeg threads for each decode: on Beam one (each worker is one decode per core; FFmpeg's own
        threads there only contend: 2 workers built 1.49x the clips a second of 1 with them, see
        benchmarks/data_build.py), else FFmpeg's choice."""
        return 1 if self._on_beam else 0

    def split(self, split: str, items: Sequence, make: Callable[[Any], list[Outcome]], workers: int = 1):
        """The value `_split_generators` returns for `split`: a generator, or a Beam PTransform."""
        if self._on_beam:
            return _beam_transform(self._report, split, items, make)
        return self._report.generate(split, ordered_map(make, items, workers))

    def _finish_beam(self, failure: Exception | None = None) -> None:
        """Merges the workers' skipped rows into the report and prints the summary; after a failed
        pipeline raises `EmptySplitError` or `BeamBuildError` from `failure`."""
        from etils import epath

        report = self._report
        parts = epath.Path(report.path.parent / PARTS_DIR)
        rows = set()
        if parts.exists():
            for part in sorted(parts.iterdir()):
                rows.update(part.read_text(encoding="utf-8").splitlines())
        order = {s: i for i, s in enumerate(report.splits)}
        for row in sorted((json.loads(r) for r in rows), key=lambda r: (
                order.get(r["split"], len(order)), r["annotation"], r["line"] is None, r["line"] or 0, r["file"])):
            report.skip(row["split"], Skipped(row["file"], row["reason"], row["detail"], row["annotation"], row["line"]))
        report.flush()
        if parts.exists():
            parts.rmtree()
        if failure is None:
            counters = _counters(self._beam_result)
            for split in report.splits:
                report.keep(split, clips=counters.get(f"{split}.kept_clips", 0),
                            texts=counters.get(f"{split}.kept_texts", 0))
                report.finish_split(split)
            return
        empty = _TFDS_EMPTY_SPLIT.search(str(failure))
        if empty:
            raise EmptySplitError(
                f"{report.name}: every example of split {empty.group(1)!r} was skipped, so no dataset was written; "
                f"see {report.path} for each file and reason") from failure
        if isinstance(failure, _WorkerDied):
            what = (f"{failure}. A worker that dies (killed, out of memory) stops a DirectRunner build; cluster "
                    "runners retry a failed worker's clips themselves")
        else:
            what = f"{type(failure).__name__}: {(str(failure).strip().splitlines() or [''])[-1]}"
        raise BeamBuildError(
            f"{report.name}: the Beam pipeline failed, so no dataset was written (TFDS writes into a temporary folder "
            f"and renames it only when every split is done): {what}. Rerun the command to build again (it starts "
            f"over). Skipped so far: {report.path}") from failure


class _WorkerDied(BaseException):
    """Raised in the main thread by `_WorkerWatch` (a BaseException, so no `except Exception` in the
    runner's wait swallows it)."""


class _WorkerWatch:
    """While a DirectRunner multi-processing pipeline runs: Beam waits for each SDK worker process
    in a thread of its own (`run_worker`), which raises when the worker exits with an error, and
    nothing reads that. This watch hears it (`threading.excepthook`) and raises `_WorkerDied` in the
    main thread through SIGUSR1. It first stops the other workers: the runner's clean-up joins every
    worker's thread, and a live worker never exits while the runner's channels are open."""

    def __init__(self):
        self.died: str | None = None
        self._old_hook = self._old_handler = None

    @classmethod
    def when_needed(cls, download_config) -> "_WorkerWatch | contextlib.nullcontext":
        options = download_config.beam_options if download_config else None
        if options is None or threading.current_thread() is not threading.main_thread():
            return contextlib.nullcontext()
        from apache_beam.options.pipeline_options import DirectOptions

        if options.view_as(DirectOptions).direct_running_mode != "multi_processing":
            return contextlib.nullcontext()
        return cls()

    def __enter__(self):
        self._old_handler = signal.signal(signal.SIGUSR1, self._raise)
        self._old_hook, threading.excepthook = threading.excepthook, self._hook
        return self

    def __exit__(self, *exc):
        threading.excepthook = self._old_hook
        signal.signal(signal.SIGUSR1, self._old_handler)
        return False

    def _hook(self, args):
        if args.thread is not None and args.thread.name == "run_worker" and self.died is None:
            self.died = _describe_exit(str(args.exc_value))
            os.kill(os.getpid(), signal.SIGUSR1)
        self._old_hook(args)

    def _raise(self, signum, frame):
        if self.died is not None:
            _stop_workers()
            raise _WorkerDied(f"a Beam worker process {self.died}")


def _stop_workers() -> None:
    """Kills this process's SDK worker processes (`sh -c ... sdk_worker_main` and the Python below it)."""
    import psutil

    for child in psutil.Process().children():
        try:
            if "sdk_worker_main" in " ".join(child.cmdline()):
                for process in [*child.children(recursive=True), child]:
                    process.kill()
        except psutil.Error:
            pass


def _describe_exit(message: str) -> str:
    """Beam's "Worker subprocess exited with return code 137" -> "exited with code 137 (killed by SIGKILL)"."""
    code = re.search(r"return code (-?\d+)", message)
    if not code:
        return f"failed: {message}"
    code = int(code.group(1))
    signum = -code if code < 0 else code - 128 if code > 128 else None  # sh reports a signal N as 128 + N
    killed = f" (killed by {signal.Signals(signum).name})" if signum in set(signal.valid_signals()) else ""
    return f"exited with code {code}{killed}"


def _counters(result) -> dict[str, int]:
    """This build's counters from a finished pipeline (committed values where the runner has them)."""
    if result is None:
        return {}
    from apache_beam.metrics.metric import MetricsFilter

    out = {}
    for counter in result.metrics().query(MetricsFilter().with_namespace(COUNTERS))["counters"]:
        value = counter.committed if counter.committed is not None else counter.attempted
        out[counter.key.metric.name] = out.get(counter.key.metric.name, 0) + int(value)
    return out


def clip_outcomes(key: str, file: str, texts: Sequence, load: Callable[[], dict]) -> list[Outcome]:
    """[(key, example)] with `load()`'s example, or a `Skipped` row for each of `texts` (objects with
    `annotation` and `line`) when it raises `MediaError` or `SkipExample`."""
    try:
        return [(key, load())]
    except skippable() as e:
        detail = getattr(e, "detail", "") or str(e)
        return [Skipped(file, e.reason, detail, t.annotation, t.line) for t in texts]


@dataclasses.dataclass(frozen=True)
class Text:
    """One text asked of a clip (`data/spec.py` TEXT_FIELDS), and where it was read."""

    prompt: str
    answer: str
    kind: str
    question_type: str = ""
    annotation: str = ""
    line: int | None = None
    # ((start, end), ...) seconds from the clip's first frame: where the answer is seen or heard.
    evidence: tuple[tuple[float, float], ...] = ()
