"""The input pipeline: feature converter, user tasks, mixtures, sharding, determinism, resumption, eval.

Sources are in-memory `seqio.FunctionDataSource`s in the `data/spec.py` schema at the tiny geometry
(T = 4 snippets of 2 frames, 4000 samples per snippet); example i has prompt "<prefix><i>", so an
example is identified by decoding its prompt.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import seqio
import tensorflow as tf
from flax import linen as nn

from mirasol3b_data import feature_converter as fc
from mirasol3b_data import mixtures, pipeline, tasks, vocab
from mirasol3b import configlib, sharding
from mirasol3b.model import Mirasol3B
from mirasol3b.train import optimizer as optim
from mirasol3b.train import state as train_state
from mirasol3b.train import step as train_step

VOCAB = seqio.ByteVocabulary()
SIZE, FRAMES_PER_SNIPPET, SAMPLES_PER_SNIPPET, SNIPPETS, L = 32, 2, 4000, 4, 32


def make_config(**data):
    cfg = configlib.base_config()
    with cfg.unlocked():
        cfg.data.update({"task": "user_a", "task_modules": "", "tfds_data_dir": "", "vocab_path": "",
                         "mixture_rates": "", "shuffle_buffer": 16})
        cfg.data.update(data)
    return cfg


def _example(prefix: str, kind=lambda i: "qa"):
    def make(i):
        n = tf.cast(1 + i % SNIPPETS, tf.int32)
        seed = tf.stack([i, 0])
        return {
            "video": tf.cast(tf.random.stateless_uniform([n * FRAMES_PER_SNIPPET, SIZE, SIZE, 3], seed, 0, 256,
                                                         tf.int32), tf.uint8),
            "audio": 0.1 * tf.random.stateless_normal([n * SAMPLES_PER_SNIPPET], seed),
            "num_snippets": n,
            "audio_missing": False,
            "prompt": tf.strings.format(prefix + "{}", i),
            "answer": tf.strings.format("answer {}", i % 7),
            "kind": kind(i),
        }
    return make


def source(prefix: str, size: int, kind=lambda i: "qa") -> seqio.FunctionDataSource:
    def dataset_fn(split, shuffle_files, seed=None):
        del shuffle_files, seed  # a fixed order; the task shuffles
        offset = {"train": 0, "validation": 10_000}[split]
        return tf.data.Dataset.range(offset, offset + size).map(_example(prefix, kind))
    return seqio.FunctionDataSource(dataset_fn, splits=["train", "validation"])


SIZES = {"user_a": 20, "user_b": 20, "user_eval": 11}


@pytest.fixture(scope="module", autouse=True)
def user_tasks():
    for name, size in SIZES.items():
        tasks.add_media_task(name, source(name[-1], size), shuffle_buffer_size=16, replace=True)
    yield
    for name in SIZES:
        seqio.TaskRegistry.remove(name)


def ids(batch, valid_only=True) -> list[str]:
    """The prompt text of each row (its example id)."""
    rows = np.flatnonzero(batch["example_valid"]) if valid_only else range(len(batch["prompts"]))
    return [VOCAB.decode(batch["prompts"][r, 1:batch["prompt_lengths"][r]].tolist()) for r in rows]


def take(it, n):
    return [next(it) for _ in range(n)]


def convert(examples, lengths=None, **kw):
    ds = tf.data.Dataset.from_tensors(examples)
    lengths = lengths or {"prompt": L, "answer": L, "video": SNIPPETS * FRAMES_PER_SNIPPET,
                          "audio": SNIPPETS * SAMPLES_PER_SNIPPET, "num_snippets": SNIPPETS}
    return next(fc.Mirasol3BFeatureConverter(**kw)(ds, lengths).as_numpy_iterator())


def raw(prompt, answer, snippets=2):
    return {"prompt": np.asarray(prompt, np.int32), "answer": np.asarray(answer, np.int32),
            "video": np.full((snippets * FRAMES_PER_SNIPPET, SIZE, SIZE, 3), 7, np.uint8),
            "audio": np.full((snippets * SAMPLES_PER_SNIPPET,), 0.5, np.float32), "num_snippets": np.int32(snippets)}


# ---- feature converter ------------------------------------------------------------------------

def test_converter_builds_shifted_text_weights_and_padded_media():
    out = convert(raw([10, 11, 12], [20, 21]))
    pad = [0] * (L - 6)
    np.testing.assert_array_equal(out["text_targets"], [10, 11, 12, 20, 21, vocab.EOS_ID] + pad)
    np.testing.assert_array_equal(out["text_inputs"], [vocab.BOS_ID, 10, 11, 12, 20, 21] + pad)
    np.testing.assert_array_equal(out["text_inputs"][1:6], out["text_targets"][:5])  # shift by one
    np.testing.assert_array_equal(out["text_loss_weights"], [0, 0, 0, 1, 1, 1] + pad)  # answer + EOS scored
    np.testing.assert_array_equal(out["prompts"], [0, 10, 11, 12] + [0] * (L - 4))
    assert out["prompt_lengths"] == 4 and out["truncation"] == fc.NOT_TRUNCATED
    # A 2-of-4-snippet clip: real frames and samples first, zeros after, mask on the first two snippets.
    np.testing.assert_array_equal(out["media_mask"], [True, True, False, False])
    assert out["video"].shape == (8, SIZE, SIZE, 3) and out["video"].dtype == np.uint8
    assert (out["video"][:4] == 7).all() and (out["video"][4:] == 0).all()
    assert out["audio"].shape == (16000,) and out["audio"].dtype == np.float32
    assert (out["audio"][:8000] == 0.5).all() and (out["audio"][8000:] == 0).all()
    assert out["text_inputs"].dtype == np.int32 and out["text_loss_weights"].dtype == np.float32


def test_truncation_drops_the_prompt_start_and_keeps_answer_and_eos():
    lengths = {"prompt": 8, "answer": 8, "video": 8, "audio": 16000, "num_snippets": 4}
    out = convert(raw(list(range(10, 20)), [30, 31, 32]), lengths)
    np.testing.assert_array_equal(out["text_targets"], [16, 17, 18, 19, 30, 31, 32, vocab.EOS_ID])
    np.testing.assert_array_equal(out["text_inputs"], [0, 16, 17, 18, 19, 30, 31, 32])
    np.testing.assert_array_equal(out["text_loss_weights"], [0, 0, 0, 0, 1, 1, 1, 1])
    assert out["truncation"] == fc.PROMPT_TRUNCATED
    # The question evaluation asks is the prompt's last L - 1 tokens, whatever the answer's length
    # (a shorter reference must not give the model more of the question).
    np.testing.assert_array_equal(out["prompts"], [0, 13, 14, 15, 16, 17, 18, 19])
    assert out["prompt_lengths"] == 8
    for answer in ([30], [], list(range(30, 36))):  # build_text alone: the converter's text part
        other = fc.build_text(tf.range(10, 20), tf.constant(answer, tf.int32), 8)
        np.testing.assert_array_equal(other["prompts"], out["prompts"])
        assert other["prompt_lengths"] == 8
    # An answer that cannot fit with its EOS: no prompt, its first L tokens, reported.
    out = convert(raw([10], list(range(30, 40))), lengths)
    np.testing.assert_array_equal(out["text_targets"], range(30, 38))
    assert out["text_loss_weights"].sum() == 8 and out["truncation"] == fc.ANSWER_TRUNCATED
    np.testing.assert_array_equal(out["prompts"][:2], [0, 10])  # still asked, though not trained on


def test_converter_rejects_packing_and_media_longer_than_the_model():
    with pytest.raises(ValueError, match="does not pack"):
        fc.Mirasol3BFeatureConverter(pack=True)
    with pytest.raises(tf.errors.InvalidArgumentError, match="config.data.num_frames"):
        convert(raw([1], [2], snippets=5))


def test_vocabulary_checks_name_the_field():
    cfg = make_config()
    assert vocab.get_vocabulary(cfg).vocab_size == 259
    with cfg.unlocked():
        cfg.model.vocab_size = 100
    with pytest.raises(ValueError, match=r"config\.model\.vocab_size \(100\).*>= 259"):
        vocab.get_vocabulary(cfg)
    cfg = make_config(vocab_path="/nonexistent/spm.model")
    with pytest.raises(FileNotFoundError, match=r"config\.data\.vocab_path.*/nonexistent/spm\.model"):
        vocab.get_vocabulary(cfg)


# ---- a user's task trains ---------------------------------------------------------------------

def test_user_task_named_in_config_trains_one_step():
    cfg = make_config(task="user_a")
    for name in ("video_encoder", "audio_encoder", "combiner_transformer", "time_aligned", "text_decoder"):
        cfg.model[name].update(width=32, depth=1, num_heads=2, mlp_dim=64)  # compile time
    cfg.train.warmup_steps = 0  # the first step's learning rate is not 0
    batch = next(pipeline.make_input_iterator(cfg, "train"))
    b = cfg.data.batch_size
    assert batch["video"].shape == (b, 8, SIZE, SIZE, 3) and batch["audio"].shape == (b, 16000)
    assert batch["media_mask"].shape == (b, SNIPPETS) and batch["text_inputs"].shape == (b, L)
    assert batch["example_valid"].all()
    # One device: an 8-way mesh triples the compile time and sharding is tested in test_model.py.
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    batch = {k: jax.make_array_from_process_local_data(sharding.batch_sharding(mesh, v.ndim), v)
             for k, v in batch.items()}
    model = Mirasol3B(cfg.model)
    optimizer = optim.make_optimizer(cfg.train)
    abstract, _ = train_state.abstract_state(model, optimizer, batch)
    rng = np.random.default_rng(0)  # numpy params: compiling init would cost as much as the step
    params = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape) * 0.05, a.dtype), nn.unbox(abstract.params))
    state = train_state.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        state, metrics = jax.jit(train_step.make_train_step(model, optimizer, cfg.loss))(state, batch,
                                                                                          jax.random.key(1))
    assert np.isfinite(float(metrics["loss"])) and float(metrics["scored_tokens"]) > 0
    changed = jax.tree.map(lambda x, y: not np.array_equal(x, y), params, jax.device_get(state.params))
    assert all(jax.tree.leaves(changed))


# ---- mixtures ---------------------------------------------------------------------------------

def test_mixture_samples_tasks_at_configured_rates():
    cfg = make_config(task="user_mix", mixture_rates="user_a:0.8,user_b:0.2", batch_size=50)
    it = pipeline.make_input_iterator(cfg, "train", 0, 1)
    prefixes = [i[0] for batch in take(it, 40) for i in ids(batch)]
    assert len(prefixes) == 2000
    assert abs(prefixes.count("a") / 2000 - 0.8) < 0.04, prefixes.count("a")
    assert isinstance(seqio.get_mixture_or_task("user_mix"), seqio.Mixture)


def test_mixture_rates_parse_and_validate():
    assert mixtures.parse_rates("user_a:3, user_b:1") == {"user_a": 3.0, "user_b": 1.0}
    assert mixtures.parse_rates({"user_a": 1}) == {"user_a": 1.0}
    for bad in ("user_a", "user_a:-1", "user_a:x", "user_a:1,user_a:2"):
        with pytest.raises(ValueError, match="mixture_rates"):
            mixtures.parse_rates(bad)
    with pytest.raises(ValueError, match="no task or mixture named"):
        mixtures.register_mixture("bad_mix", {"user_a": 1, "nope": 1})
    with pytest.raises(ValueError, match="a task has that name"):
        mixtures.register_mixture("user_a", {"user_b": 1})


def test_unknown_task_or_task_module_is_an_error_naming_the_field(tmp_path, monkeypatch):
    with pytest.raises(configlib.ConfigError, match=r"config\.data\.task: expected one of .*'synthetic_avqa_tiny'.*"
                                                     r"task_modules.*got 'synthetic_avqa_tinny'"):
        pipeline.make_input_iterator(make_config(task="synthetic_avqa_tinny"), "train", 0, 1)
    with pytest.raises(configlib.ConfigError, match=r"config\.data\.task: expected a registered .*got 'xyzzy'"):
        pipeline.resolve_provider(make_config(task="xyzzy"))
    with pytest.raises(configlib.ConfigError, match=r"config\.data\.task_modules: .*no 'my_taskz' on the module "
                                                     r"path.*PYTHONPATH.*got 'my_taskz'"):
        pipeline.resolve_provider(make_config(task_modules="my_taskz"))
    # A module that is there but imports one that is not: its own error, which names the import.
    (tmp_path / "tasks_needing_x.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="no_such_dependency_xyz"):
        pipeline.resolve_provider(make_config(task_modules="tasks_needing_x"))


def test_a_user_mixture_reads_the_tasks_registered_for_the_config(tmp_path):
    # Registered before the config's data dir is known, as a user's task module does at import.
    mixtures.register_mixture("my_mix", {"local_media_tiny_qa": 1, "synthetic_avqa_tiny": 1}, replace=True)
    mixtures.register_mixture("my_nested_mix", {"my_mix": 1, "qa_tiny": 1}, replace=True)
    try:
        for name in ("my_mix", "my_nested_mix"):
            provider = pipeline.resolve_provider(make_config(task=name, tfds_data_dir=str(tmp_path), shuffle_buffer=8))
            assert {t.name for t in provider.tasks} >= {"local_media_tiny_qa", "synthetic_avqa_tiny"}
            assert [t.source.tfds_dataset.data_dir for t in provider.tasks] == [str(tmp_path)] * len(provider.tasks)
            assert [t.shuffle_buffer_size for t in provider.tasks] == [8] * len(provider.tasks)
            assert all(t is seqio.TaskRegistry.get(t.name) for t in provider.tasks)
            assert seqio.get_mixture_or_task(name) is provider
    finally:
        for name in ("my_nested_mix", "my_mix"):
            seqio.MixtureRegistry.remove(name)


# ---- tasks with nothing to read ---------------------------------------------------------------

@pytest.fixture
def caption_tasks():
    """`no_captions`: a QA-only source under a caption filter; `one_caption`: only example 0 is a caption."""
    def one(i):
        return tf.where(tf.equal(i, 0), "caption", "qa")
    tasks.add_media_task("no_captions", source("n", 8), preprocessors=[tasks.filter_kind("caption")],
                         shuffle_buffer_size=16, replace=True)
    tasks.add_media_task("one_caption", source("o", 8, kind=one), preprocessors=[tasks.filter_kind("caption")],
                         shuffle_buffer_size=16, replace=True)
    yield
    seqio.MixtureRegistry.remove("mix_with_empty")
    for name in ("no_captions", "one_caption"):
        seqio.TaskRegistry.remove(name)


def test_a_task_with_nothing_to_read_is_an_error_not_a_hang(caption_tasks):
    # Before the check, the infinite read of an empty task never yielded and never returned.
    with pytest.raises(ValueError, match=r"task 'no_captions'.*split 'train'.*kind filter 'caption'"):
        pipeline.make_input_iterator(make_config(task="no_captions"), "train", 0, 1)
    # A mixture would hang the first time it sampled the empty task.
    with pytest.raises(ValueError, match=r"mixture 'mix_with_empty'.*task 'no_captions'"):
        pipeline.make_input_iterator(make_config(task="mix_with_empty", mixture_rates="user_a:1,no_captions:1"),
                                     "train", 0, 1)


def test_a_shard_with_nothing_to_read_is_an_error_naming_the_shard(caption_tasks):
    cfg = make_config(task="one_caption", batch_size=2)
    assert ids(next(pipeline.make_input_iterator(cfg, "train", 0, 2))) == ["o0"]
    with pytest.raises(ValueError, match=r"task 'one_caption'.*shard 1 of 2.*other shards"):
        pipeline.make_input_iterator(cfg, "train", 1, 2)


# ---- sharding, determinism, resumption --------------------------------------------------------

def test_two_shards_are_disjoint_and_cover_the_split():
    cfg = make_config(batch_size=4)
    seen = [{i for batch in take(pipeline.make_input_iterator(cfg, "train", s, 2), 25) for i in ids(batch)}
            for s in (0, 1)]
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == {f"a{i}" for i in range(SIZES["user_a"])}


def test_order_is_fixed_by_the_seed():
    def order(seed):
        return [i for batch in take(pipeline.make_input_iterator(make_config(), "train", 0, 1, seed=seed), 2)
                for i in ids(batch)]
    assert order(3) == order(3)
    assert order(3) != order(4)


def test_iterator_position_saves_and_restores():
    cfg = make_config(task="user_mix_resume", mixture_rates="user_a:1,user_b:1")
    it = pipeline.make_input_iterator(cfg, "train", 0, 1)
    take(it, 3)
    state = json.dumps(it.get_state())  # what the checkpoint stores
    after = take(it, 2)
    fresh = pipeline.make_input_iterator(cfg, "train", 0, 1)
    fresh.set_state(json.loads(state))
    for a, b in zip(after, take(fresh, 2), strict=True):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    with pytest.raises(ValueError, match="seed"):
        pipeline.make_input_iterator(cfg, "train", 0, 1, seed=9).set_state(json.loads(state))


# ---- evaluation -------------------------------------------------------------------------------

def test_eval_covers_every_example_once_with_padding_masked():
    cfg = make_config(task="user_eval", batch_size=4)
    expected = sorted(f"l{i}" for i in range(10_000, 10_000 + SIZES["user_eval"]))
    batches = list(pipeline.make_eval_iterator(cfg, "validation", 0, 1))
    assert len(batches) == 3 and [b["example_valid"].sum() for b in batches] == [4, 4, 3]
    assert sorted(i for b in batches for i in ids(b)) == expected
    last = batches[-1]
    assert not last["media_mask"][3].any() and last["text_loss_weights"][3].sum() == 0
    # Two hosts: the same number of batches each, together every example once.
    per_host = [list(pipeline.make_eval_iterator(cfg, "validation", s, 2)) for s in (0, 1)]
    assert len(per_host[0]) == len(per_host[1]) == 3
    assert sorted(i for host in per_host for b in host for i in ids(b)) == expected
    assert all(b["video"].shape[0] == 2 for host in per_host for b in host)


def test_eval_rows_carry_their_metadata_and_train_batches_stay_numeric():
    cfg = make_config(task="user_eval", batch_size=4)
    batches = list(pipeline.make_eval_iterator(cfg, "validation", 0, 1))
    for batch in batches:
        for r in range(4):
            if not batch["example_valid"][r]:
                assert [batch[k][r] for k in pipeline.EVAL_METADATA] == ["", "", "", ()]  # () : no evidence spans
                continue
            i = int(ids(batch, valid_only=False)[r][1:])  # "l<i>"
            scored = batch["text_targets"][r][batch["text_loss_weights"][r] > 0]
            assert batch["answer_text"][r] == VOCAB.decode(scored.tolist()) == f"answer {i % 7}"
            assert batch["kind"][r] == "qa" and batch["question_type"][r] == ""  # the source has no type
            assert batch["evidence"][r] == ()  # nor evidence spans
    assert batches[-1]["answer_text"].dtype == object and not batches[-1]["example_valid"][3]
    assert set(pipeline.drop_metadata(batches[0])) == set(batches[0]) - set(pipeline.EVAL_METADATA)
    train = next(pipeline.make_input_iterator(cfg, "train", 0, 1))
    assert not set(train) & set(pipeline.EVAL_METADATA)
    assert all(v.dtype != object for v in train.values())


def test_truncation_is_counted():
    cfg = make_config(task="user_eval", batch_size=4, text_length=12)  # "l100NN" + "answer N" + EOS = 15 tokens
    it = pipeline.make_eval_iterator(cfg, "validation", 0, 1)
    batches = list(it)  # a whole pass, so the counts are complete
    batch = batches[0]
    np.testing.assert_array_equal(batch["text_loss_weights"].sum(1), 9)  # the answer and EOS, whole
    assert it.truncation_counts == {"examples": 11, "prompt_truncated": 11, "answer_truncated": 0}


# ---- the built-in tasks ----------------------------------------------------------------------

def test_a_single_user_task_shuffles_with_the_configs_buffer(monkeypatch):
    seen = []
    real = pipeline._task_examples

    def spy(provider, split, **kw):
        if kw["num_epochs"] is None and kw.get("shuffle_buffer_size") != 1:  # the training read, not the probe
            seen.append(kw.get("shuffle_buffer_size"))
        return real(provider, split, **kw)

    monkeypatch.setattr(pipeline, "_task_examples", spy)
    next(pipeline.make_input_iterator(make_config(task="user_a", shuffle_buffer=5), "train", 0, 1))
    assert seen == [5], "a task registered with 16 reads with config.data.shuffle_buffer"


def test_a_wrong_eval_split_is_a_config_error_before_training():
    for task in ("user_a", "user_mixture_for_split_check"):
        if task.startswith("user_mixture"):
            mixtures.register_mixture(task, {"user_a": 1, "user_b": 1}, replace=True)
        cfg = make_config(task=task)
        pipeline.check_eval_split(cfg)  # validation: every task has it
        cfg.eval.split = "valid"
        with pytest.raises(configlib.ConfigError, match=r"config\.eval\.split: .*'user_a'.*\['train', 'validation'\]"):
            pipeline.check_eval_split(cfg)
    seqio.MixtureRegistry.remove("user_mixture_for_split_check")


def test_a_missing_dataset_is_an_error_that_says_how_to_build_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"synthetic_avqa/tiny_smoke.*tfds build data/builders/synthetic_avqa"):
        pipeline.make_input_iterator(make_config(task="synthetic_avqa_tiny_smoke", tfds_data_dir=str(tmp_path)))


def test_builtin_task_reads_a_built_dataset():
    """Runs where `synthetic_avqa/tiny_smoke` has been built into $TFDS_DATA_DIR (building takes
    longer than this whole file should)."""
    data_dir = os.environ.get("TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets"))
    if not os.path.isdir(os.path.join(data_dir, "synthetic_avqa", "tiny_smoke", tasks.SYNTHETIC_AVQA_VERSION)):
        pytest.skip(f"synthetic_avqa/tiny_smoke is not built in {data_dir}")
    cfg = make_config(task="qa_tiny", tfds_data_dir=data_dir, mixture_rates="synthetic_avqa_tiny_smoke:1")
    batch = next(pipeline.make_input_iterator(cfg, "train", 0, 1))
    assert batch["text_loss_weights"].sum() > 0 and batch["media_mask"].any(axis=1).all()
    cfg = make_config(task="synthetic_avqa_tiny_smoke", tfds_data_dir=data_dir)
    batches = list(pipeline.make_eval_iterator(cfg, "validation", 0, 1))
    assert sum(b["example_valid"].sum() for b in batches) == 10


def test_builtin_task_names_follow_the_builders_configs():
    try:
        from mirasol3b_data.builders.local_media.local_media import Builder as LocalMedia
        from mirasol3b_data.builders.synthetic_avqa.synthetic_avqa import Builder as SyntheticAvqa
    except ImportError as err:
        pytest.skip(f"a builder is not importable: {err}")
    assert {c.name for c in LocalMedia.BUILDER_CONFIGS} == set(
        tasks.LOCAL_MEDIA_MANIFEST_CONFIGS + tasks.LOCAL_MEDIA_PUBLIC_CONFIGS)
    assert {c.name for c in SyntheticAvqa.BUILDER_CONFIGS} == set(tasks.SYNTHETIC_AVQA_CONFIGS)
    assert str(LocalMedia.VERSION) == tasks.LOCAL_MEDIA_VERSION
    assert str(SyntheticAvqa.VERSION) == tasks.SYNTHETIC_AVQA_VERSION


def test_per_text_gives_each_text_of_a_clip_once_with_the_clips_media():
    """A stored clip example (data/spec.py: texts, evidence, int16 audio) -> one example per text, with
    its own evidence spans."""
    texts = [{"prompt": ["what?", "where?", "who?"], "answer": ["a", "b", "c"], "kind": ["qa"] * 3,
              "question_type": ["what", "where", "who"]},
             {"prompt": ["describe the video."], "answer": ["a cat"], "kind": ["caption"], "question_type": [""]}]
    rng = np.random.default_rng(0)
    evidence = [{"text": np.array([2, 0, 2], np.int32), "start": np.array([0.0, 0.25, 0.5], np.float32),
                 "end": np.array([0.25, 0.5, 1.0], np.float32)},
                {k: np.zeros([0], np.int32 if k == "text" else np.float32) for k in ("text", "start", "end")}]
    clips = [{"video": rng.integers(0, 256, (2 * n, SIZE, SIZE, 3), dtype=np.uint8),
              "audio": rng.integers(-32768, 32768, (n * SAMPLES_PER_SNIPPET,), dtype=np.int16),
              "num_snippets": np.int32(n), "audio_missing": False, "source": f"clip{n}", "texts": t, "evidence": e}
             for n, t, e in zip((1, 2), texts, evidence)]
    ds = tf.data.Dataset.from_generator(lambda: iter(clips), output_signature={
        "video": tf.TensorSpec([None, SIZE, SIZE, 3], tf.uint8), "audio": tf.TensorSpec([None], tf.int16),
        "num_snippets": tf.TensorSpec([], tf.int32), "audio_missing": tf.TensorSpec([], tf.bool),
        "source": tf.TensorSpec([], tf.string),
        "texts": {k: tf.TensorSpec([None], tf.string) for k in texts[0]},
        "evidence": {"text": tf.TensorSpec([None], tf.int32), "start": tf.TensorSpec([None], tf.float32),
                     "end": tf.TensorSpec([None], tf.float32)}})
    out = list(tasks.per_text(ds).as_numpy_iterator())
    spans = [e["evidence"].tolist() for e in out]
    assert spans == [[[0.25, 0.5]], [], [[0.0, 0.25], [0.5, 1.0]], []]
    assert [e["prompt"].decode() for e in out] == ["what?", "where?", "who?", "describe the video."]
    assert [e["kind"].decode() for e in out] == ["qa"] * 3 + ["caption"]
    assert [e["source"].decode() for e in out] == ["clip1"] * 3 + ["clip2"]
    for e in out:
        clip = clips[int(e["num_snippets"]) - 1]
        np.testing.assert_array_equal(e["video"], clip["video"])
        assert e["audio"].dtype == np.float32 and np.abs(e["audio"]).max() <= 32768 / 32767
        np.testing.assert_allclose(e["audio"] * 32767, clip["audio"].astype(np.float32), atol=1e-2)
        assert "texts" not in e
    assert pipeline.parse_evidence("0.2500:0.7500 1.0000:1.2500") == ((0.25, 0.75), (1.0, 1.25))
    assert pipeline.parse_evidence("") == ()


def test_a_dataset_built_in_an_older_layout_is_refused_naming_the_version_and_the_rebuild(tmp_path):
    old = tmp_path / "synthetic_avqa" / "tiny_smoke" / "1.1.0"
    old.mkdir(parents=True)
    (old / "dataset_info.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=(
            r"synthetic_avqa/tiny_smoke in .* is version 1\.1\.0, and this release reads "
            + tasks.SYNTHETIC_AVQA_VERSION.replace(".", r"\.") + r" \(versions before .* one example per text.*"
            r"Rebuild it: `tfds build data/builders/synthetic_avqa --config=tiny_smoke --data_dir=" + str(tmp_path))):
        pipeline.make_input_iterator(make_config(task="synthetic_avqa_tiny_smoke", tfds_data_dir=str(tmp_path)))
    (tmp_path / "synthetic_avqa" / "tiny_smoke" / "2.0.0").mkdir()
    (tmp_path / "synthetic_avqa" / "tiny_smoke" / "2.0.0" / "dataset_info.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"is version 1\.1\.0, 2\.0\.0, .*versions before 2\.1\.0 have no "
                                                r"evidence spans"):
        pipeline.make_input_iterator(make_config(task="synthetic_avqa_tiny_smoke", tfds_data_dir=str(tmp_path)))
