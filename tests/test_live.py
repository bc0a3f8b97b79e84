"""Live sources (`mirasol3b_data.live`): snippet k of a file read live is snippet k of `decode_clip`
(frames and audio sample for sample), over a pipe too; a stall, a corrupt stretch and the end are
reported with the stream time reached; `mirasol3b.stream` prints timed answers."""

import io
import os
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import av
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from mirasol3b_data import live
from mirasol3b_data.media import decode_clip
from mirasol3b_data.spec import MediaSpec

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT.parent / "shared" / "samples"
SPEC = MediaSpec(fps=8, num_frames=2 * 64, snippet_frames=2, image_size=32, missing_audio="silence")


def _sample(name: str) -> Path:
    if not SAMPLES.is_dir():
        pytest.skip(f"real media samples not found at {SAMPLES} (shared/ must sit beside the repository)")
    return SAMPLES / name


def read_all(source, **kwargs):
    got = []
    with pytest.raises(live.LiveStopped) as stopped:
        for snippet in live.snippets(str(source), SPEC, **kwargs):
            got.append(snippet)
    return got, stopped.value


def mpegts(path) -> bytes:
    """The file's audio and video packets as MPEG-TS (what `ffmpeg ... -f mpegts -` writes), as they are."""
    out_bytes = io.BytesIO()
    with av.open(str(path)) as src, av.open(out_bytes, "w", format="mpegts") as out:
        streams = [s for s in src.streams if s.type in ("video", "audio")]
        copies = {s.index: out.add_stream_from_template(s) for s in streams}
        for packet in src.demux(*streams):
            if packet.dts is not None:
                packet.stream = copies[packet.stream.index]
                out.mux(packet)
    return out_bytes.getvalue()


def assert_same_as_decode_clip(got, path):
    clip = decode_clip(str(path), SPEC)
    assert len(got) == clip.num_snippets
    np.testing.assert_array_equal(np.concatenate([s.video for s in got]), clip.video)
    np.testing.assert_array_equal(np.concatenate([s.audio for s in got]), clip.audio)
    assert [s.index for s in got] == list(range(len(got)))
    assert got[-1].end == pytest.approx(len(got) * 0.25)


@pytest.mark.parametrize("name", ["chaplin.mp4", "no_duration.webm"])  # AAC at 44.1 kHz; Opus at 48 kHz
def test_a_file_read_live_is_its_decoded_clip(name):
    got, stopped = read_all(_sample(name))
    assert stopped.reason == "ended" and stopped.reached == pytest.approx(len(got) * 0.25)
    assert_same_as_decode_clip(got, _sample(name))
    assert all(s.audio_coverage > 0.9 for s in got[1:-1])


def test_a_pipe_is_read_as_the_file(tmp_path, monkeypatch):
    ts = tmp_path / "chaplin.ts"
    ts.write_bytes(mpegts(_sample("chaplin.mp4")))
    with open(ts, "rb") as stdin:
        monkeypatch.setattr(sys, "stdin", types.SimpleNamespace(buffer=stdin))
        got, stopped = read_all("-")
    assert stopped.reason == "ended" and len(got) >= 37
    assert_same_as_decode_clip(got, ts)


def test_a_stalled_pipe_is_reported_with_the_time_reached(tmp_path, monkeypatch):
    data = mpegts(_sample("chaplin.mp4"))
    read_end, write_end = os.pipe()
    writer = threading.Thread(target=os.write, args=(write_end, data[:len(data) * 3 // 4]), daemon=True)
    writer.start()  # three quarters of the stream, then the pipe stays open and silent
    with os.fdopen(read_end, "rb") as stdin:
        monkeypatch.setattr(sys, "stdin", types.SimpleNamespace(buffer=stdin))
        begin = time.monotonic()
        got, stopped = read_all("-", stall_seconds=1.0)
        assert time.monotonic() - begin < 30
        os.close(write_end)  # first: the reader thread, blocked reading stdin, holds its lock until then
    assert stopped.reason == "stalled" and "no new snippet for 1 s" in str(stopped)
    assert 8 < len(got) < 38 and stopped.reached == pytest.approx(len(got) * 0.25)


def test_corruption_midway_keeps_what_came_before(tmp_path):
    data = mpegts(_sample("chaplin.mp4"))
    middle = len(data) // 2
    broken = tmp_path / "zeros.ts"
    broken.write_bytes(data[:middle] + bytes(300_000) + data[middle + 300_000:])
    got, stopped = read_all(broken)
    assert stopped.reason in ("corrupt", "ended") and stopped.reached == pytest.approx(len(got) * 0.25)
    assert 8 < len(got) < 38, (len(got), stopped)
    whole, _ = read_all(_sample("chaplin.mp4"))
    for a, b in zip(got[:8], whole[:8]):  # what came before the damage is the file's
        np.testing.assert_array_equal(a.video, b.video)


def test_unreadable_sources_and_realtime(tmp_path):
    _, stopped = read_all(tmp_path / "missing.mp4")
    assert stopped.reason == "unreadable" and stopped.reached == 0.0
    (tmp_path / "text.mp4").write_text("not a video at all\n" * 50)
    _, stopped = read_all(tmp_path / "text.mp4")
    assert stopped.reason == "unreadable"
    begin = time.monotonic()
    got, _ = read_all(_sample("example.mp4"), realtime=True)  # 2 s of stream
    assert time.monotonic() - begin >= got[-1].end - got[0].end


def test_stream_cli_prints_timed_answers_and_reports_a_stall(tmp_path):
    """Random params saved as a training run would; the CLI answers as a file streams, answers a
    question typed on stdin, and reports a stalled pipe with the time reached (status 1)."""
    from mirasol3b.model import Mirasol3B
    from mirasol3b.train.checkpointer import Checkpointer
    from mirasol3b.train.optimizer import make_optimizer
    from mirasol3b.train.state import TrainState, abstract_state, example_batch
    from tests.test_streaming import make_config

    cfg = make_config("ttm", 2, "recent", True)
    with cfg.unlocked():
        cfg.eval.max_new_tokens = 4
    model, optimizer = Mirasol3B(cfg.model), make_optimizer(cfg.train)
    boxed, _ = abstract_state(model, optimizer, example_batch(cfg, 1))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape) * 0.05, a.dtype), nn.unbox(boxed.params))
    with Checkpointer(str(tmp_path), save_every=1, keep=1, async_save=False) as ckpt:
        ckpt.maybe_save(1, TrainState(step=jnp.int32(1), params=params, opt_state=optimizer.init(params)), {}, cfg,
                        force=True)
    ts = tmp_path / "chaplin.ts"
    ts.write_bytes(mpegts(_sample("chaplin.mp4")))
    command = [sys.executable, "-m", "mirasol3b.stream", f"--workdir={tmp_path}", "--question=what plays?"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    whole = subprocess.Popen(command + [f"--source={_sample('example.mp4')}", "--every=0.5"], cwd=ROOT, env=env,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stalled = subprocess.Popen(command + ["--source=-", "--every=2", "--stall_seconds=2"], cwd=ROOT, env=env,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stalled.stdin.write(ts.read_bytes()[:ts.stat().st_size // 2])
    stalled.stdin.flush()  # and the pipe stays open
    out, err = whole.communicate("which colour?\n", timeout=300)
    assert whole.returncode == 0, err[-3000:]
    lines = out.splitlines()
    asked = [line for line in lines if "what plays? ->" in line]
    assert [line.split("]")[0] for line in asked] == [f"[{t:8.2f} s" for t in (0.5, 1.0, 1.5, 2.0)], out
    assert any("which colour? ->" in line for line in lines), out
    assert all("   (evidence: " in line and " s (" in line for line in asked), out  # a span with its score
    assert "the stream ended at 2.00 s" in err
    stalled.wait(timeout=300)  # not communicate(): it would close stdin, and the stream would end instead
    out, err = stalled.stdout.read().decode(), stalled.stderr.read().decode()
    stalled.stdin.close()
    assert stalled.returncode == 1 and "Traceback" not in err, err[-3000:]
    assert "error: the stream stalled at" in err and "the answers above stand" in err, err[-3000:]
    reached = float(err.split("stalled at ")[1].split(" s")[0])
    assert 2.0 <= reached < 9.5 and f"[{reached:8.2f} s] what plays? ->" in out, (out, err)
