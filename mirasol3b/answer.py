"""Answers a question about one video file with a trained model.

    python -m mirasol3b.answer --workdir=DIR --video=clip.mp4 --question="what plays first?" [--config=...]
        [--report=OUT.html]

The config is the one stored with `DIR`'s latest checkpoint unless `--config` is given (which may
differ from it only in how the model computes: `restore.check_config_matches_checkpoint`). The file
goes through the training pipeline: `mirasol3b_data.media.decode_clip` at the config's geometry (at most
`config.data.num_frames` frames from the start), then the feature converter (padding, media_mask,
BOS + question tokens), then `config.eval`'s decoding. It prints the answer, then its evidence (the
strongest time spans, `mirasol3b/evidence.py`) unless `config.eval.evidence` is "off"; `--report`
also writes a page of the clip, its spectrogram and the evidence over time (`mirasol3b/report.py`),
with a PNG of the timeline beside it. A file that cannot be read exits with status 1 and the file,
reason and detail on stderr.
"""

from __future__ import annotations

import sys

import jax
import ml_collections
import numpy as np
from absl import flags

from mirasol3b import cli, configlib, decoding, errors, evaluate, sharding
from mirasol3b.train import restore


def prepare(config: ml_collections.ConfigDict, video_path: str, question: str, *,
            missing_audio: str = "skip") -> dict[str, np.ndarray]:
    """The model batch (one row) of `video_path` and `question`. Raises `mirasol3b_data.media.MediaError`.
    A model that does not read audio (`model.use_audio=False`) takes a file without an audio track."""
    from mirasol3b_data import media, spec

    if not config.model.use_audio:
        missing_audio = "silence"  # never read: the file needs no audio track
    clip = media.decode_clip(video_path, spec.MediaSpec.from_config(config, missing_audio=missing_audio))
    # Only now TensorFlow and SeqIO: a file that cannot be read fails in a second.
    import tensorflow as tf

    from mirasol3b_data import feature_converter as fc
    from mirasol3b_data import vocab

    example = {"prompt": np.asarray(vocab.get_vocabulary(config).encode(question), np.int32),
               "answer": np.zeros([0], np.int32), "video": clip.video, "audio": clip.audio,
               "num_snippets": np.int32(clip.num_snippets)}
    # The converter itself, so the prompt format and padding are exactly training's.
    converted = fc.Mirasol3BFeatureConverter()(tf.data.Dataset.from_tensors(example), fc.task_feature_lengths(config))
    return {k: v[None] for k, v in next(converted.as_numpy_iterator()).items()}


def answer(config: ml_collections.ConfigDict, params, video_path: str, question: str, *,
           mesh: jax.sharding.Mesh | None = None, missing_audio: str = "skip",
           decode: decoding.DecodeConfig | None = None) -> str:
    """The model's answer (decoded text) to `question` about the clip at `video_path`.

    `params` on one device, or on a one-device `mesh`; decoding defaults to `config.eval`'s.
    """
    return answer_batch(config, params, prepare(config, video_path, question, missing_audio=missing_audio),
                        mesh=mesh, decode=decode)


def answer_batch(config: ml_collections.ConfigDict, params, batch: dict[str, np.ndarray], *,
                 mesh: jax.sharding.Mesh | None = None, decode: decoding.DecodeConfig | None = None) -> str:
    """The answer for a `prepare`d batch."""
    return answer_with_evidence(config, params, batch, mesh=mesh, decode=decode, with_evidence=False)["answer"]


def answer_with_evidence(config: ml_collections.ConfigDict, params, batch: dict[str, np.ndarray], *,
                         mesh: jax.sharding.Mesh | None = None, decode: decoding.DecodeConfig | None = None,
                         with_evidence: bool = True) -> dict:
    """{"answer": text} for a `prepare`d batch, with `evaluate.evidence_record`'s `snippet_scores`,
    `evidence` (spans) and `memory_share` unless `with_evidence` is False or `config.eval.evidence`
    is "off"."""
    from mirasol3b_data import vocab

    configlib.validate_eval(config)
    tokens = evaluate.generate_tokens(config, params, batch, mesh, decode=decode)
    out = {"answer": vocab.get_vocabulary(config).decode(tokens[0].tolist())}
    if with_evidence and config.eval.evidence != "off":
        found = evaluate.evidence_scores(config, params, batch, tokens, mesh)
        out.update(evaluate.evidence_record(found["scores"][0], found["memory_share"][0], batch["media_mask"][0],
                                            evaluate.snippet_seconds(config)))
    return out


def describe_evidence(result: dict) -> str:
    """"evidence: 0.50–1.25 s (0.81), 1.75–2.00 s (0.12)", the strongest span first."""
    from mirasol3b.report import span_text

    spans = ", ".join(f"{span_text((a, b))} ({score:.2f})" for a, b, score in result["evidence"]) or "none"
    memory = f"; {result['memory_share']:.0%} through the TTM memory" if result["memory_share"] else ""
    return f"evidence: {spans}{memory}"


SHARED_FLAGS = cli.Shared(config=cli.OPTIONAL, config_help="Config file (default: the one the workdir's "
                          "checkpoint stores).", workdir=cli.REQUIRED,
                          workdir_help="The training run's workdir (its checkpoints).")


def define_flags(fv: flags.FlagValues) -> dict:
    holders = {
        "video": flags.DEFINE_string("video", None, "The media file to answer about.", flag_values=fv),
        "question": flags.DEFINE_string("question", None, "The question.", flag_values=fv),
        "missing_audio": flags.DEFINE_enum("missing_audio", "skip", ["skip", "silence"], "A file without (usable) "
                                           "audio: 'skip' is an error, 'silence' fills zeros.", flag_values=fv),
        "config_check": evaluate.define_config_check_flag(fv),
        "report": flags.DEFINE_string("report", None, "Also write this HTML page (and a PNG beside it): the clip's "
                                      "frames, its log-mel spectrogram and the answer's evidence over time.",
                                      flag_values=fv),
    }
    flags.mark_flags_as_required(["video", "question"], flag_values=fv)
    return holders


def main(args: cli.Args) -> None:
    from mirasol3b_data.media import MediaError

    cli.quiet_logging()
    config = restore.eval_config(args.config, args.workdir, check=False)  # --config: nothing read yet
    try:  # the file first: a bad one fails in a second, before the checkpoint is read
        batch = prepare(config, args.video, args.question, missing_audio=args.missing_audio)
    except MediaError as e:
        hint = " (--missing_audio=silence answers with silent audio)" if e.reason == "no_audio_track" else ""
        raise errors.Error(f"cannot read video {e.path}: {e.reason}: {e.detail}{hint}") from e
    if args.config is not None and args.config_check:
        restore.check_config_matches_checkpoint(config, args.workdir)
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    _, params = restore.restore_params(config, args.workdir, mesh)
    if args.report and config.eval.evidence == "off":
        raise errors.ConfigError("--report draws the answer's evidence: it needs config.eval.evidence 'context' or "
                                 "'latents', not 'off'")
    result = answer_with_evidence(config, params, batch, mesh=mesh)
    text = result["answer"]
    print(text, flush=True)
    if not text.strip():  # a blank line alone reads like a failure to print
        print("(the answer is empty: the model ended its text at once)", file=sys.stderr, flush=True)
    if "evidence" in result:
        print(describe_evidence(result), flush=True)
    if args.report:
        page, png = evaluate.write_report_page(config, batch["video"][0], batch["audio"][0], batch["media_mask"][0],
                                               args.question, result, args.report)
        print(f"report: {page} (timeline: {png})", flush=True)


if __name__ == "__main__":
    cli.run(main, define_flags, SHARED_FLAGS)
