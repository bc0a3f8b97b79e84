"""The main job on the embedded default data (`make demo`):

    python -m mirasol3b.demo --workdir=runs/demo [--config=configs/tiny.py] [--config.key=value ...]

1. builds `synthetic_avqa/tiny` into `<workdir>/tfds` unless it is there (real encoded clips,
   decoded by the same path as user files);
2. trains `configs/tiny.py` on it (`mirasol3b.main`'s loop: resumes, or says it is done);
3. evaluates the latest checkpoint on the validation split (one JSON line, also written to the
   workdir);
4. writes one generated test clip to `<workdir>/example_clip.mp4`, answers its question with the
   evidence span, and draws them on `<workdir>/example_report.html` (and `.png`).
"""

from __future__ import annotations

import json
import os

import jax
from absl import app

from mirasol3b import cli, configlib, paths, sharding


SHARED_FLAGS = cli.Shared(config=cli.OPTIONAL, config_default="configs/tiny.py", config_help="Config file.",
                          workdir=cli.OPTIONAL, workdir_default="runs/demo", workdir_help="Where everything is written.")


def build_dataset(config):
    """Builds the synthetic_avqa config that `config.data.task` (synthetic_avqa_NAME) reads, unless it
    is built; returns that builder config (its seed and source drew the clips)."""
    import tensorflow_datasets as tfds

    from mirasol3b_data import tasks
    from mirasol3b_data.builders.synthetic_avqa import synthetic_avqa

    names = {f"synthetic_avqa_{name}": name for name in tasks.SYNTHETIC_AVQA_CONFIGS}
    if config.data.task not in names:
        raise app.UsageError(f"the demo trains on synthetic_avqa: config.data.task must be one of {sorted(names)}, "
                             f"got {config.data.task!r} (train on other tasks with mirasol3b.main)")
    name = names[config.data.task]
    builder = synthetic_avqa.Builder(config=name, data_dir=config.data.tfds_data_dir)
    if builder.is_prepared():
        print(f"dataset: {builder.data_dir} (already built)", flush=True)
    else:
        print(f"dataset: building synthetic_avqa/{name} into {config.data.tfds_data_dir}", flush=True)
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig())
    return builder.builder_config


def answer_example_clip(config, workdir: str, built) -> dict:
    """Writes test clip 0 of the synthetic data (`built`: its builder config), answers its question
    with the trained model and writes the answer's report page.

    One clip is one row: like `mirasol3b.answer`, the params are restored onto one device.
    """
    from mirasol3b_data import synthetic
    from mirasol3b_data.encode import write_clip
    from mirasol3b_data.spec import MediaSpec
    from mirasol3b import evaluate
    from mirasol3b.answer import answer_with_evidence, describe_evidence, prepare
    from mirasol3b.train import restore

    spec = MediaSpec.from_config(config)
    # The builder's seed drew the split, whatever config.seed trains with.
    qa, frames, audio = synthetic.generate_example(built.seed, "test", 0, spec.max_snippets, built.source)
    path = os.path.join(workdir, "example_clip.mp4")
    write_clip(path, frames, built.source.fps, audio, built.source.sample_rate)
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    _, params = restore.restore_params(config, workdir, mesh)
    batch = prepare(config, path, qa.question)
    result = answer_with_evidence(config, params, batch, mesh=mesh)
    truth = [(a * spec.snippet_seconds, b * spec.snippet_seconds) for a, b in synthetic.evidence(qa)]
    out = {"clip": path, "question": qa.question, "reference": qa.answer, "prediction": result["answer"],
           "truth": truth}
    if "evidence" in result:
        out["evidence"] = describe_evidence(result)
        out["report"], _ = evaluate.write_report_page(
            config, batch["video"][0], batch["audio"][0], batch["media_mask"][0], qa.question, result,
            os.path.join(workdir, "example_report.html"), reference=qa.answer, truth=truth)
    return out


def main(args: cli.Args) -> None:
    from mirasol3b import evaluate
    from mirasol3b.train import loop, restore
    from mirasol3b.train.logs import write_metrics

    config, workdir = args.config, args.workdir
    if paths.is_remote(workdir):
        raise app.UsageError(f"--workdir={workdir}: the demo runs on this machine (it builds its dataset in the "
                             "workdir and writes a clip there with ffmpeg); give a local folder. Runs in a bucket: "
                             "mirasol3b.main")
    if not config.data.tfds_data_dir:
        with config.unlocked():
            config.data.tfds_data_dir = os.path.abspath(os.path.join(workdir, "tfds"))
    configlib.validate(config)
    configlib.validate_eval(config)
    built = build_dataset(config)
    cli.quiet_logging()  # after the build: TFDS turns INFO logging on
    evaluations = []  # the loop evaluates its last step: that is the demo's result, not computed twice

    def evaluate_fn(config, params, mesh):
        evaluations.append(evaluate.evaluate(config, params, mesh))
        return evaluations[-1]

    loop.train(config, workdir, evaluate_fn=evaluate_fn)
    if evaluations:  # the loop wrote its eval_<split>_step<N>.json
        metrics = {"step": config.train.num_steps, **evaluations[-1]}
    else:  # trained by an earlier run
        mesh = sharding.make_mesh(config.mesh_shape)
        step, params = restore.restore_params(config, workdir, mesh)
        metrics = {"step": step, **evaluate.evaluate(config, params, mesh)}
        if jax.process_index() == 0:
            write_metrics(workdir, metrics)
    print(json.dumps(metrics), flush=True)
    example = answer_example_clip(config, workdir, built)
    print(f"clip: {example['clip']}\nquestion: {example['question']}\n"
          f"answer: {example['prediction']}   (reference: {example['reference']})", flush=True)
    if "evidence" in example:
        from mirasol3b.report import span_text

        truth = ", ".join(span_text(span) for span in example["truth"])
        print(f"{example['evidence']}   (where it is: {truth})\nreport: {example['report']}", flush=True)


if __name__ == "__main__":
    cli.run(main, shared=SHARED_FLAGS)
