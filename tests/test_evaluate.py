"""Evaluation and answering: answer normalisation, the metrics on predictions we control, eval
metadata lining up with rows, a checkpoint restored and used end to end, and clear CLI errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import seqio
import tensorflow as tf
from flax import linen as nn

from configs import tiny
from mirasol3b_data import encode, pipeline, tasks
from mirasol3b import answer as answer_lib
from mirasol3b import configlib, decoding, evaluate, sharding
from mirasol3b.model import Mirasol3B, samples_per_snippet
from mirasol3b.train import logs, restore
from mirasol3b.train.checkpointer import Checkpointer
from mirasol3b.train.optimizer import make_optimizer
from mirasol3b.train.state import TrainState, abstract_state, example_batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = seqio.ByteVocabulary()
TASK = "eval_test_qa"
# Example i: prompt "q<i>"; CORRECT rows get their reference back (in other case and punctuation).
ANSWERS = ["red", "the dog", "red", "blue", "guitar", "piano", "red"]
TYPES = ["color", "what", "color", "color", "", "", "what"]
KINDS = ["qa", "qa", "qa", "qa", "classification", "classification", "qa"]
CORRECT = {0, 3, 4, 6}


def make_config(**eval_fields):
    cfg = tiny.get_config()
    for stack in configlib.STACKS:  # compile time
        cfg.model[stack].update(width=32, depth=1, num_heads=2, mlp_dim=64)
    cfg.model.ttm.token_learner_hidden = 32
    cfg.data.update(task=TASK, batch_size=4)
    cfg.eval.update(max_new_tokens=16, **eval_fields)
    return configlib.validate(cfg)


def _dataset_fn(split, shuffle_files, seed=None):
    del split, shuffle_files, seed
    cfg = make_config()
    frames, size = cfg.model.video.snippet_frames, cfg.model.video.image_size

    def make(i):
        return {"video": tf.fill([frames, size, size, 3], tf.cast(i, tf.uint8)),
                "audio": tf.zeros([samples_per_snippet(cfg.model)]), "num_snippets": 1,
                "prompt": tf.strings.format("q{}", i), "answer": tf.gather(ANSWERS, i),
                "question_type": tf.gather(TYPES, i), "kind": tf.gather(KINDS, i)}
    return tf.data.Dataset.range(len(ANSWERS)).map(make)


@pytest.fixture(scope="module", autouse=True)
def task():
    tasks.add_media_task(TASK, seqio.FunctionDataSource(_dataset_fn, splits=["validation"]), replace=True)
    yield
    seqio.TaskRegistry.remove(TASK)


def _index(question: str) -> int:
    return int(question[1:])  # "q<i>"


def test_normalize_answer():
    assert evaluate.normalize_answer("  The Red   car! ") == "red car"
    assert evaluate.normalize_answer("An apple, a pear.") == "apple pear"
    assert evaluate.normalize_answer("then another") == "then another"  # articles only as words
    assert evaluate.normalize_answer("THE") == ""


def test_metadata_lines_up_with_rows():
    for batch in pipeline.make_eval_iterator(make_config(), "validation", 0, 1):
        for r in range(len(batch["example_valid"])):
            prompt = VOCAB.decode(batch["prompts"][r, 1:batch["prompt_lengths"][r]].tolist())
            scored = batch["text_targets"][r][batch["text_loss_weights"][r] > 0].tolist()
            if not batch["example_valid"][r]:
                assert prompt == "" and batch["answer_text"][r] == batch["question_type"][r] == ""
                continue
            i = _index(prompt)
            assert batch["answer_text"][r] == VOCAB.decode(scored) == ANSWERS[i]
            assert (batch["question_type"][r], batch["kind"][r]) == (TYPES[i], KINDS[i])


def test_metrics_on_controlled_predictions(monkeypatch):
    cfg = make_config()
    with cfg.unlocked():
        cfg.eval.evidence = "off"  # no model: answers only (evidence: tests/test_evidence.py)
    seen = []

    def fake_generate(params, batch, rng):
        seen.append(batch)
        out = np.zeros((len(batch["prompts"]), cfg.eval.max_new_tokens), np.int32)
        for r, (prompt, n) in enumerate(zip(batch["prompts"], batch["prompt_lengths"])):
            question = VOCAB.decode(np.asarray(prompt)[1:n].tolist())
            # Padding rows (empty prompt) "answer" red: counted, they would move every metric.
            text = "red" if not question else (
                f"The {ANSWERS[_index(question)].upper()}!" if _index(question) in CORRECT else "wrong")
            ids = VOCAB.encode(text) + [1]
            out[r, :len(ids)] = ids
        return {"tokens": out}

    monkeypatch.setattr(evaluate, "generate_fn", lambda config, decode: fake_generate)
    metrics = evaluate.evaluate(cfg, params=None)
    assert len(seen) == 2  # 7 examples in batches of 4: one padding row
    for batch in seen:  # only numeric model inputs reach generation
        assert set(batch) == set(evaluate.GENERATE_KEYS)
        assert all(np.asarray(v).dtype != object for v in batch.values())
    assert metrics["num_examples"] == 7 and metrics["split"] == "validation"
    assert metrics["exact_match"] == pytest.approx(4 / 7)
    assert metrics["accuracy/color"] == pytest.approx(2 / 3) and metrics["num_examples/color"] == 3
    assert metrics["accuracy/what"] == pytest.approx(1 / 2) and metrics["num_examples/what"] == 2
    assert not any(k.startswith("accuracy/") for k in metrics if k not in ("accuracy/color", "accuracy/what"))
    assert metrics["classification_accuracy"] == pytest.approx(1 / 2) and metrics["num_classification"] == 2
    assert metrics["majority_baseline"] == pytest.approx(3 / 7) and metrics["majority_answer"] == "red"
    assert metrics["samples"][0] == {"question": "q0", "reference": "red", "prediction": "The RED!"}
    assert not any(k.startswith("grounding") for k in metrics)
    assert evaluate.evaluate(cfg, None, max_batches=1)["num_examples"] == 4


class _Shard:
    def __init__(self, data, rows: slice):
        self.data, self.index = data, (rows, slice(None))


class _GlobalArray:
    """What a process sees of an array that spans other processes' devices too."""
    is_fully_addressable = False

    def __init__(self, shape, shards):
        self.shape, self.addressable_shards = shape, shards


def test_local_rows_are_the_rows_this_process_fed_whatever_the_result_sharding():
    # Process 1 of 2 fed rows 4:8 of an 8-row batch, over two of its devices (4:6, 6:8).
    fed = _GlobalArray((8, 3), [_Shard(None, slice(4, 6)), _Shard(None, slice(6, 8))])
    tokens = np.arange(8 * 5).reshape(8, 5)
    by_rows = _GlobalArray((8, 5), [_Shard(tokens[4:6], slice(4, 6)), _Shard(tokens[6:8], slice(6, 8))])
    replicated = _GlobalArray((8, 5), [_Shard(tokens, slice(None)), _Shard(tokens, slice(None))])
    coarser = _GlobalArray((8, 5), [_Shard(tokens[4:8], slice(4, 8))])
    for result in (by_rows, replicated, coarser):
        np.testing.assert_array_equal(evaluate.local_rows(result, fed), tokens[4:8])
    elsewhere = _GlobalArray((8, 5), [_Shard(tokens[:4], slice(0, 4))])
    with pytest.raises(ValueError, match="rows 4:6"):
        evaluate.local_rows(elsewhere, fed)


def test_missing_checkpoint_names_the_workdir(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        restore.config_from_workdir(str(tmp_path))
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        restore.restore_params(make_config(), str(tmp_path), mesh)


def test_every_decoding_setting_is_a_config_field():
    cfg = make_config()
    cfg.eval.update(decode_method="sample", temperature=0.5, top_k=3, top_p=0.9, length_penalty=0.6, beam_size=2)
    d = evaluate.decode_config(configlib.validate(cfg))
    assert (d.method, d.temperature, d.top_k, d.top_p, d.length_penalty, d.beam_size) == ("sample", 0.5, 3, 0.9, 0.6, 2)
    cfg.eval.top_p = 0.0
    with pytest.raises(configlib.ConfigError, match=r"config\.eval\.top_p"):
        configlib.validate(cfg)


def test_eval_config_is_checked():
    cfg = make_config()
    cfg.eval.max_new_tokens = cfg.model.text_decoder.max_length  # no room after the prompt window
    with pytest.raises(configlib.ConfigError, match="eval.max_new_tokens"):
        configlib.validate_eval(cfg)
    cfg.eval.decode_method = "nucleus"
    with pytest.raises(configlib.ConfigError, match="eval.decode_method"):
        configlib.validate(cfg)


def test_checkpoint_to_evaluate_and_answer(tmp_path):
    """Saves random params as a training run would, restores them with the config from the
    workdir, evaluates with real generation and answers about an encoded clip."""
    cfg = make_config()
    cfg.data.batch_size = 1  # answer() decodes one row: the same shapes compile once
    model, optimizer = Mirasol3B(cfg.model), make_optimizer(cfg.train)
    boxed, _ = abstract_state(model, optimizer, example_batch(cfg, 1))
    rng = np.random.default_rng(0)  # numpy params: compiling init would cost as much as generation
    params = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape) * 0.05, a.dtype), nn.unbox(boxed.params))
    state = TrainState(step=jnp.int32(5), params=params, opt_state=optimizer.init(params))
    with Checkpointer(str(tmp_path), save_every=1, keep=1, async_save=False) as ckpt:
        assert ckpt.maybe_save(5, state, {"batches": 5}, cfg, force=True)

    restored_config = restore.config_from_workdir(str(tmp_path))
    assert restored_config.to_dict() == cfg.to_dict()
    # A --config that differs in what the model is (same param shapes: it would restore and be
    # scored as another model) is refused, naming the fields; how it computes may differ.
    given = cfg.copy_and_resolve_references()
    given.model.update(dtype="bfloat16", remat_policy="nothing_saveable", combiner_outputs_only=False)
    assert restore.eval_config(given, str(tmp_path), check=True) is given
    given.model.time_aligned.window = cfg.model.time_aligned.window + 1
    given.model.combiner_readout = "per_modality" if cfg.model.combiner_readout == "joint" else "joint"
    with pytest.raises(configlib.ConfigError, match=r"(?s)differs from the one the checkpoint was trained with.*"
                                                     r"model\.combiner_readout: .* here.*model\.time_aligned\.window: "
                                                     rf"{given.model.time_aligned.window} here, "
                                                     rf"{cfg.model.time_aligned.window} in the checkpoint"):
        restore.eval_config(given, str(tmp_path), check=True)
    assert restore.eval_config(given, str(tmp_path), check=False) is given  # --noconfig_check
    assert restore.eval_config(None, str(tmp_path), check=True).to_dict() == cfg.to_dict()
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    step, restored = restore.restore_params(restored_config, str(tmp_path), mesh)
    assert step == 5
    jax.tree.map(np.testing.assert_array_equal, restored, params)
    # The run's checkpoints directory works as its workdir, and the mesh defaults to one device.
    assert restore.config_from_workdir(str(tmp_path / "checkpoints")).to_dict() == restored_config.to_dict()
    assert restore.restore_params(restored_config, str(tmp_path / "checkpoints"))[0] == 5
    # Params only: another optimizer (its state has another structure) and another param dtype
    # (read as saved, checked against the fingerprint, then cast) still evaluate this checkpoint.
    other = restored_config.copy_and_resolve_references()
    other.train.grad_clip_norm = None if cfg.train.grad_clip_norm is not None else 1.0
    other.model.param_dtype = "bfloat16"
    assert step == restore.restore_params(other, str(tmp_path), mesh)[0]
    cast = restore.restore_params(other, str(tmp_path), mesh)[1]
    jax.tree.map(lambda x, p: np.testing.assert_array_equal(x, p.astype(jnp.bfloat16)), cast, params)

    metrics = evaluate.evaluate(restored_config, restored, mesh, max_batches=2)
    assert metrics["num_examples"] == 2 and 0 <= metrics["exact_match"] <= 1
    written = logs.write_metrics(str(tmp_path), {"step": 5, **metrics})  # beside, not over, the whole split's
    assert written.name == "eval_validation_step5_first2batches.json" and metrics["max_batches"] == 2
    assert metrics["decode"] == {"method": "greedy", "max_new_tokens": restored_config.eval.max_new_tokens}
    # Answers decoded otherwise say how, and do not replace the greedy ones of the same step.
    beam = evaluate.decode_settings(decoding.DecodeConfig(method="beam", beam_size=3), seed=0)
    assert beam == {"method": "beam", "max_new_tokens": 32, "beam_size": 3, "length_penalty": 0.0}
    sample = evaluate.decode_settings(decoding.DecodeConfig(method="sample", top_k=5), seed=7)
    assert sample["seed"] == 7 and sample["top_k"] == 5
    latents = logs.write_metrics(str(tmp_path), {"step": 5, "split": "validation", "evidence": "latents"})
    assert latents.name == "eval_validation_step5_evidence-latents.json"
    for decode, name in ((beam, "eval_validation_step5_beam3.json"), (sample, "eval_validation_step5_sample.json")):
        written = logs.write_metrics(str(tmp_path), {"step": 5, "split": "validation", "decode": decode})
        assert written.name == name and json.loads(written.read_text())["decode"] == decode
    # Other dtypes than training's are named too: a bf16 evaluation does not replace the f32 one.
    assert metrics["numerics"] == {"dtype": "float32", "param_dtype": "float32"}
    f32 = {"step": 5, "split": "validation", "numerics": metrics["numerics"]}
    assert logs.write_metrics(str(tmp_path), f32, metrics["numerics"]).name == "eval_validation_step5.json"
    bf16 = dict(f32, numerics={"dtype": "bfloat16", "param_dtype": "float32"})
    written = logs.write_metrics(str(tmp_path), bf16, metrics["numerics"])
    assert written.name == "eval_validation_step5_dtype-bfloat16.json"
    assert all(isinstance(s["prediction"], str) for s in metrics["samples"])

    clip = str(tmp_path / "clip.mp4")
    t = np.arange(2 * 16000) / 16000
    encode.write_clip(clip, np.full((16, 32, 32, 3), 100, np.uint8), 8, 0.3 * np.sin(2 * np.pi * 440 * t), 16000)
    text = answer_lib.answer(restored_config, restored, clip, "what plays?", mesh=mesh)
    assert isinstance(text, str)


def _run_answer(tmp_path, video):
    return subprocess.Popen(
        [sys.executable, "-m", "mirasol3b.answer", "--config=configs/tiny.py", f"--workdir={tmp_path}",
         f"--video={video}", "--question=what?"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_answer_cli_reports_unreadable_files(tmp_path):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00not a video" * 100)
    runs = {"not_found": _run_answer(tmp_path, tmp_path / "missing.mp4"), "undecodable": _run_answer(tmp_path, broken)}
    for reason, run in runs.items():
        _, stderr = run.communicate(timeout=120)
        name = "missing.mp4" if reason == "not_found" else "broken.mp4"
        assert run.returncode == 1, stderr[-2000:]
        assert name in stderr and reason in stderr and "Traceback" not in stderr, stderr[-2000:]


def test_a_model_without_audio_answers_about_a_file_without_an_audio_track(tmp_path):
    from mirasol3b_data.media import MediaError

    clip = str(tmp_path / "silent.mp4")
    encode.write_clip(clip, np.full((16, 32, 32, 3), 100, np.uint8), 8, None, 16000)
    cfg = tiny.get_config()
    with pytest.raises(MediaError, match="no_audio_track|no audio"):
        answer_lib.prepare(cfg, clip, "what plays?")
    with cfg.unlocked():
        cfg.model.use_audio = False
    batch = answer_lib.prepare(cfg, clip, "what plays?")
    assert batch["video"].shape[:2] == (1, cfg.data.num_frames) and batch["media_mask"].any()


def test_the_streaming_path_answers_as_the_whole_clip_does(tmp_path):
    """`evaluate --streaming`: each clip pushed a snippet at a time, its question asked at the end,
    gives the answers of generation over the whole clip (a bounded TTM model: window, recent
    context, memory), and its metrics file is named apart."""
    cfg = make_config()
    with cfg.unlocked():
        cfg.model.update(combiner="ttm", combiner_readout="joint")
        cfg.model.time_aligned.window = 2
        cfg.model.text_decoder.update(context="recent", recent_snippets=2, read_memory=True)
    cfg = configlib.validate(cfg)
    model = Mirasol3B(cfg.model)
    boxed, _ = abstract_state(model, make_optimizer(cfg.train), example_batch(cfg, 1))
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape) * 0.3, a.dtype), nn.unbox(boxed.params))
    offline = evaluate.predict(cfg, params, max_batches=1)
    streamed = evaluate.predict(cfg, params, max_batches=1, streaming_path=True)
    assert len(offline) == len(streamed) == cfg.data.batch_size
    assert [r["prediction"] for r in streamed] == [r["prediction"] for r in offline]
    assert len({r["prediction"] for r in offline}) > 1  # the answers depend on the clip: a real comparison
    # Their evidence too: the stream's, from the snippets it holds (the recent ones) and its memory.
    np.testing.assert_allclose([r["snippet_scores"] for r in streamed], [r["snippet_scores"] for r in offline],
                               atol=2e-4)
    np.testing.assert_allclose([r["memory_share"] for r in streamed], [r["memory_share"] for r in offline], atol=2e-4)
    metrics = evaluate.evaluate(cfg, params, max_batches=1, streaming_path=True, report_dir=str(tmp_path / "pages"))
    assert metrics["path"] == "streaming"
    # --report_dir: a page (and its PNG) per right and wrong answer, up to REPORTS_PER_OUTCOME each.
    right = sum(evaluate.is_right(r["prediction"], r["reference"]) for r in streamed)
    expected = [f"right_{i}" for i in range(min(right, 3))] + [f"wrong_{i}" for i in range(min(len(streamed) - right, 3))]
    assert sorted(p.stem for p in (tmp_path / "pages").glob("*.html")) == expected
    assert sorted(p.stem for p in (tmp_path / "pages").glob("*.png")) == expected
    written = logs.write_metrics(str(tmp_path), {"step": 3, **metrics})
    assert written.name == "eval_validation_step3_streaming_first1batches.json"
