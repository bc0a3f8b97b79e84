"""SeqIO tasks: a source of examples in the `data/spec.py` schema + preprocessors + output features.

The built datasets hold one example per clip with all its texts; the built-in tasks start with
`per_text`, which turns each clip into one example per text (question, caption or label), so an
epoch still asks every question once and evaluation scores every one. The texts of a clip share
its decoded frames (they are references to one tensor, not copies), so a shuffle buffer of N
examples holds about N / (texts per clip) clips; it also holds a clip's texts close together, so a
batch drawn from it has several questions about one clip more often than one drawn from the
whole dataset (the synthetic training split: 4 a clip).

Built-in tasks (registered on import, and again by `register_tasks` when the data dir, vocabulary or
shuffle buffer change):
  synthetic_avqa_{tiny,tiny_smoke,long}     the generated audio-visual QA clips (long: 32 snippets)
  local_media_{config}                      every example of a `local_media` build (any of its configs)
  local_media_{config}_{qa,caption,classification}   one kind only (manifest configs: tiny, base, *_silence)

Registering needs no built dataset: TFDS is read on the first `get_dataset`, with `read_only=True`
so a missing dataset is an error (`check_prepared` says how to build it), never a download.

The data dir is `register_tasks(data_dir=...)` (the pipeline passes `config.data.tfds_data_dir`);
when None, TFDS's own default: `$TFDS_DATA_DIR`, else `~/tensorflow_datasets`.

Your own task is one call (see docs/data.md, "Your own data: a SeqIO task"):
    add_media_task("my_task", seqio.FunctionDataSource(my_dataset_fn, splits=["train"]))
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

from mirasol3b import errors
from mirasol3b_data import spec as spec_lib

SPLITS = ("train", "validation", "test")
# Examples are whole clips (MBs at paper scale): the buffer's memory is this many decoded clips.
DEFAULT_SHUFFLE_BUFFER = 256

# (TFDS name with version, task name) of every built-in source. The versions are the builders'.
SYNTHETIC_AVQA_VERSION = "2.1.0"
SYNTHETIC_AVQA_CONFIGS = ("tiny", "tiny_smoke", "long")
LOCAL_MEDIA_VERSION = "2.1.0"
# Versions before these stored one example per text; their layout is not read (see `check_prepared`).
CLIP_LAYOUT_SINCE = {"synthetic_avqa": "2.0.0", "local_media": "2.0.0"}
# Versions before these have no evidence spans (`data/spec.py`); rebuilt, they have.
EVIDENCE_SINCE = {"synthetic_avqa": "2.1.0", "local_media": "2.1.0"}
LOCAL_MEDIA_GEOMETRIES = ("tiny", "base", "long")
# The builder's config names (a test checks them): the manifest configs mix kinds of example, so
# they also get one task per kind; the public formats hold one kind each.
LOCAL_MEDIA_MANIFEST_CONFIGS = tuple(g + s for g in LOCAL_MEDIA_GEOMETRIES for s in ("", "_silence"))
LOCAL_MEDIA_PUBLIC_CONFIGS = tuple(f"{source}_{c}" for source in (
    "msrvtt_qa", "activitynet_qa", "nextqa", "vggsound", "kinetics_sound") for c in LOCAL_MEDIA_MANIFEST_CONFIGS)


def output_features(vocabulary: seqio.Vocabulary | None = None) -> dict[str, seqio.Feature]:
    """What every media task outputs. Text has no EOS here: the feature converter appends it."""
    vocabulary = vocabulary or seqio.ByteVocabulary()
    return {
        "prompt": seqio.Feature(vocabulary, add_eos=False),
        "answer": seqio.Feature(vocabulary, add_eos=False),
        "video": seqio.ContinuousFeature(dtype=tf.uint8, rank=4),  # [frames, H, W, 3]
        "audio": seqio.ContinuousFeature(dtype=tf.float32, rank=1),  # [samples]
        "num_snippets": seqio.ContinuousFeature(dtype=tf.int32, rank=0),
    }


def per_text(ds: tf.data.Dataset) -> tf.data.Dataset:
    """Clip examples (`data/spec.py`: `texts`, `evidence` and int16 `audio`) -> one example per
    text, with the clip's media (audio as float32 in [-1, 1]), the text's fields as top-level keys
    and its `evidence` spans, float32 [spans, 2] (start, end seconds)."""
    from mirasol3b_data.storage import AUDIO_SCALE

    def expand(clip):
        media = {k: v for k, v in clip.items() if k not in ("texts", "evidence")}
        media["audio"] = tf.cast(media["audio"], tf.float32) / AUDIO_SCALE
        spans = clip["evidence"]
        rows = tf.stack([spans["start"], spans["end"]], axis=-1)

        def one(index, text):
            return {**media, **text, "evidence": tf.boolean_mask(rows, tf.equal(spans["text"], index))}
        texts = tf.data.Dataset.from_tensor_slices(clip["texts"])
        return tf.data.Dataset.zip(tf.data.Dataset.range(tf.int64.max), texts).map(
            lambda i, text: one(tf.cast(i, tf.int32), text))
    return ds.flat_map(expand)


# Tokenizes the text output features; the media features' PassThroughVocabulary leaves them as they are.
tokenize = functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False)


def filter_kind(kind: str) -> Callable[[tf.data.Dataset], tf.data.Dataset]:
    """A preprocessor keeping examples whose `kind` is `kind` (one of `spec.KINDS`)."""
    if kind not in spec_lib.KINDS:
        raise ValueError(f"kind must be one of {spec_lib.KINDS}, got {kind!r}")

    def keep(ds: tf.data.Dataset) -> tf.data.Dataset:
        return ds.filter(lambda ex: tf.equal(ex["kind"], kind))
    keep.__name__ = f"filter_kind_{kind}"
    keep.kind = kind  # read by the pipeline's check for tasks that yield nothing, to name the filter
    return keep


def add_media_task(name: str, source: seqio.DataSource, *, vocabulary: seqio.Vocabulary | None = None,
                   preprocessors: Sequence[Callable] = (), shuffle_buffer_size: int = DEFAULT_SHUFFLE_BUFFER,
                   replace: bool = False) -> seqio.Task:
    """Registers a task whose source yields the `data/spec.py` schema (or is mapped to it by
    `preprocessors`, which run before tokenization and see `prompt`/`answer` as strings).

    Source examples need `video` uint8 [frames, H, W, 3], `audio` float32 [samples], `num_snippets`
    int32 [], `prompt` and `answer` strings; other keys are ignored. `replace` drops a task of
    the same name first (seqio refuses duplicates).
    """
    if replace:
        seqio.TaskRegistry.remove(name)
    return seqio.TaskRegistry.add(
        name, source=source, preprocessors=[*preprocessors, tokenize], output_features=output_features(vocabulary),
        shuffle_buffer_size=shuffle_buffer_size)


# TFDS keeps a dataset under 250 MiB on disk in memory after the first pass, decoded (`try_autocache`):
# with frames stored as images that is ~15x its size on disk (a 250 MiB set of 224 px clips: ~4 GB
# a host, on top of the shuffle buffer). Off for every TFDS source read through seqio in this
# process; a task module that sets seqio's override itself (imported after this one) wins.
seqio.utils.set_tfds_read_config_override(tfds.ReadConfig(try_autocache=False))


def tfds_source(tfds_name: str, data_dir: str | None) -> seqio.TfdsDataSource:
    """A lazily loaded, never built-on-read TFDS source with our splits."""
    return seqio.TfdsDataSource(tfds_name=tfds_name, tfds_data_dir=data_dir, splits=SPLITS, read_only=True)


def builtin_tasks() -> dict[str, tuple[str, tuple[Callable, ...]]]:
    """Task name -> (TFDS name, preprocessors) of every built-in task."""
    out = {f"synthetic_avqa_{c}": (f"synthetic_avqa/{c}:{SYNTHETIC_AVQA_VERSION}", (per_text,))
           for c in SYNTHETIC_AVQA_CONFIGS}
    for c in LOCAL_MEDIA_MANIFEST_CONFIGS + LOCAL_MEDIA_PUBLIC_CONFIGS:
        out[f"local_media_{c}"] = (f"local_media/{c}:{LOCAL_MEDIA_VERSION}", (per_text,))
    for c in LOCAL_MEDIA_MANIFEST_CONFIGS:
        out.update({f"local_media_{c}_{kind}": (f"local_media/{c}:{LOCAL_MEDIA_VERSION}", (per_text, filter_kind(kind)))
                    for kind in spec_lib.KINDS})
    return out


_registered_with: tuple | None = None


def register_tasks(data_dir: str | None = None, vocabulary: seqio.Vocabulary | None = None,
                   shuffle_buffer_size: int = DEFAULT_SHUFFLE_BUFFER) -> list[str]:
    """(Re-)registers the built-in tasks; a no-op when called again with the same arguments.

    Mixtures hold Task objects: read one through `mixtures.rebind` (the pipeline does) to get the
    tasks registered now. Returns the task names.
    """
    global _registered_with
    vocabulary = vocabulary or seqio.ByteVocabulary()
    key = (data_dir, vocabulary, shuffle_buffer_size)
    tasks = builtin_tasks()
    if _registered_with != key:
        for name, (tfds_name, preprocessors) in tasks.items():
            add_media_task(name, tfds_source(tfds_name, data_dir), vocabulary=vocabulary,
                           preprocessors=preprocessors, shuffle_buffer_size=shuffle_buffer_size, replace=True)
        _registered_with = key
    return list(tasks)


def tasks_of(provider: seqio.Task | seqio.Mixture) -> list[seqio.Task]:
    """A mixture's tasks, or the task itself."""
    return list(provider.tasks) if isinstance(provider, seqio.Mixture) else [provider]


def check_prepared(provider: seqio.Task | seqio.Mixture, split: str) -> None:
    """Raises, naming the dataset, its data dir and the command that builds it, if a TFDS source
    of `provider` has not been built (or lacks `split`)."""
    for task in tasks_of(provider):
        source = task.source
        if not isinstance(source, seqio.TfdsDataSource):
            continue
        loader = source.tfds_dataset
        name, data_dir = loader.name, loader.data_dir
        shown_dir = data_dir or f"the TFDS default ({tfds.core.constants.DATA_DIR}, or $TFDS_DATA_DIR)"
        dataset, config = name.split(":")[0].split("/")
        try:
            builder = loader.builder
            built = builder.is_prepared()
        except Exception:  # noqa: BLE001 -- TFDS raises several types for "not here", each listing every dataset
            built = False
        if not built:
            _refuse_old_versions(task.name, dataset, config, name.partition(":")[2], data_dir, shown_dir)
            raise errors.NotFoundError(
                f"task {task.name!r}: TFDS dataset {name!r} is not built in {shown_dir}. Build it with "
                f"`tfds build data/builders/{dataset} --config={config}"
                f"{' --data_dir=' + data_dir if data_dir else ''}` (local_media also needs --manual_dir), or point "
                "config.data.tfds_data_dir at the directory that holds it")
        splits = builder.info.splits
        if split not in splits:
            raise ValueError(f"task {task.name!r}: {name} in {shown_dir} has splits {sorted(splits)}, not {split!r}")


def _refuse_old_versions(task: str, dataset: str, config: str, version, data_dir: str | None, shown_dir: str) -> None:
    """Raises, naming the version and the rebuild command, where only a version this release does not
    read is built (TFDS would say only that the dataset is missing)."""
    from etils import epath

    folder = epath.Path(data_dir or tfds.core.constants.DATA_DIR) / dataset / config
    found = sorted(p.name for p in folder.iterdir() if (p / "dataset_info.json").exists()) if folder.is_dir() else []
    if found:
        old = ", ".join(found)
        since, evidence_since = CLIP_LAYOUT_SINCE.get(dataset), EVIDENCE_SINCE.get(dataset)
        older = lambda v: tuple(map(int, found[-1].split("."))) < tuple(map(int, v.split(".")))  # noqa: E731
        if since and older(since):
            why = (f"versions before {since} stored one example per text, each with its own copy of the clip; this "
                   "release stores each clip once")
        elif evidence_since and older(evidence_since):
            why = (f"versions before {evidence_since} have no evidence spans, which grounding metrics and reports "
                   "read")
        else:
            why = "this release reads another version"
        raise errors.NotFoundError(
            f"task {task!r}: {dataset}/{config} in {shown_dir} is version {old}, and this release reads {version} "
            f"({why}). Rebuild it: `tfds build data/builders/{dataset} --config={config}"
            f"{' --data_dir=' + data_dir if data_dir else ''}` (local_media also needs --manual_dir); the old "
            f"version's folder {folder / found[-1]} can then be deleted")


register_tasks()
