"""Per-host input: SeqIO task or mixture -> feature converter -> host-local numpy batches.

Batches are dicts of numpy arrays with `config.data.batch_size // num_shards` rows (this host's part
of the global batch; turn them into global arrays with `jax.make_array_from_process_local_data`):
  video uint8 [b, F, H, W, 3], audio float32 [b, S], media_mask bool [b, T],
  text_inputs / text_targets int32 [b, L], text_loss_weights float32 [b, L],
  prompts int32 [b, L], prompt_lengths int32 [b]   (for `decoding.generate`),
  example_valid bool [b]                            (False only on eval padding rows).
Eval batches also carry host-side strings, numpy object arrays [b] of `str` ("" on padding rows):
  question_type, kind (from the source, "" where it has none), answer_text (the whole reference
  answer as the vocabulary decodes its tokens, before the converter may cut it), and evidence, each
  row a tuple of (start, end) seconds, the spans its answer rests on (empty where none are known).
They are for scoring only: drop them (`drop_metadata`) before making global arrays; the train step
and the model never see them.

Training (`make_input_iterator`): infinite, shuffled, deterministic for (seed, num_shards,
shard_index). Its position is saved as a small JSON-able dict (`get_state`/`set_state`): the
number of batches taken. Restoring rebuilds the same pipeline and skips that many examples before
the feature converter. We chose this over checkpointing the tf.data iterator
(`tf.train.Checkpoint(iterator=...)`) because the latter stores every shuffle buffer's decoded clips
(GBs at paper scale) in each checkpoint and fails on sources that cannot be serialised (Python
generators); the price is that restoring re-reads the skipped examples (minutes after a long run).
The position is a count, so it resumes the same order only over the same data: a dataset rebuilt
with other contents resumes at the same count of a different order.

Evaluation (`make_eval_iterator`): one pass over the split, unshuffled. Each host reads the whole
split and keeps its rows of every global batch, so every host yields the same number of batches
(the jitted step needs that) without knowing the split's size; the last batch is padded with
zero rows whose `example_valid` is False and loss weights 0. Every example appears exactly once.
"""

from __future__ import annotations

import atexit
import dataclasses
import difflib
import importlib
import json
import weakref
from collections.abc import Iterator

import jax
import ml_collections
import numpy as np
import seqio
import tensorflow as tf
from absl import logging

from mirasol3b import errors
from mirasol3b_data import feature_converter as fc
from mirasol3b_data import mixtures as mixtures_lib
from mirasol3b_data import tasks as tasks_lib
from mirasol3b_data import vocab as vocab_lib

_STATE_VERSION = 1
# The host-side string fields of eval batches (see the module docstring).
EVAL_METADATA = ("question_type", "kind", "answer_text", "evidence")


def drop_metadata(batch: dict) -> dict[str, np.ndarray]:
    """`batch` without its host-side strings: what may become (global) jax arrays."""
    return {k: v for k, v in batch.items() if k not in EVAL_METADATA}


def import_task_modules(config: ml_collections.ConfigDict) -> None:
    """Imports `config.data.task_modules` (comma-separated), so the user's SeqIO tasks register."""
    for name in filter(None, (m.strip() for m in config.data.task_modules.split(","))):
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if not e.name or not (name == e.name or name.startswith(e.name + ".")):
                raise  # the module is there; something it imports is not (its traceback says what)
            raise errors.ConfigError("data.task_modules", f"importable modules; there is no {e.name!r} on the module path "
                              f"(run from the directory that holds {e.name}.py, or add it to PYTHONPATH)",
                              config.data.task_modules) from e


def resolve_provider(config: ml_collections.ConfigDict) -> seqio.Task | seqio.Mixture:
    """The task or mixture `config.data.task` names, after registering the built-in tasks for this
    config's data dir, vocabulary and shuffle buffer and importing `config.data.task_modules` (and
    the mixture `config.data.mixture_rates` describes, when set). A mixture, built-in or the
    user's, reads the tasks registered for this config."""
    vocabulary = vocab_lib.get_vocabulary(config)
    # Before the user's modules, for one that builds on a built-in task at import. That helps a
    # first import only (a module is imported once per process, and callers such as
    # train/loop.py import them earlier), so the mixture read is also rebound below.
    tasks_lib.register_tasks(data_dir=config.data.tfds_data_dir or None, vocabulary=vocabulary,
                             shuffle_buffer_size=config.data.shuffle_buffer)
    import_task_modules(config)  # registers the user's tasks (once per process)
    mixtures_lib.register_mixtures()
    name = config.data.task
    rates = mixtures_lib.parse_rates(config.data.mixture_rates)
    if rates:
        mixtures_lib.register_mixture(name, rates, replace=True)
    known = set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names())
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3)
        raise errors.ConfigError(
            "data.task", ("one of " + ", ".join(map(repr, close)) + "?" if close else "a registered SeqIO task or mixture")
            + f" ({len(known)} registered: {', '.join(sorted(known))}). Yours: register it with "
            "mirasol3b_data.tasks.add_media_task in a module named by --config.data.task_modules (docs/data.md, 'Your own "
            "data: a SeqIO task')", name)
    provider = seqio.get_mixture_or_task(name)
    if isinstance(provider, seqio.Mixture):
        provider = mixtures_lib.rebind(name)  # it may hold tasks replaced by register_tasks above
    for task in tasks_lib.tasks_of(provider):
        task_vocab = task.output_features["prompt"].vocabulary
        if task_vocab != vocabulary:
            raise errors.ConfigError(
                "data.vocab_path", f"the vocabulary task {task.name!r} tokenizes with ({task_vocab}), or register the "
                "task with add_media_task(..., vocabulary=mirasol3b_data.vocab.get_vocabulary(config)); the config's is "
                f"{vocabulary}", config.data.vocab_path)
    return provider


def check_eval_split(config: ml_collections.ConfigDict) -> None:
    """Raises if a task of `config.data.task` lacks `config.eval.split`: `mirasol3b.main` calls it
    before training, so a wrong split fails now rather than at the final evaluation (after which a
    rerun finds the run finished and never evaluates)."""
    provider, split = resolve_provider(config), config.eval.split
    try:
        tasks_lib.check_prepared(provider, split)  # TFDS sources: not built -> FileNotFoundError
    except ValueError as e:
        raise errors.ConfigError("eval.split", f"a split of the task ({e})", split) from e
    for task in tasks_lib.tasks_of(provider):
        if split not in task.splits:
            raise errors.ConfigError("eval.split", f"a split of task {task.name!r}: {sorted(task.splits)}", split)


def local_batch_size(config: ml_collections.ConfigDict, num_shards: int) -> int:
    if config.data.batch_size % num_shards:
        raise ValueError(f"config.data.batch_size ({config.data.batch_size}) must be a multiple of the number of "
                         f"data shards (hosts) ({num_shards})")
    return config.data.batch_size // num_shards


def _task_examples(provider, split: str, *, shuffle: bool, seed: int | None, shard_info: seqio.ShardInfo | None,
                   num_epochs: int | None, shuffle_buffer_size: int | None = None) -> tf.data.Dataset:
    """`shuffle_buffer_size`: a task's own unless given (a mixture takes none)."""
    # No trimming here: the converter truncates text its own way. No in-memory cache: seqio would
    # cache any split under 10k examples, i.e. GBs of decoded video.
    buffer = {"shuffle_buffer_size": shuffle_buffer_size} if shuffle_buffer_size else {}
    return provider.get_dataset(sequence_length=None, split=split, shuffle=shuffle, seed=seed, shard_info=shard_info,
                                num_epochs=num_epochs, trim_output_features=False, try_in_mem_cache=False, **buffer)


def _has_example(task: seqio.Task, split: str, seed: int | None, shard_info: seqio.ShardInfo | None) -> bool:
    """Whether one epoch of `task`'s `split` (the part `shard_info` names) yields an example."""
    # The training read's source order and sharding (seqio shards examples after the source's
    # seeded file shuffle when there are fewer files than shards), but a shuffle buffer of 1, so
    # take(1) stops at the first example the task's filters keep.
    ds = _task_examples(task, split, shuffle=True, seed=seed, shard_info=shard_info, num_epochs=1,
                        shuffle_buffer_size=1)
    return any(True for _ in ds.take(1))


def check_has_examples(provider, split: str, seed: int | None, shard_info: seqio.ShardInfo) -> None:
    """Raises, naming the task, split, shard and kind filter, if a task of `provider` yields no
    example for this shard: training repeats it forever and would wait for one without end.

    Cost: per task, reading up to its first kept example (usually the first record). Only a task
    whose filters keep nothing in this shard costs more: one pass over the shard, decoding every
    clip, and then up to one pass over the whole split to tell an empty shard from an empty split.
    """
    tasks = tasks_lib.tasks_of(provider)
    for task in tasks:
        if split not in task.splits:
            continue  # a mixture skips it; a lone task fails in seqio with its own message
        if _has_example(task, split, seed, shard_info):
            continue
        where = f"mixture {provider.name!r}: task {task.name!r}" if task is not provider else f"task {task.name!r}"
        kinds = [p.kind for p in task.preprocessors if isinstance(getattr(p, "kind", None), str)]
        kept = f" that its kind filter {kinds[0]!r} keeps" if kinds else ""
        others = []
        if kinds:
            whole = task.name.removesuffix(f"_{kinds[0]}")
            unfiltered = f" such as {whole!r}" if whole != task.name and whole in seqio.TaskRegistry.names() else ""
            others.append(f"train on a task without the filter{unfiltered}")
        if isinstance(provider, seqio.Mixture):
            others.append(f"leave {task.name!r} out of the mixture (config.data.mixture_rates='task:rate,...')")
        n, i = shard_info.num_shards, shard_info.index
        if n > 1 and _has_example(task, split, seed, None):
            raise ValueError(
                f"{where}: shard {i} of {n} (numbered from 0: this host's part) of split {split!r} has no example"
                f"{kept}, though other shards have some; this host would wait for one forever and stall every host. "
                f"Add such examples to the split (each of the {n} hosts needs one in its shard), train on fewer "
                f"hosts, or {' or '.join(others) or 'use another task'}")
        fixes = [f"Build the dataset from annotations that include {kinds[0]!r} examples (docs/data.md, 'Your own data')"
                 if kinds else f"Make its source yield examples for {split!r}", *others]
        raise ValueError(f"{where} has no example in split {split!r}{kept}, so training would wait for one forever. "
                         + "; or ".join(fixes))


def _with_metadata(task: seqio.Task):
    """Keeps the converter's task features and adds `EVAL_METADATA` as scalar strings."""
    keys = set(fc.Mirasol3BFeatureConverter.TASK_FEATURES)
    vocabulary = task.output_features["answer"].vocabulary

    def fn(ex):
        out = {k: v for k, v in ex.items() if k in keys}
        # User sources may lack these fields (spec.py stores "" for "none").
        out.update({k: ex.get(k, tf.constant("")) for k in ("question_type", "kind")})
        # Decoded from the tokens, as predictions are; the raw string is gone after tokenization.
        out["answer_text"] = vocabulary.decode_tf(ex["answer"])
        # As a string, so it rides through the converter as the other metadata does (its rows
        # differ in length); `parse_evidence` reads it back.
        spans = ex.get("evidence", tf.zeros([0, 2], tf.float32))
        out["evidence"] = tf.strings.reduce_join(
            tf.strings.as_string(spans[:, 0], precision=4) + ":" + tf.strings.as_string(spans[:, 1], precision=4),
            separator=" ")
        return out
    return fn


def parse_evidence(text: str) -> tuple[tuple[float, float], ...]:
    """"0.2500:0.7500 1.0000:1.2500" (`_with_metadata`'s form) -> ((0.25, 0.75), (1.0, 1.25))."""
    return tuple((float(a), float(b)) for a, b in (span.split(":") for span in text.split()))


def _eval_examples(provider, split: str) -> tf.data.Dataset:
    """Every example of `split` once, unshuffled, with its metadata; a mixture's tasks one after
    another (rates do not apply)."""
    tasks = tasks_lib.tasks_of(provider)
    tasks = [t for t in tasks if split in t.splits]
    if not tasks:
        raise ValueError(f"no task of {provider.name!r} has a {split!r} split")
    datasets = [_task_examples(t, split, shuffle=False, seed=None, shard_info=None, num_epochs=1)
                .map(_with_metadata(t)) for t in tasks]
    ds = datasets[0]
    for other in datasets[1:]:
        ds = ds.concatenate(other)
    return ds


class _TruncationLog:
    """Counts truncated examples; logs whenever a count reaches the next power of two."""

    def __init__(self, counts: dict | None = None):
        self.counts = dict(counts or {"examples": 0, "prompt_truncated": 0, "answer_truncated": 0})

    def update(self, truncation: np.ndarray, valid: np.ndarray) -> None:
        before = dict(self.counts)
        self.counts["examples"] += int(valid.sum())
        self.counts["prompt_truncated"] += int(((truncation == fc.PROMPT_TRUNCATED) & valid).sum())
        self.counts["answer_truncated"] += int(((truncation == fc.ANSWER_TRUNCATED) & valid).sum())
        if any(self.counts[k].bit_length() > before[k].bit_length() for k in ("prompt_truncated", "answer_truncated")):
            logging.warning("text longer than config.data.text_length: of %d examples, %d lost their prompt's start "
                            "and %d their answer's end and EOS", self.counts["examples"],
                            self.counts["prompt_truncated"], self.counts["answer_truncated"])


def _to_model_batch(batch: dict, log: _TruncationLog) -> dict[str, np.ndarray]:
    batch = dict(batch)
    truncation = batch.pop("truncation")
    batch.setdefault("example_valid", np.ones(truncation.shape, bool))
    log.update(truncation, batch["example_valid"])
    return batch


@dataclasses.dataclass(frozen=True)
class _Where:
    """What a saved position is only valid for."""

    name: str
    split: str
    seed: int
    shard_index: int
    num_shards: int
    batch_size: int


_LIVE_ITERATORS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _release_tf_iterators() -> None:
    """Frees every TrainIterator's TF iterator before the interpreter's shutdown would: freed then,
    a mixture's (a sampler over parallel maps) waits forever for worker threads that no longer run."""
    for it in list(_LIVE_ITERATORS):
        it._it = None


class TrainIterator(Iterator):
    """Infinite host-local batches; `get_state()`/`set_state()` save and restore its position."""

    def __init__(self, config: ml_collections.ConfigDict, split: str, shard_index: int, num_shards: int, seed: int):
        if not 0 <= shard_index < num_shards:
            raise ValueError(f"shard_index must be in [0, {num_shards}), got {shard_index}")
        self._provider = resolve_provider(config)
        tasks_lib.check_prepared(self._provider, split)
        # Here rather than in `_build`: reading forever, an empty task would hang without a word.
        check_has_examples(self._provider, split, int(seed), seqio.ShardInfo(shard_index, num_shards))
        self._lengths = fc.task_feature_lengths(config)
        self._where = _Where(self._provider.name, split, int(seed), shard_index, num_shards,
                             local_batch_size(config, num_shards))
        self._batches = 0
        self._log = _TruncationLog()
        self._it = None  # built on first use, so set_state before it costs nothing
        _LIVE_ITERATORS.add(self)
        # SeqIO takes a buffer size for a task's dataset, not a mixture's (its tasks keep their own).
        self._shuffle_buffer = config.data.shuffle_buffer if isinstance(self._provider, seqio.Task) else None

    def _build(self):
        w = self._where
        ds = _task_examples(self._provider, w.split, shuffle=True, seed=w.seed, num_epochs=None,
                            shard_info=seqio.ShardInfo(w.shard_index, w.num_shards),
                            shuffle_buffer_size=self._shuffle_buffer)
        ds = ds.skip(self._batches * w.batch_size)
        ds = fc.Mirasol3BFeatureConverter()(ds, self._lengths)
        ds = ds.batch(w.batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
        return ds.as_numpy_iterator()

    def __next__(self) -> dict[str, np.ndarray]:
        if self._it is None:
            self._it = self._build()
        batch = _to_model_batch(next(self._it), self._log)
        self._batches += 1
        return batch

    @property
    def truncation_counts(self) -> dict[str, int]:
        return dict(self._log.counts)

    def get_state(self) -> dict:
        """A JSON-able dict: where the next batch comes from (store it with `ocp.args.JsonSave`)."""
        return {"version": _STATE_VERSION, **dataclasses.asdict(self._where), "batches": self._batches,
                "truncation_counts": dict(self._log.counts)}

    def set_state(self, state: dict | str | bytes) -> None:
        """Continues from `state` (from `get_state`, as a dict or its JSON); raises if it was saved
        for another task, split, seed, sharding or batch size (the order would not be the same)."""
        if isinstance(state, (str, bytes)):
            state = json.loads(state)
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"data iterator state version {state.get('version')!r}, expected {_STATE_VERSION}")
        saved = _Where(**{f.name: state[f.name] for f in dataclasses.fields(_Where)})
        if saved != self._where:
            diff = {f.name: (getattr(saved, f.name), getattr(self._where, f.name)) for f in dataclasses.fields(_Where)
                    if getattr(saved, f.name) != getattr(self._where, f.name)}
            raise ValueError(f"the saved data position does not apply to this input pipeline; (saved, now): {diff}")
        self._batches = int(state["batches"])
        self._log = _TruncationLog(state["truncation_counts"])
        self._it = None


class EvalIterator:
    """One finite, unshuffled pass over `split` per `iter()`; see the module docstring."""

    def __init__(self, config: ml_collections.ConfigDict, split: str, shard_index: int, num_shards: int):
        if not 0 <= shard_index < num_shards:
            raise ValueError(f"shard_index must be in [0, {num_shards}), got {shard_index}")
        self._provider = resolve_provider(config)
        tasks_lib.check_prepared(self._provider, split)
        self._lengths = fc.task_feature_lengths(config)
        self._split, self._index, self._shards = split, shard_index, num_shards
        self._batch_size = local_batch_size(config, num_shards)
        self._log = _TruncationLog()

    @property
    def truncation_counts(self) -> dict[str, int]:
        return dict(self._log.counts)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        b, n, i = self._batch_size, self._shards, self._index
        self._log = _TruncationLog()  # counts of this pass
        group = n * b  # one global batch: host i owns rows [i*b, (i+1)*b) of each
        # The strings ride through the converter in the same rows, so they cannot fall out of step.
        converter = fc.Mirasol3BFeatureConverter(
            passthrough_features={k: fc.Mirasol3BFeatureConverter.FeatureSpec(tf.string, rank=0)
                                  for k in EVAL_METADATA})
        lengths = {**self._lengths, **{k: 1 for k in EVAL_METADATA}}  # rank 0: seqio checks no length
        ds = converter(_eval_examples(self._provider, self._split), lengths)
        # Besides its own rows, every host keeps the first example of each global batch (when it
        # is not its own, only to learn that the batch exists) so all hosts agree on the count.
        ds = ds.enumerate().filter(lambda k, ex: tf.logical_or((k // b) % n == i, k % group == 0))
        rows, template, current = [], None, None
        for k, ex in ds.as_numpy_iterator():
            g = int(k) // group
            if current is not None and g != current:
                yield self._pad(rows, template)
                rows = []
            current, template = g, ex
            if (int(k) // b) % n == i:
                rows.append(ex)
        if current is not None:
            yield self._pad(rows, template)

    def _pad(self, rows: list[dict], template: dict) -> dict[str, np.ndarray]:
        """Stacks `rows`, padded to the local batch with zero rows (shaped like `template`) marked invalid."""
        valid = len(rows)
        padding = {k: b"" if k in EVAL_METADATA else np.zeros_like(v) for k, v in template.items()}
        rows = rows + [padding] * (self._batch_size - valid)
        batch = {k: np.array([r[k].decode("utf-8", "replace") for r in rows], object) if k in EVAL_METADATA
                 else np.stack([r[k] for r in rows]) for k in template}
        batch["evidence"] = np.array([None] * len(rows), object)  # rows of tuples: no 2-D object array
        batch["evidence"][:] = [parse_evidence(r["evidence"].decode()) for r in rows]
        batch["example_valid"] = np.arange(self._batch_size) < valid
        batch["prompt_lengths"][valid:] = 1  # a lone BOS: padding rows still decode without special cases
        return _to_model_batch(batch, self._log)


def make_input_iterator(config: ml_collections.ConfigDict, split: str = "train", shard_index: int | None = None,
                        num_shards: int | None = None, seed: int | None = None) -> TrainIterator:
    """Training batches for this host (defaults: `jax.process_index()` of `jax.process_count()`,
    `config.seed`)."""
    return TrainIterator(config, split, jax.process_index() if shard_index is None else shard_index,
                         jax.process_count() if num_shards is None else num_shards,
                         config.seed if seed is None else seed)


def make_eval_iterator(config: ml_collections.ConfigDict, split: str = "validation", shard_index: int | None = None,
                       num_shards: int | None = None) -> EvalIterator:
    """One padded pass over `split` for this host; iterate it once per evaluation."""
    return EvalIterator(config, split, jax.process_index() if shard_index is None else shard_index,
                        jax.process_count() if num_shards is None else num_shards)
