"""Generation-based evaluation: exact-match accuracy of generated answers on a split.

    python -m mirasol3b.evaluate --workdir=DIR [--split=validation] [--config=configs/tiny.py ...]
        [--streaming] [--report_dir=DIR]

restores the params of `DIR`'s latest good checkpoint (with the config it stores, or the one given,
which may differ from it only in how the model computes: `restore.check_config_matches_checkpoint`),
prints the metrics as one JSON line and
writes them to `DIR/eval_<split>_step<N>.json`. `DIR` may be local or a URI (`gs://bucket/runs/x`):
files go through `etils.epath.Path` and Orbax. Several processes (a TPU pod slice) start
`jax.distributed` first, as `mirasol3b.main` does (`--distributed`, see `mirasol3b/distributed.py`).
`evaluate(config, params, mesh)` is the same from Python (the training loop calls it as its
`evaluate_fn`).

Metrics (answers compared after `normalize_answer`, over real rows only, never padding):
  exact_match, num_examples
  accuracy/<question_type>, num_examples/<question_type>   rows whose question_type is not ""
  classification_accuracy, num_classification             rows of kind "classification"
  majority_baseline, majority_answer                      always answering the split's commonest answer
  samples                                                 a few {question, reference, prediction, evidence}
  grounding/<metric>, grounding_random/<metric>           where the split has evidence spans and
                                                          config.eval.evidence is not "off": NExT-GQA's
                                                          mIoP, IoP@0.3/0.5, mIoU, IoU@0.3/0.5, Acc@GQA, and
                                                          a random span of the same length
                                                          (mirasol3b/grounding.py); grounding/num_examples
Accuracies of an empty group are None (null in JSON). Each answer's evidence (mirasol3b/evidence.py):
a score per snippet and the top spans in seconds.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import string
import sys

import jax
import ml_collections
import numpy as np
from absl import flags
from flax import linen as nn

from mirasol3b import cli, configlib, decoding, distributed, errors, evidence, grounding, sharding, streaming
from mirasol3b.model import Mirasol3B, samples_per_snippet
from mirasol3b.train import restore
from mirasol3b.train.batches import global_batch, model_batch
from mirasol3b.train.logs import write_metrics
from mirasol3b.train.state import check_batch_shapes

# What the generate function reads from a batch (video/audio only when the model uses them: `model_batch`).
GENERATE_KEYS = ("video", "audio", "media_mask", "prompts", "prompt_lengths")
NUM_SAMPLES = 5

_PUNCTUATION = str.maketrans("", "", string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
    """SQuAD/VQA normalisation: lowercase, no punctuation, no articles (a/an/the), single spaces."""
    s = s.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", s).split())


def is_right(prediction: str, reference: str) -> bool:
    """Exact match after `normalize_answer`: the verdict every metric and report page uses."""
    return normalize_answer(prediction) == normalize_answer(reference)


# ---- generation -------------------------------------------------------------------------------

def decode_config(config: ml_collections.ConfigDict) -> decoding.DecodeConfig:
    """The `DecodeConfig` of `config.eval`."""
    # `data` loads TensorFlow and SeqIO: imported where used, so importing this module stays light.
    from mirasol3b_data.vocab import EOS_ID, PAD_ID

    e = config.eval
    return decoding.DecodeConfig(max_new_tokens=e.max_new_tokens, method=e.decode_method, beam_size=e.beam_size,
                                 length_penalty=e.length_penalty, temperature=e.temperature, top_k=e.top_k,
                                 top_p=e.top_p, eos_id=EOS_ID, pad_id=PAD_ID)


_GENERATE_FNS: dict = {}


def generate_fn(config: ml_collections.ConfigDict, decode: decoding.DecodeConfig):
    """`decoding.make_generate_fn` for `config.model`, kept per (model config, decode config) so
    evaluations during training and repeated answers compile once."""
    key = (config.model.to_json(), decode)
    if key not in _GENERATE_FNS:
        _GENERATE_FNS[key] = decoding.make_generate_fn(Mirasol3B(config.model), decode)
    return _GENERATE_FNS[key]


def _row_range(shard, rows: int) -> tuple[int, int]:
    start, stop, _ = shard.index[0].indices(rows)
    return start, stop


def local_rows(x, like) -> np.ndarray:
    """This process's rows of the global result `x`: the rows of `like` (the global input it
    came from) this process fed in, in order, however XLA sharded `x` (by rows or replicated)."""
    if getattr(like, "is_fully_addressable", True):
        return np.asarray(x)
    rows = like.shape[0]
    held = [(_row_range(s, rows), s.data) for s in x.addressable_shards]
    out = []
    for start, stop in sorted({_row_range(s, rows) for s in like.addressable_shards}):
        found = next(((first, data) for (first, last), data in held if first <= start and stop <= last), None)
        if found is None:
            raise ValueError(f"rows {start}:{stop} of the result live on no device of process {jax.process_index()}")
        first, data = found
        out.append(np.asarray(data)[start - first:stop - first])
    return np.concatenate(out)


def generate_tokens(config: ml_collections.ConfigDict, params, batch: dict, mesh: jax.sharding.Mesh | None = None,
                    *, decode: decoding.DecodeConfig | None = None, rng: jax.Array | None = None) -> np.ndarray:
    """Generated token ids `[b, max_new_tokens]` for this process's rows of a host batch.

    Only the `GENERATE_KEYS` the model uses go to the devices: as global arrays under `mesh` when given (params may
    be sharded over it), else as they are.
    """
    generate = generate_fn(config, decode or decode_config(config))
    inputs = model_batch(batch, config, GENERATE_KEYS)
    rng = jax.random.key(config.seed) if rng is None else rng
    in_mesh = jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()
    with in_mesh, nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        if mesh is not None:
            inputs = global_batch(inputs, mesh)
        return local_rows(generate(params, inputs, rng)["tokens"], inputs["prompts"])


_EVIDENCE_FNS: dict = {}


def snippet_seconds(config: ml_collections.ConfigDict) -> float:
    from mirasol3b_data.spec import MediaSpec

    return MediaSpec.from_config(config).snippet_seconds


def evidence_scores(config: ml_collections.ConfigDict, params, batch: dict, tokens: np.ndarray,
                    mesh: jax.sharding.Mesh | None = None) -> dict[str, np.ndarray]:
    """`evidence.make_evidence_fn`'s scores for this process's rows of a host batch and the tokens
    generated for them (placed as `generate_tokens` places its inputs)."""
    from mirasol3b_data.vocab import EOS_ID

    key = (config.model.to_json(), config.eval.evidence)
    if key not in _EVIDENCE_FNS:
        _EVIDENCE_FNS[key] = evidence.make_evidence_fn(Mirasol3B(config.model), EOS_ID, config.eval.evidence)
    inputs = {**model_batch(batch, config, GENERATE_KEYS), "tokens": np.asarray(tokens, np.int32)}
    in_mesh = jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()
    with in_mesh, nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        if mesh is not None:
            inputs = global_batch(inputs, mesh)
        out = _EVIDENCE_FNS[key](params, {k: v for k, v in inputs.items() if k != "tokens"}, inputs["tokens"])
        return {k: local_rows(v, inputs["prompts"]) for k, v in out.items()}


def stream_tokens(config: ml_collections.ConfigDict, stream: streaming.Stream, batch: dict, *,
                  decode: decoding.DecodeConfig, rng: jax.Array) -> np.ndarray:
    """Generated token ids `[b, max_new_tokens]` with each row's clip pushed into `stream` a snippet
    at a time (its padded snippets as padding) and the question asked at the clip's end."""
    frames, samples = config.model.video.snippet_frames, samples_per_snippet(config.model)
    stream.reset()
    for t in range(batch["media_mask"].shape[1]):
        stream.push(batch["video"][:, t * frames:(t + 1) * frames] if config.model.use_video else None,
                    batch["audio"][:, t * samples:(t + 1) * samples] if config.model.use_audio else None,
                    batch["media_mask"][:, t])
    return np.asarray(stream.ask(batch["prompts"], batch["prompt_lengths"], decode, rng)["tokens"])


def predict(config: ml_collections.ConfigDict, params, mesh: jax.sharding.Mesh | None = None, *,
            split: str | None = None, max_batches: int | None = None,
            decode: decoding.DecodeConfig | None = None, streaming_path: bool = False,
            report_dir: str | None = None) -> list[dict]:
    """One record per real example of `split` (all processes'): question, reference, prediction,
    question_type, kind, truth (evidence spans), duration, and the answer's evidence (`evidence_record`)
    unless `config.eval.evidence` is "off". Defaults come from `config.eval`. `streaming_path`: answers
    come from a `streaming.Stream` each clip is pushed into, a snippet at a time (one process only).
    `report_dir`: report pages of the first `REPORTS_PER_OUTCOME` right and wrong answers (process 0's)."""
    from mirasol3b_data import pipeline, vocab

    configlib.validate_eval(config)
    if streaming_path and jax.process_count() > 1:
        raise errors.ConfigError("evaluating through the streaming path runs in one process "
                                 f"(this run has {jax.process_count()})")
    stream = None
    reports = collections.Counter()
    if report_dir is not None and config.eval.evidence == "off":
        raise errors.ConfigError("report pages draw the answers' evidence: config.eval.evidence must be 'context' or "
                                 "'latents', not 'off'")
    split = split or config.eval.split
    max_batches = config.eval.max_batches if max_batches is None else max_batches
    vocabulary = vocab.get_vocabulary(config)
    rng = jax.random.key(config.seed)
    records = []
    for i, batch in enumerate(pipeline.make_eval_iterator(config, split)):
        if max_batches and i >= max_batches:
            break
        if i == 0:
            check_batch_shapes(batch, config)
        if streaming_path:
            if stream is None:
                stream = streaming.Stream(Mirasol3B(config.model), params, batch=batch["prompts"].shape[0],
                                          capacity=batch["media_mask"].shape[1])
            tokens = stream_tokens(config, stream, batch, decode=decode or decode_config(config),
                                   rng=jax.random.fold_in(rng, i))
            found = None if config.eval.evidence == "off" else stream.evidence(
                batch["prompts"], batch["prompt_lengths"], tokens, eos_id=vocab.EOS_ID)
        else:
            tokens = generate_tokens(config, params, batch, mesh, decode=decode, rng=jax.random.fold_in(rng, i))
            found = None if config.eval.evidence == "off" else evidence_scores(config, params, batch, tokens, mesh)
        for r in np.flatnonzero(batch["example_valid"]):
            record = {
                "question": vocabulary.decode(batch["prompts"][r, 1:batch["prompt_lengths"][r]].tolist()),
                "reference": batch["answer_text"][r],
                "prediction": vocabulary.decode(tokens[r].tolist()),
                "question_type": batch["question_type"][r],
                "kind": batch["kind"][r],
                "truth": [list(span) for span in batch["evidence"][r]],
                "duration": float(batch["media_mask"][r].sum()) * snippet_seconds(config),
            }
            if found is not None:
                record.update(evidence_record(found["scores"][r], found["memory_share"][r], batch["media_mask"][r],
                                              snippet_seconds(config)))
                if report_dir is not None and jax.process_index() == 0:
                    _maybe_report(config, batch, r, record, report_dir, reports)
            records.append(record)
    return [r for part in sharding.gather_json(records) for r in part]  # every process's


REPORTS_PER_OUTCOME = 3


def _maybe_report(config, batch: dict, r: int, record: dict, report_dir: str, written: collections.Counter) -> None:
    """Writes row `r`'s page as `{right,wrong}_<n>.html` while fewer than `REPORTS_PER_OUTCOME` of its kind are."""
    outcome = "right" if is_right(record["prediction"], record["reference"]) else "wrong"
    if written[outcome] >= REPORTS_PER_OUTCOME:
        return
    path = os.path.join(report_dir, f"{outcome}_{written[outcome]}.html")
    write_report_page(config, batch["video"][r], batch["audio"][r], batch["media_mask"][r], record["question"], record,
                      path, reference=record["reference"], truth=record["truth"])
    written[outcome] += 1


def write_report_page(config: ml_collections.ConfigDict, video: np.ndarray, audio: np.ndarray, media_mask: np.ndarray,
                      question: str, result: dict, path: str, *, reference: str | None = None,
                      truth=()) -> tuple[str, str]:
    """The report page (and PNG beside it, `mirasol3b/report.py`) of one answered clip: `video`,
    `audio`, `media_mask` one row of a model batch, `result` its answer ("answer" or "prediction") with
    `evidence_record`'s fields."""
    from mirasol3b import report
    from mirasol3b.model import logmel_spec

    snippets = int(np.asarray(media_mask).sum())
    frames, samples = snippets * config.model.video.snippet_frames, snippets * samples_per_snippet(config.model)
    answer = result["answer"] if "answer" in result else result["prediction"]
    right = None if reference is None else is_right(answer, reference)
    return report.write_report(
        path, frames=np.asarray(video[:frames]), audio=np.asarray(audio[:samples]), fps=config.model.video.fps,
        sample_rate=config.model.audio.sample_rate, snippet_seconds=snippet_seconds(config),
        scores=result["snippet_scores"][:snippets], spans=[(a, b) for a, b, _ in result["evidence"]],
        question=question, answer=answer, reference=reference, correct=right, truth=[tuple(t) for t in truth],
        logmel_spec=logmel_spec(config.model))


def evidence_record(scores: np.ndarray, memory_share: float, valid: np.ndarray, seconds: float) -> dict:
    """An answer's evidence as records and reports hold it: `snippet_scores` (one per snippet),
    `evidence` ([start s, end s, score], the strongest first), `memory_share`."""
    spans = evidence.top_spans(scores, valid, seconds)
    return {"snippet_scores": [round(float(x), 4) for x in scores],
            "evidence": [[round(a, 4), round(b, 4), round(c, 4)] for a, b, c in spans],
            "memory_share": round(float(memory_share), 4)}


# ---- scoring ----------------------------------------------------------------------------------

def _accuracy(hits: list[bool]) -> float | None:
    return sum(hits) / len(hits) if hits else None


def score(records: list[dict]) -> dict:
    """The metrics of the module docstring from `predict`'s records."""
    hit = [is_right(r["prediction"], r["reference"]) for r in records]
    out = {"num_examples": len(records), "exact_match": _accuracy(hit)}
    by_type = collections.defaultdict(list)
    for r, h in zip(records, hit):
        if r["question_type"]:
            by_type[r["question_type"]].append(h)
    for t in sorted(by_type):
        out[f"accuracy/{t}"] = _accuracy(by_type[t])
        out[f"num_examples/{t}"] = len(by_type[t])
    labels = [h for r, h in zip(records, hit) if r["kind"] == "classification"]
    out.update(classification_accuracy=_accuracy(labels), num_classification=len(labels))
    answers = collections.Counter(normalize_answer(r["reference"]) for r in records)
    top, count = answers.most_common(1)[0] if answers else (None, 0)
    out.update(majority_baseline=count / len(records) if records else None, majority_answer=top)
    out["samples"] = [{k: r[k] for k in ("question", "reference", "prediction", "evidence") if k in r}
                      for r in records[:NUM_SAMPLES]]
    if any("evidence" in r for r in records):
        out.update(grounding.grounding_metrics(
            [tuple(r["evidence"][0][:2]) if r.get("evidence") else None for r in records],
            [[tuple(span) for span in r.get("truth", ())] for r in records], hit,
            [r.get("duration", 0.0) for r in records]))
    return out


def evaluate(config: ml_collections.ConfigDict, params, mesh: jax.sharding.Mesh | None = None, *,
             split: str | None = None, max_batches: int | None = None,
             decode: decoding.DecodeConfig | None = None, streaming_path: bool = False,
             report_dir: str | None = None) -> dict:
    """Generates an answer for every example of `split` and scores them (see the module docstring).

    `params` may be sharded over `mesh` (then generation runs under it) or live on one device
    (`mesh=None`). `split`, `max_batches` (0: all) and `decode` default to `config.eval`.
    `streaming_path`: see `predict`; the metrics then say `"path": "streaming"`. `report_dir`: see `predict`.
    """
    split = split or config.eval.split
    max_batches = config.eval.max_batches if max_batches is None else max_batches
    decode = decode or decode_config(config)
    metrics = score(predict(config, params, mesh, split=split, max_batches=max_batches, decode=decode,
                            streaming_path=streaming_path, report_dir=report_dir))
    return {"split": split, **({"max_batches": max_batches} if max_batches else {}),
            **({"path": "streaming"} if streaming_path else {}),
            "decode": decode_settings(decode, config.seed), "numerics": numerics(config),
            "evidence": config.eval.evidence, **metrics}


def numerics(config: ml_collections.ConfigDict) -> dict:
    """The dtypes answers were computed in (an evaluation may use other ones than training)."""
    return {"dtype": config.model.dtype, "param_dtype": config.model.param_dtype}


def decode_settings(decode: decoding.DecodeConfig, seed: int) -> dict:
    """What an evaluation's answers were generated with: the method and the knobs it reads."""
    out = {"method": decode.method, "max_new_tokens": decode.max_new_tokens}
    if decode.method == "beam":
        out.update(beam_size=decode.beam_size, length_penalty=decode.length_penalty)
    elif decode.method == "sample":
        out.update(temperature=decode.temperature, top_k=decode.top_k, top_p=decode.top_p, seed=seed)
    return out


# ---- command line -----------------------------------------------------------------------------

SHARED_FLAGS = cli.Shared(
    config=cli.OPTIONAL, config_help="Config file, e.g. configs/tiny.py[:ttm] (default: the one the workdir's "
    "checkpoint stores).", workdir=cli.REQUIRED, workdir_help="The training run's workdir (its checkpoints).",
    distributed=True)


def define_config_check_flag(fv: flags.FlagValues):
    return flags.DEFINE_bool("config_check", True, "Refuse a --config whose model fields differ from the "
                             "checkpoint's (restore.check_config_matches_checkpoint); --noconfig_check uses them "
                             "on purpose.", flag_values=fv)


def define_flags(fv: flags.FlagValues) -> dict:
    return {"split": flags.DEFINE_string("split", None, "Split to evaluate (default: config.eval.split).",
                                         flag_values=fv),
            "streaming": flags.DEFINE_bool("streaming", False, "Answer through the streaming path: each clip "
                                           "pushed a snippet at a time, its question asked at its end (one "
                                           "process).", flag_values=fv),
            "report_dir": flags.DEFINE_string("report_dir", None, "Also write report pages (the clip, its spectrogram, "
                                              f"the evidence over time) of {REPORTS_PER_OUTCOME} right and "
                                              f"{REPORTS_PER_OUTCOME} wrong answers here.", flag_values=fv),
            "config_check": define_config_check_flag(fv)}


def main(args: cli.Args) -> None:
    distributed.maybe_initialize_from_flags(args)
    cli.quiet_logging()
    workdir = args.workdir
    distributed.check_shared_directory(workdir, "--workdir", create=False)
    workdir = os.fspath(restore.workdir_of(workdir))  # also given as its checkpoints directory
    # The checkpoint directory is opened twice: here for its config, then for the params.
    stored = restore.stored_config(workdir)
    config = restore.eval_config(args.config, workdir, check=args.config_check, stored=stored)
    if args.split:
        config.eval.split = args.split
    from mirasol3b_data import pipeline

    pipeline.check_eval_split(config)  # a wrong split or an unbuilt dataset: before the checkpoint is read
    mesh = sharding.make_mesh(config.mesh_shape)
    step, params = restore.restore_params(config, workdir, mesh)
    saved = stored[0]  # its dtypes name an evaluation in others apart
    trained = numerics(restore.from_saved(saved)) if saved is not None else None
    print(f"evaluating step {step} of {workdir}", file=sys.stderr, flush=True)  # stdout: the JSON line only
    # config.eval.split: --split's when given
    metrics = {"step": step, **evaluate(config, params, mesh, streaming_path=args.streaming,
                                        report_dir=args.report_dir)}
    if jax.process_index() == 0:
        line = json.dumps(metrics)
        print(line, flush=True)
        write_metrics(workdir, metrics, trained)


if __name__ == "__main__":
    cli.run(main, define_flags, SHARED_FLAGS)
