"""`python -m mirasol3b.demo` end to end on the smoke-sized synthetic_avqa: build, train, evaluate,
answer; a second run trains nothing and reports the same evaluation from the checkpoint."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from absl import app

from configs import tiny
from mirasol3b_data import synthetic
from mirasol3b import cli, configlib, demo

REPO = Path(__file__).resolve().parents[1]
FLAGS = ["--config=configs/tiny.py", "--config.data.task=synthetic_avqa_tiny_smoke", "--config.data.batch_size=8",
         "--config.train.num_steps=2", "--config.train.warmup_steps=1", "--config.checkpoint.every_steps=2",
         "--config.eval.every_steps=0", "--config.model.text_decoder.depth=1",
         "--config.seed=1",  # the training seed; the dataset's is its builder's (0)
         # Narrower stacks: the test is about the demo's flow, and compiling is most of its time.
         *(f"--config.model.{stack}.{field}={value}"
           for stack in configlib.STACKS for field, value in (("width", 32), ("mlp_dim", 64))),
         "--config.model.ttm.token_learner_hidden=32"]


def _demo(workdir: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mirasol3b.demo", *FLAGS, *extra, f"--workdir={workdir}"],
                          cwd=REPO, env=dict(os.environ), capture_output=True, text=True, timeout=400)


def _result(stdout: str) -> dict:
    return json.loads(next(line for line in stdout.splitlines() if line.startswith('{"step"')))


def test_demo_builds_trains_evaluates_answers_and_a_second_run_reuses_it(tmp_path):
    workdir = tmp_path / "demo"
    first = _demo(workdir)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "dataset: building synthetic_avqa/tiny_smoke" in first.stdout
    result = _result(first.stdout)
    assert result["step"] == 2 and result["split"] == "validation" and result["num_examples"] == 10
    saved = json.loads((workdir / "eval_validation_step2.json").read_text())
    assert saved == result
    assert (workdir / "example_clip.mp4").stat().st_size > 0
    lines = first.stdout.splitlines()
    question = next(line for line in lines if line.startswith("question: "))
    qa, _, _ = synthetic.generate_example(0, "test", 0, 4)  # test clip 0 of the built split (4 snippets)
    assert question == f"question: {qa.question}"
    assert any(line.startswith("answer: ") and f"(reference: {qa.answer})" in line for line in lines), lines
    # The answer's evidence span, where the answer really is, and the report page.
    evidence = next(line for line in lines if line.startswith("evidence: "))
    where = ", ".join(f"{a * 0.25:.2f}–{b * 0.25:.2f} s" for a, b in synthetic.evidence(qa))
    assert f"(where it is: {where})" in evidence and " s (" in evidence, evidence
    assert f"report: {workdir / 'example_report.html'}" in lines
    assert (workdir / "example_report.png").stat().st_size > 0
    assert "grounding/mIoU" in result and "grounding_random/mIoU" in result

    second = _demo(workdir)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "(already built)" in second.stdout
    assert _result(second.stdout) == result  # restored from the step-2 checkpoint, nothing retrained


def test_demo_refuses_a_workdir_in_a_bucket():
    args = cli.Args(config=tiny.get_config(), workdir="gs://bucket/demo")
    with pytest.raises(app.UsageError, match="--workdir=gs://bucket/demo: the demo runs on this machine"):
        demo.main(args)


def test_demo_refuses_a_task_it_cannot_build(tmp_path):
    # In this process: the refusal comes before anything is built, and a third demo process would
    # cost the suite ~25 s of imports.
    config = tiny.get_config()
    with config.unlocked():
        config.data.update(task="qa_tiny", tfds_data_dir=str(tmp_path / "tfds"))
    with pytest.raises(app.UsageError, match=re.escape(
            "config.data.task must be one of ['synthetic_avqa_long', 'synthetic_avqa_tiny', "
            "'synthetic_avqa_tiny_smoke']")):
        demo.build_dataset(config)
    assert not (tmp_path / "tfds").exists()
