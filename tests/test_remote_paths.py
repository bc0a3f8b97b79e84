"""A `gs://` workdir (what TPU pod slices use) and a `gs://` TFDS data dir, on a fake bucket.

`fake_bucket` sends every `gs://B/...` path to `<tmp>/gcs/B/...`, at the three doors they go through:
  * `etils.epath` (our files, and Orbax's own directory and JSON work): `epath.testing.mock_epath`
    with path-translating functions, and epath's TensorFlow backend switched off so the mock is used;
  * TensorStore (Orbax's arrays): the kvstore spec Orbax builds for `gs://` becomes a `file` one;
  * TensorBoard: `tf.summary.create_file_writer` gets the local folder.
Everything above those doors runs as it would against a bucket: our code, Orbax's GCS code paths
(commit-file atomicity instead of rename, GCS deletion), and the `gs://` strings in between.
Not covered (needs a real bucket): tf.io.gfile's and TensorStore's GCS clients themselves
(credentials, retries, append and listing semantics of objects), and Orbax's hierarchical-namespace
check, which imports google-cloud-storage (replaced here by "not HNS"; requirements.txt pins that
package, which a real `gs://` workdir needs; the last test, skipped where it is installed, checks the
message a setup without it gets).
"""

from __future__ import annotations

import functools
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys

import pytest
import tensorflow as tf
from etils import epath
from etils.epath import gpath
from etils.epath import testing as epath_testing
from orbax.checkpoint._src.path import gcs_utils
from seqio import vocabularies

from configs import tiny
from mirasol3b_data import vocab
from mirasol3b_data.builders import report
from mirasol3b import configlib
from mirasol3b import paths
from mirasol3b.train import checkpointer, logs, restore
from mirasol3b.train.checkpointer import Checkpointer
from mirasol3b.train import loop
from mirasol3b.train.random_batches import RandomBatches

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKDIR = "gs://bucket/runs/x"


@pytest.fixture
def fake_bucket(tmp_path, monkeypatch):
    """The local folder that stands for `gs://` (`gs://B/p` is `<it>/B/p`) while the test runs."""
    root = tmp_path / "gcs"
    root.mkdir()

    def local(path) -> str:
        path = os.fspath(path)
        return os.path.join(root, path[len("gs://"):]) if path.startswith("gs://") else path

    def remote(path) -> str:
        path = os.fspath(path)
        return "gs://" + os.path.relpath(path, root) if path.startswith(f"{root}/") else path

    def on_paths(original, *paths, **kwargs):
        return original(*map(local, paths), **kwargs)

    def glob(original, pattern):
        return [remote(p) for p in original(local(pattern))]

    def walk(original, top, **kwargs):
        for folder, dirs, files in original(local(top), **kwargs):
            yield remote(folder), dirs, files

    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)  # else gs:// bypasses the mock
    monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs", lambda path: {"driver": "file", "path": local(path)})
    monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
    monkeypatch.setattr(checkpointer, "require_gcs_client", lambda directory: None)  # what that check needs it for
    create_file_writer = tf.summary.create_file_writer
    monkeypatch.setattr(tf.summary, "create_file_writer",
                        lambda logdir, *args, **kwargs: create_file_writer(local(logdir), *args, **kwargs))
    names = ("copy", "exists", "isdir", "listdir", "makedirs", "mkdir", "open", "remove", "rename", "replace",
             "rmtree", "stat")
    with epath_testing.mock_epath(glob=glob, walk=walk, **{name: on_paths for name in names}):
        yield root


def _config(num_steps: int):
    cfg = tiny.get_config()
    cfg.model.use_audio = False  # its spectrogram is a third of the compile time; nothing here needs it
    for stack in configlib.STACKS:
        cfg.model[stack].update(width=32, depth=1, num_heads=2, mlp_dim=64)
    cfg.model.ttm.token_learner_hidden = 32
    cfg.model.video.image_size = 16
    cfg.model.text_decoder.max_length = 8
    cfg.mesh_shape = (-1, 1, 1)  # data parallel over the 8 fake devices: the quickest to compile
    cfg.data.update(num_frames=4, batch_size=8, text_length=8)
    cfg.train.update(num_steps=num_steps, warmup_steps=1, log_every=1)
    cfg.checkpoint.update(every_steps=1, keep=1, async_save=False)
    return configlib.validate(cfg)


def test_training_in_a_gs_workdir_writes_to_the_bucket_and_resumes(fake_bucket, capsys):
    run = fake_bucket / "bucket" / "runs" / "x"
    cfg = _config(2)
    loop.train(cfg, WORKDIR, data_iter=RandomBatches(cfg, cfg.data.batch_size))
    assert not os.path.exists(os.path.join(os.getcwd(), "gs:")), "the URI was taken for a local path"
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert os.listdir(run / "tensorboard"), "TensorBoard event files are written"
    assert sorted(os.listdir(run / "checkpoints")) == ["2"], "keep=1 deleted step 1 in the bucket"

    # Resuming reads the state and data position back (training on from there is test_train_loop's).
    data = RandomBatches(cfg, cfg.data.batch_size)
    assert loop.train(cfg, WORKDIR, data_iter=data) == {}
    out = capsys.readouterr().out
    assert f"resumed from step 2 ({WORKDIR}/checkpoints/2)" in out and "nothing to do" in out
    assert data.position == 2, "the data position was restored with the state"

    # What evaluate and answer read from the workdir besides the state restored above: the config.
    assert restore.config_from_workdir(WORKDIR).to_dict() == cfg.to_dict()
    assert os.fspath(logs.write_metrics(WORKDIR, {"step": 2, "split": "validation", "exact_match": 0.5})) \
        == f"{WORKDIR}/eval_validation_step2.json"
    assert json.loads((run / "eval_validation_step2.json").read_text())["exact_match"] == 0.5


def test_corrupt_record_and_half_written_steps_in_a_gs_workdir(fake_bucket):
    run = fake_bucket / "bucket" / "runs" / "x"
    checkpointer = Checkpointer(WORKDIR, save_every=1, keep=1)
    assert checkpointer.workdir == WORKDIR and checkpointer.directory == f"{WORKDIR}/checkpoints"
    assert checkpointer.record_path == f"{WORKDIR}/corrupt_checkpoints.json"
    (run / "checkpoints" / "3.orbax-checkpoint-tmp" / "state").mkdir(parents=True)
    assert checkpointer._half_written() == {3: f"{WORKDIR}/checkpoints/3.orbax-checkpoint-tmp"}
    assert checkpointer.maybe_save(3, {}, {}) is False and "3.orbax-checkpoint-tmp" in checkpointer.problems[0]
    # What Orbax really leaves on a bucket: it writes a step in place and commits it by writing
    # commit_success.txt last. Without that file the step is half-written, not a step.
    (run / "checkpoints" / "5" / "state").mkdir(parents=True)
    (run / "checkpoints" / "4" / "state").mkdir(parents=True)
    (run / "checkpoints" / "4" / "commit_success.txt").write_text("committed")
    assert checkpointer._half_written() == {3: f"{WORKDIR}/checkpoints/3.orbax-checkpoint-tmp",
                                            5: f"{WORKDIR}/checkpoints/5"}
    assert checkpointer.all_steps() == [4]
    for step in ("4", "5"):
        shutil.rmtree(run / "checkpoints" / step)
    checkpointer.corrupt[7] = "test"
    checkpointer._write_record()
    checkpointer.close()
    # Written in place (a GCS object appears whole), no temporary left behind.
    assert sorted(os.listdir(run)) == ["checkpoints", "corrupt_checkpoints.json"]
    with Checkpointer(WORKDIR, save_every=1, keep=1, read_only=True) as again:
        assert again.corrupt == {7: "test"} and again.latest_step() is None
    with pytest.raises(FileNotFoundError, match="no checkpoints directory at gs://bucket/runs/none/checkpoints; train there first"):
        restore.config_from_workdir("gs://bucket/runs/none")


def test_local_paths_stay_absolute_and_records_replace_atomically(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    checkpointer = Checkpointer("run", save_every=1, keep=1)
    assert checkpointer.workdir == str(tmp_path / "run")
    assert paths.as_path("gs://b/x") == epath.Path("gs://b/x") and os.fspath(paths.as_path("gs://b/x")) == "gs://b/x"
    replaced = []
    monkeypatch.setattr(os, "replace", lambda src, dst: replaced.append((src, dst)) or os.rename(src, dst))
    checkpointer.corrupt[5] = "test"
    checkpointer._write_record()
    checkpointer.close()
    assert replaced == [(checkpointer.record_path + ".tmp", checkpointer.record_path)]


class _Builder:
    """What `BuildReport` reads from a TFDS builder, mid-build in a `gs://` data dir."""
    name = "local_media"
    builder_config = type("Config", (), {"name": "tiny"})()
    data_path = epath.Path("gs://bucket/tfds/local_media/tiny/1.0.0.incomplete123")


def test_build_report_in_a_gs_data_dir(fake_bucket, monkeypatch):
    path = report.skipped_report_path(_Builder())
    assert os.fspath(path) == "gs://bucket/tfds/local_media/tiny/skipped.jsonl"
    build = report.BuildReport(_Builder(), ["train"])
    written = fake_bucket / "bucket" / "tfds" / "local_media" / "tiny" / "skipped.jsonl"
    build.skip("train", report.Skipped("a.mp4", "empty_file", annotation="manifest.jsonl", line=3))
    build.skip("train", report.Skipped("b.mp4", "no_audio_track"))
    assert written.read_text() == ""  # an object is rewritten whole, not once a row: held back...
    monkeypatch.setattr(report, "REMOTE_FLUSH_SECONDS", 0.0)
    build.skip("train", report.Skipped("c.mp4", "too_short"))  # ...for REMOTE_FLUSH_SECONDS
    assert [json.loads(r)["file"] for r in written.read_text().splitlines()] == ["a.mp4", "b.mp4", "c.mp4"]
    monkeypatch.setattr(report, "REMOTE_FLUSH_SECONDS", 3600.0)

    def crashing():
        yield [report.Skipped("d.mp4", "too_short")]
        raise RuntimeError("a bug mid-split")

    with pytest.raises(RuntimeError, match="a bug mid-split"):
        list(build.generate("train", crashing()))
    rows = written.read_text().splitlines()  # the crash kept the row held back
    assert [json.loads(r)["file"] for r in rows] == ["a.mp4", "b.mp4", "c.mp4", "d.mp4"]
    assert build.summary().endswith("report: gs://bucket/tfds/local_media/tiny/skipped.jsonl")


def test_a_sentencepiece_vocabulary_in_the_bucket(fake_bucket, monkeypatch):
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["what colour is the square", "which tone is higher",
                                                           "is the circle red or blue"] * 20),
                                   model_writer=model, vocab_size=40, hard_vocab_limit=False,
                                   pad_id=0, eos_id=1, unk_id=2, bos_id=-1)
    (fake_bucket / "bucket").mkdir()
    (fake_bucket / "bucket" / "spm.model").write_bytes(model.getvalue())
    gfile = vocabularies.tf.io.gfile  # what seqio reads the model with: there, the bucket is this folder
    monkeypatch.setattr(gfile, "GFile", functools.partial(
        lambda open_file, path, *args: open_file(path.replace("gs://", f"{fake_bucket}/"), *args), gfile.GFile))
    cfg = tiny.get_config()
    cfg.data.vocab_path = "gs://bucket/spm.model"
    words = vocab.get_vocabulary(cfg).encode("is the square red")
    assert 0 < len(words) < len("is the square red")
    cfg.data.vocab_path = "gs://bucket/none.model"
    with pytest.raises(FileNotFoundError, match=r"vocab_path: no SentencePiece model at 'gs://bucket/none\.model'"):
        vocab.get_vocabulary(cfg)


def test_evaluate_cli_starts_distributed_like_main():
    """`--distributed` and its companions are evaluate's flags too, checked before anything loads."""
    done = subprocess.run([sys.executable, "-m", "mirasol3b.evaluate", "--config=configs/tiny.py",
                           f"--workdir={WORKDIR}", "--distributed=off", "--num_processes=2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
                          env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT))
    assert done.returncode != 0
    assert "--distributed=off with --num_processes" in done.stderr
    # Both command lines' modules in one process: none defines a flag at import (cli.run does).
    both = subprocess.run([sys.executable, "-c", ("import mirasol3b.main, mirasol3b.evaluate, mirasol3b.answer; "
                                                  "from absl import flags; from mirasol3b import cli; "
                                                  "assert 'distributed' not in flags.FLAGS, 'defined at import'; "
                                                  "cli.define(mirasol3b.evaluate.SHARED_FLAGS, "
                                                  "mirasol3b.evaluate.define_flags, flags.FLAGS); "
                                                  "print(flags.FLAGS['distributed'].default)")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
                          env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT))
    assert both.returncode == 0 and both.stdout.strip() == "auto", both.stderr


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


@pytest.mark.skipif(_installed("google.cloud.storage"), reason="google-cloud-storage is installed")
def test_a_gs_workdir_without_google_cloud_storage_says_what_to_install():
    with pytest.raises(ImportError, match="gs://bucket/runs/x/checkpoints need google-cloud-storage"):
        Checkpointer(WORKDIR, save_every=1, keep=1)
