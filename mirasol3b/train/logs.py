"""What a run writes besides checkpoints: `metrics.jsonl` and TensorBoard events (training and its
evaluations), and `eval_<split>_step<N>.json` (each evaluation's whole result)."""

from __future__ import annotations

import json

import jax
import numpy as np
from etils import epath

from mirasol3b import distributed


class MetricsLog:
    """Appends metrics to `metrics.jsonl` and TensorBoard event files in the workdir (process 0).

    `metrics.jsonl` is opened, appended to and closed at every write (an `epath` file on GCS is a
    context manager, not a handle to keep): on GCS each write re-uploads the whole object, which is
    small (one line per `train.log_every` steps), and a crash loses at most the line being written.
    """

    def __init__(self, workdir: epath.PathLike, resumed_from: int = 0):
        self.enabled = jax.process_index() == 0
        self.workdir = epath.Path(workdir)
        self.tensorboard_dir = self.workdir / "tensorboard"
        if self.enabled:
            import tensorflow as tf
            from tensorflow.core.framework import summary_pb2

            # `tf.summary.scalar` lives in the tensorboard package (not installed); this is what it
            # writes: a float tensor tagged for TensorBoard's scalars plugin.
            metadata = summary_pb2.SummaryMetadata()
            metadata.plugin_data.plugin_name = "scalars"
            self._scalar_metadata = metadata.SerializeToString()
            self._tf = tf
            self.path = self.workdir / "metrics.jsonl"
            self.path.touch()  # present from the start, as an opened log would be
            self._drop_after(resumed_from)
            self._writer = tf.summary.create_file_writer(str(self.tensorboard_dir))  # gs:// too

    def _records(self) -> list[tuple[str, dict | None]]:
        """(line, its record, or None for a line a crash left unfinished) of metrics.jsonl."""
        out = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            out.append((line, record if isinstance(record, dict) and "step" in record else None))
        return out

    def has_eval(self, step: int) -> bool:
        """Whether an evaluation of `step` was logged (every process gets process 0's answer)."""
        found = self.enabled and any(r is not None and r["step"] == step and r.get("split") == "eval"
                                     for _, r in self._records())
        return distributed.primary_decides(found)

    def _drop_after(self, step: int) -> None:
        """Lines of steps after the checkpoint resumed from were written by a run that died before
        saving them; those steps are trained again, so their old lines go (as does a line the crash
        left unfinished)."""
        records = self._records()
        kept = [line for line, r in records if r is not None and r["step"] <= step]
        if len(kept) < len(records):
            self.path.write_text("".join(line + "\n" for line in kept))
            print(f"metrics.jsonl: dropped {len(records) - len(kept)} lines of steps after {step} (trained "
                  "again) or left unfinished", flush=True)

    def write(self, step: int, metrics: dict, prefix: str = "train") -> None:
        if not self.enabled:
            return
        scalars = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float, np.number))}
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "split": prefix, **scalars}) + "\n")
        with self._writer.as_default(step=step):
            for k, v in scalars.items():
                self._tf.summary.write(f"{prefix}/{k}", self._tf.constant(v, self._tf.float32),
                                       metadata=self._scalar_metadata)
        self._writer.flush()

    def close(self) -> None:
        if self.enabled:
            self._writer.close()


def write_metrics(workdir: epath.PathLike, metrics: dict, trained_numerics: dict | None = None) -> epath.Path:
    """`metrics` (with its `step` and `split`) as one JSON line in `workdir/eval_<split>_step<N>.json`;
    answers generated otherwise than greedily add `_beam<K>` or `_sample` to the name (through a
    stream `_streaming`), dtypes other
    than `trained_numerics` (the training run's `numerics`) `_<field>-<dtype>`, and a partial
    evaluation (`max_batches` K) `_first<K>batches`, evidence other than the default level
    (`"evidence"`, mirasol3b/evidence.py) `_evidence-<level>`, so none replaces training's own."""
    decode = metrics.get("decode") or {}
    how = {"beam": f"_beam{decode.get('beam_size')}", "sample": "_sample"}.get(decode.get("method"), "")
    how += "_streaming" if metrics.get("path") == "streaming" else ""
    how += f"_evidence-{metrics['evidence']}" if metrics.get("evidence", "context") != "context" else ""
    here, trained = metrics.get("numerics") or {}, trained_numerics or {}
    how += "".join(f"_{k}-{v}" for k, v in here.items() if k in trained and trained[k] != v)
    partial = f"_first{metrics['max_batches']}batches" if metrics.get("max_batches") else ""
    path = epath.Path(workdir) / f"eval_{metrics['split']}_step{metrics['step']}{how}{partial}.json"
    path.write_text(json.dumps(metrics) + "\n")
    return path
