"""Building on Apache Beam (`data/builders/splits.py`): DirectRunner with worker processes gives the
same examples and the same report as a build without Beam; a killed worker fails the build with a
clear message and leaves no dataset.

The clips are the tiny real mp4s of `test_local_media` (1.5 s, 64x48).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import tensorflow_datasets as tfds

from mirasol3b_data.builders.local_media import local_media
from mirasol3b_data.builders.report import EmptySplitError, skipped_report_path
from test_local_media import BAD_FILES, MIXED, _check_mixed_build, _clips, _manual_dir, _report, media  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
TWO_PROCESSES = "direct_running_mode=multi_processing,direct_num_workers=2"


def _beam_config(manual: Path, options: str = TWO_PROCESSES) -> tfds.download.DownloadConfig:
    import apache_beam as beam

    flags = [f"--{option}" for option in options.split(",")]
    return tfds.download.DownloadConfig(manual_dir=str(manual), beam_options=beam.options.pipeline_options
                                        .PipelineOptions(flags))


def test_tfds_build_on_two_worker_processes_gives_the_local_build_and_its_report(media, tmp_path, capsys):  # noqa: F811
    """The command the docs give (`tfds build ... --beam_pipeline_options=...`): its workers import the
    builder file's code, which `tfds` loaded under another module name."""
    manual = _manual_dir(tmp_path, media, MIXED)
    local = local_media.Builder(config="tiny", data_dir=str(tmp_path / "local"))
    local.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
    done = subprocess.run(_tfds_build(manual, tmp_path / "beam"), cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    beam = local_media.Builder(config="tiny", data_dir=str(tmp_path / "beam"))
    _check_mixed_build(beam, done.stdout)  # every skipped text reported, the same summary
    assert sorted(map(json.dumps, _report(beam))) == sorted(map(json.dumps, _report(local)))
    assert not (skipped_report_path(beam).parent / "skipped.parts").exists()
    for split in ("train", "test"):
        ours, theirs = _clips(local, split), _clips(beam, split)
        assert [c["source"] for c in ours] == [c["source"] for c in theirs]  # the same order too
        for a, b in zip(ours, theirs):
            assert a.keys() == b.keys()
            for key in a:
                if key in ("texts", "evidence"):
                    assert {f: list(v) for f, v in a[key].items()} == {f: list(v) for f, v in b[key].items()}
                else:
                    np.testing.assert_array_equal(a[key], b[key])


def _tfds_build(manual: Path, out: Path) -> list[str]:
    return [str(Path(sys.executable).parent / "tfds"), "build", "data/builders/local_media", "--config=tiny",
            f"--manual_dir={manual}", f"--data_dir={out}", f"--beam_pipeline_options={TWO_PROCESSES}"]


def _workers(build: subprocess.Popen) -> list[psutil.Process]:
    """The Python SDK worker processes of a running build (Beam starts each under `sh -c`)."""
    try:
        children = psutil.Process(build.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    out = []
    for p in children:
        try:
            if "sdk_worker_main" in " ".join(p.cmdline()) and p.name().startswith("python"):
                out.append(p)
        except psutil.Error:
            pass
    return out


def test_a_killed_worker_fails_the_build_with_a_clear_message_and_no_dataset(media, tmp_path):  # noqa: F811
    """Killed as soon as it exists, before it connected to the runner: the case DirectRunner alone
    waits on forever. The watch stops the build within seconds."""
    manual = _manual_dir(tmp_path, media, MIXED)
    out = tmp_path / "out"
    build = subprocess.Popen(_tfds_build(manual, out), cwd=REPO, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not _workers(build) and build.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        victims = _workers(build)
        assert victims, "no Beam worker process appeared"
        victims[0].send_signal(signal.SIGKILL)
        stdout, stderr = build.communicate(timeout=120)
    finally:
        if build.poll() is None:
            build.kill()
    assert build.returncode != 0
    assert "BeamBuildError" in stderr and "no dataset was written" in stderr, stderr[-3000:]
    assert "Beam worker process" in stderr and "SIGKILL" in stderr, stderr[-3000:]
    assert not local_media.Builder(config="tiny", data_dir=str(out)).is_prepared()
    with pytest.raises(Exception):
        tfds.load("local_media/tiny", data_dir=str(out), download=False)
    config_dir = out / "local_media" / "tiny"
    assert not [p for p in config_dir.iterdir() if p.name != "skipped.jsonl"], list(config_dir.iterdir())


def test_a_beam_build_whose_every_example_is_skipped_names_the_split_and_the_report(media, tmp_path):  # noqa: F811
    manual = _manual_dir(tmp_path, media, [{"video": path, "label": "x"} for path in BAD_FILES], "all_bad")
    builder = local_media.Builder(config="tiny", data_dir=str(tmp_path / "out"))
    with pytest.raises(EmptySplitError, match=r"split 'train' was skipped.*skipped\.jsonl"):
        builder.download_and_prepare(download_config=_beam_config(manual, "direct_running_mode=in_memory"))
    assert {r["file"]: r["reason"] for r in _report(builder)} == BAD_FILES
    assert not builder.is_prepared()
