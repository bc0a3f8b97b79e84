"""Task examples -> the model batch (docs/design.md, "The batch"), one example at a time (batching is the pipeline's).

Task features in (what `data/tasks.py` outputs):
  prompt        int32 [P]            token ids, no EOS
  answer        int32 [A]            token ids, no EOS (appended here)
  video         uint8 [f, H, W, 3]   f = num_snippets * frames_per_snippet
  audio         float32 [s]          s = num_snippets * samples_per_snippet
  num_snippets  int32 []

Model features out (L = text length, F frames, S samples, T snippets):
  video              uint8 [F, H, W, 3]  zero-padded
  audio              float32 [S]         zero-padded
  media_mask         bool [T]            True for the first num_snippets snippets
  text_inputs        int32 [L]           BOS(0) + prompt + answer      (= targets shifted right)
  text_targets       int32 [L]           prompt + answer + EOS
  text_loss_weights  float32 [L]         1 on answer tokens and EOS, 0 on prompt and padding
  prompts            int32 [L]           BOS + prompt, right-padded    (what decoding.generate takes)
  prompt_lengths     int32 []            1 + the prompt tokens in `prompts`
  truncation         int32 []            NOT_TRUNCATED / PROMPT_TRUNCATED / ANSWER_TRUNCATED

The last three are for evaluation and bookkeeping; the model reads its keys by name and ignores them.
seqio's `passthrough_features` are copied unchanged (the eval pipeline carries host-side strings so).

Truncation, when prompt + answer + EOS exceed L: the answer and its EOS are what is scored, so they
are kept whole and the prompt loses its *start* (the end of a question is usually what it asks).
If even answer + EOS do not fit, the prompt is dropped, the answer keeps its first L tokens and no
EOS is appended (the answer did not end there). `truncation` records which happened; the pipeline
counts and logs it, so no example loses its EOS unreported. `prompts` (what evaluation asks) never
depends on the answer: it keeps the prompt's last L - 1 tokens, as `mirasol3b.answer` does with no
answer, so neither the reference's length nor its absence changes the question the model sees.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import ml_collections
import seqio
import tensorflow as tf

from mirasol3b_data.spec import MediaSpec
from mirasol3b_data.vocab import BOS_ID, EOS_ID, PAD_ID

NOT_TRUNCATED, PROMPT_TRUNCATED, ANSWER_TRUNCATED = 0, 1, 2
TEXT_FEATURES = ("prompt", "answer")

_Spec = seqio.FeatureConverter.FeatureSpec


def task_feature_lengths(config: ml_collections.ConfigDict) -> dict[str, int]:
    """The converter's `task_feature_lengths` for a model config.

    `prompt` and `answer` both get the text length L: together (+ EOS) they are cut to fit it.
    `num_snippets` gets T, the number of snippets the model sees.
    """
    spec = MediaSpec.from_config(config)
    text = config.data.text_length
    return {"prompt": text, "answer": text, "video": spec.num_frames,
            "audio": spec.max_snippets * spec.samples_per_snippet, "num_snippets": spec.max_snippets}


def _pad_to(x: tf.Tensor, length: int, value=0) -> tf.Tensor:
    """Right-pads dimension 0 of `x` to `length` (callers assert that x is not longer)."""
    paddings = [[0, tf.maximum(length - tf.shape(x)[0], 0)]] + [[0, 0]] * (x.shape.rank - 1)
    out = tf.pad(x, paddings, constant_values=value)[:length]
    return tf.ensure_shape(out, [length] + x.shape.as_list()[1:])


def build_text(prompt: tf.Tensor, answer: tf.Tensor, length: int) -> dict[str, tf.Tensor]:
    """The text features of one example (see the module docstring); `prompt`, `answer` int32 [n]."""
    p, a = tf.size(prompt), tf.size(answer)
    answer_fits = a + 1 <= length
    answer = answer[:length]
    eos = tf.fill([tf.cast(answer_fits, tf.int32)], EOS_ID)
    kept = tf.minimum(p, tf.maximum(length - 1 - a, 0))
    asked = tf.minimum(p, length - 1)
    question = prompt[p - asked:]  # what evaluation asks: independent of the answer
    prompt = prompt[p - kept:]  # drops the prompt's start
    targets = tf.concat([prompt, answer, eos], 0)
    inputs = tf.concat([[BOS_ID], targets], 0)[:tf.size(targets)]
    weights = tf.concat([tf.zeros([kept], tf.float32), tf.ones([tf.size(answer) + tf.size(eos)], tf.float32)], 0)
    truncation = tf.where(answer_fits, tf.where(kept < p, PROMPT_TRUNCATED, NOT_TRUNCATED), ANSWER_TRUNCATED)
    return {
        "text_inputs": _pad_to(inputs, length, PAD_ID),
        "text_targets": _pad_to(targets, length, PAD_ID),
        "text_loss_weights": _pad_to(weights, length),
        "prompts": _pad_to(tf.concat([[BOS_ID], question], 0), length, PAD_ID),
        "prompt_lengths": asked + 1,
        "truncation": tf.cast(truncation, tf.int32),
    }


class Mirasol3BFeatureConverter(seqio.FeatureConverter):
    """Pads media to the model's window, builds decoder text with BOS/EOS and loss weights.

    Unpacked only (one clip per row: packing would mix media). `task_feature_lengths` come from
    `task_feature_lengths(config)`; the frames and samples per snippet follow from them.
    """

    TASK_FEATURES: ClassVar = {
        "prompt": _Spec(dtype=tf.int32),
        "answer": _Spec(dtype=tf.int32),
        "video": _Spec(dtype=tf.uint8, rank=4),
        "audio": _Spec(dtype=tf.float32),
        "num_snippets": _Spec(dtype=tf.int32, rank=0),
    }
    MODEL_FEATURES: ClassVar = {
        "video": _Spec(dtype=tf.uint8, rank=4),
        "audio": _Spec(dtype=tf.float32),
        "media_mask": _Spec(dtype=tf.bool),
        "text_inputs": _Spec(dtype=tf.int32),
        "text_targets": _Spec(dtype=tf.int32),
        "text_loss_weights": _Spec(dtype=tf.float32),
        "prompts": _Spec(dtype=tf.int32),
        "prompt_lengths": _Spec(dtype=tf.int32, rank=0),
        "truncation": _Spec(dtype=tf.int32, rank=0),
    }
    PACKING_FEATURE_DTYPES = None

    def __init__(self, pack: bool = False, **kwargs):
        if pack:
            raise ValueError("Mirasol3BFeatureConverter does not pack: each row holds one clip and its text")
        super().__init__(pack=False, bos_id=BOS_ID, **kwargs)

    def _validate_dataset(self, ds, expected_features, expected_lengths, strict, error_label):
        # Input lengths are not an error here: text is truncated, and media longer than the
        # model's window gets an assertion naming the config field in `_convert_features`.
        if not strict:
            expected_lengths = {}
        return super()._validate_dataset(ds, expected_features, expected_lengths, strict, error_label)

    def _convert_features(self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
        lengths = self.get_model_feature_lengths(task_feature_lengths)
        frames, samples, snippets = lengths["video"], lengths["audio"], lengths["media_mask"]
        frames_per_snippet, samples_per_snippet = frames // snippets, samples // snippets

        def convert(ex):
            n = ex["num_snippets"]
            checks = [
                tf.debugging.assert_less_equal(
                    n, snippets, message=f"an example holds more snippets than the model's {snippets} "
                    f"(config.data.num_frames = {frames}); rebuild the dataset with at most that many frames"),
                tf.debugging.assert_equal(
                    tf.shape(ex["video"])[0], n * frames_per_snippet,
                    message=f"video frames != num_snippets x {frames_per_snippet} (the model's snippet_frames)"),
                tf.debugging.assert_equal(
                    tf.size(ex["audio"]), n * samples_per_snippet,
                    message=f"audio samples != num_snippets x {samples_per_snippet} (samples per snippet)"),
            ]
            with tf.control_dependencies(checks):
                out = {
                    "video": _pad_to(ex["video"], frames),
                    "audio": _pad_to(ex["audio"], samples),
                    "media_mask": tf.range(snippets) < n,
                }
            out.update(build_text(ex["prompt"], ex["answer"], lengths["text_targets"]))
            out.update({k: ex[k] for k in self._passthrough_features})
            return out

        return ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE)

    def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]) -> dict[str, int]:
        text, snippets = task_feature_lengths["prompt"], task_feature_lengths["num_snippets"]
        if task_feature_lengths["answer"] != text:
            raise ValueError(f"task_feature_lengths: 'prompt' and 'answer' share the text length, got {text} and "
                             f"{task_feature_lengths['answer']}")
        for key in ("video", "audio"):
            if task_feature_lengths[key] % snippets:
                raise ValueError(f"task_feature_lengths[{key!r}] ({task_feature_lengths[key]}) is not a whole "
                                 f"number of snippets ({snippets})")
        return {"video": task_feature_lengths["video"], "audio": task_feature_lengths["audio"],
                "media_mask": snippets, "text_inputs": text, "text_targets": text, "text_loss_weights": text,
                "prompts": text, "prompt_lengths": 1, "truncation": 1,
                **{k: task_feature_lengths[k] for k in self._passthrough_features}}
