"""Paths that are local or in a bucket: the run's workdir, its checkpoints directory, files
written atomically.

Remote workdirs. `workdir` may be a local path or a URI such as `gs://bucket/runs/x` (what TPU pod
slices use): Orbax reads and writes `gs://` itself (TensorStore's GCS driver), and every other file
a run writes (the corrupt-checkpoint record, the step listing) goes through
`etils.epath.Path` (`tf.io.gfile` when TensorFlow is installed). Local paths are made absolute;
URIs are kept as given (`os.path.abspath` would turn `gs://b/x` into `$PWD/gs:/b/x`). Orbax asks
google-cloud-storage whether a bucket has a hierarchical namespace before it lists steps there, a
package it does not require: `Checkpointer` says so up front (`require_gcs_client`).
"""

from __future__ import annotations

import os

from etils import epath

from mirasol3b import errors


def is_remote(path: epath.PathLike) -> bool:
    """True for a URI (`gs://bucket/...`, `s3://...`): a path `os` functions cannot reach."""
    return "://" in os.fspath(path)


def as_path(path: epath.PathLike) -> epath.Path:
    """`path` as an `epath.Path`: local paths made absolute, URIs (`gs://...`) kept as they are."""
    return epath.Path(path) if is_remote(path) else epath.Path(os.path.abspath(path))


def require_gcs_client(directory: epath.PathLike) -> None:
    """Raises ImportError naming the package when `directory` is `gs://` and google-cloud-storage is
    missing (Orbax imports it to list checkpoint steps in a bucket; without it every call fails
    with a bare "cannot import name 'storage' from 'google.cloud'")."""
    if not os.fspath(directory).startswith("gs://"):
        return
    try:
        from google.cloud import storage  # noqa: F401
    except ImportError as e:
        raise ImportError(f"checkpoints in {os.fspath(directory)} need google-cloud-storage (Orbax lists a "
                          "bucket's checkpoint steps with it): pip install google-cloud-storage") from e


def write_text_atomically(path: epath.Path, text: str) -> None:
    """Writes `text` to `path` so that a reader sees the old file or the new one, never half of one.

    Local: a temporary file renamed over `path` (`os.replace`, atomic on POSIX). Remote (GCS):
    written directly, because an object becomes visible only once its upload completes, whole,
    while a "rename" there is a copy then a delete, with no atomicity of its own.
    """
    if is_remote(path):
        path.write_text(text)
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def run_dir(workdir: epath.PathLike, what: str) -> epath.Path:
    """The run's workdir, given it or its `checkpoints` directory."""
    workdir = epath.Path(workdir)  # normalised: no trailing slash
    if not (workdir / "checkpoints").is_dir() and workdir.name == "checkpoints":
        workdir = workdir.parent
    if not (workdir / "checkpoints").is_dir():
        raise errors.NotFoundError(f"{what}: no checkpoints directory at {workdir / 'checkpoints'}")
    return workdir
