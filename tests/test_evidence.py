"""Evidence (mirasol3b/evidence.py) and grounding metrics (mirasol3b/grounding.py): the teacher-forced
answer, the spans, NExT-GQA's IoU/IoP, and that evidence shuffled across questions scores as a
random span does."""

import jax
import numpy as np
import pytest

from mirasol3b import decoding, evidence, grounding
from mirasol3b_data import synthetic

from test_streaming import clip, init, make_config


def test_teacher_forced_scores_the_answer_up_to_its_eos():
    prompts = np.array([[0, 5, 6, 0, 0, 0], [0, 7, 0, 0, 0, 0]], np.int32)  # BOS + prompt, right-padded
    tokens = np.array([[9, 1, 0], [8, 8, 8]], np.int32)  # row 0 ends (EOS=1), row 1 runs out
    inputs, targets, weights = evidence.teacher_forced(prompts, np.array([3, 2]), tokens, eos_id=1, length=16)
    np.testing.assert_array_equal(inputs[0, :5], [0, 5, 6, 9, 1])
    np.testing.assert_array_equal(targets[0, :4], [5, 6, 9, 1])
    np.testing.assert_array_equal(weights[0, :6], [0, 0, 1, 1, 0, 0])  # targets 9 and EOS
    np.testing.assert_array_equal(targets[1, :4], [7, 8, 8, 8])
    np.testing.assert_array_equal(weights[1, :6], [0, 1, 1, 1, 0, 0])


def test_top_spans_grow_from_the_peak_and_skip_padding():
    scores = np.array([0.05, 0.3, 0.25, 0.02, 0.0, 0.38])
    valid = np.array([1, 1, 1, 1, 0, 1], bool)
    spans = evidence.top_spans(scores, valid, 0.5)
    assert spans[0][:2] == (0.5, 1.5) and spans[0][2] == pytest.approx(0.55)  # 0.3 + 0.25 beat 0.38
    assert spans[1][:2] == (2.5, 3.0)
    assert all(not (a < 2.5 and b > 2.0) for a, b, _ in spans)  # the padded snippet is in no span
    assert evidence.top_spans(np.zeros(4), np.ones(4, bool), 0.5) == []


def test_iou_iop_as_nextgqa_scores_them():
    assert grounding.iou_iop((1.0, 3.0), (2.0, 4.0)) == pytest.approx((1 / 3, 1 / 2))
    assert grounding.iou_iop((2.0, 3.0), (1.0, 4.0)) == pytest.approx((1 / 3, 1.0))  # inside: IoP 1
    assert grounding.iou_iop((0.0, 1.0), (2.0, 3.0)) == (0.0, 0.0)
    assert grounding.iou_iop((2.0, 2.0), (1.0, 3.0)) == (0.0, 1.0)  # a point inside
    assert grounding.best_iou_iop((1.0, 2.0), [(5.0, 6.0), (1.0, 2.5)]) == pytest.approx((2 / 3, 1.0))


def _synthetic_truths(n=400, snippets=8):
    qas = [synthetic.generate_qa(0, "validation", i, snippets) for i in range(n)]
    return [[(a * 0.25, b * 0.25) for a, b in synthetic.evidence(q)] for q in qas], snippets * 0.25


def test_true_spans_score_perfectly_and_shuffled_ones_fall_to_the_random_baseline():
    truths, duration = _synthetic_truths()
    right = [True] * len(truths)
    exact = grounding.grounding_metrics([t[0] for t in truths], truths, right, [duration] * len(truths))
    assert exact["grounding/mIoU"] == 1.0 and exact["grounding/Acc@GQA"] == 1.0
    assert exact["grounding_random/mIoU"] < 0.3
    shuffled_spans = [truths[i][0] for i in np.random.default_rng(0).permutation(len(truths))]
    shuffled = grounding.grounding_metrics(shuffled_spans, truths, right, [duration] * len(truths))
    for name in ("mIoU", "mIoP", "Acc@GQA"):
        assert shuffled[f"grounding/{name}"] == pytest.approx(shuffled[f"grounding_random/{name}"], abs=0.05), name
    assert shuffled["grounding/mIoU"] < exact["grounding/mIoU"] / 2


def test_questions_without_true_spans_are_not_scored():
    out = grounding.grounding_metrics([(0.0, 1.0), None], [[], [(0.0, 1.0)]], [True, True], [2.0, 2.0])
    assert out["grounding/num_examples"] == 1 and out["grounding/mIoU"] == 0.0  # no prediction scores 0
    assert grounding.grounding_metrics([(0.0, 1.0)], [[]], [True], [2.0]) == {"grounding/num_examples": 0}


def test_synthetic_evidence_is_where_the_answer_is():
    lay = synthetic.Layout(8, (synthetic.Event("red", 0, 3), synthetic.Event("blue", 4, 6)),
                           (synthetic.Event("low", 1, 3), synthetic.Event("high", 6, 8)))

    def qa(kind, answer, **params):
        template = synthetic.TEMPLATES_BY_TYPE[kind]
        assert synthetic.ask(template, lay, params) == answer
        return synthetic.QA(lay, kind, tuple(sorted(params.items())), "", answer)
    assert synthetic.evidence(qa("video/first_colour", "red")) == ((0, 3),)
    assert synthetic.evidence(qa("audio/last_pitch", "high")) == ((6, 8),)
    assert synthetic.evidence(qa("both/colour_during_tone", "red", pitch="low")) == ((1, 3),)
    assert synthetic.evidence(qa("both/pitch_after_shape", "high", colour="blue")) == ((6, 8),)
    assert synthetic.evidence(qa("both/together", "yes", colour="red", pitch="low")) == ((1, 3),)
    assert synthetic.evidence(qa("both/together", "no", colour="red", pitch="high")) == ((0, 3), (6, 8))


def test_context_evidence_reads_only_what_the_decoder_reads_and_latent_evidence_reaches_back():
    cfg = make_config("transformer", 0, "recent")  # the decoder reads the last 2 real snippets
    video, audio = clip(cfg, batch=2, snippets=5)
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], bool)
    model, params = init(cfg, video, audio, mask)
    prompts = np.zeros((2, cfg.data.text_length), np.int32)
    prompts[:, 1:3] = 104
    batch = {"video": video, "audio": audio, "media_mask": mask, "prompts": prompts,
             "prompt_lengths": np.array([3, 3], np.int32)}
    tokens = np.array([[120, 121, 1, 0], [122, 1, 0, 0]], np.int32)
    context = evidence.make_evidence_fn(model, 1, "context")(params, batch, tokens)
    latents = evidence.make_evidence_fn(model, 1, "latents")(params, batch, tokens)
    for out in (context, latents):
        np.testing.assert_allclose(np.asarray(out["scores"]).sum(1), 1.0, rtol=1e-5)
        assert np.all(np.asarray(out["scores"])[~mask] == 0)  # padding is never evidence
    read = np.array([[0, 0, 0, 1, 1], [0, 1, 1, 0, 0]], bool)
    assert np.all(np.asarray(context["scores"])[~read] == 0) and np.all(np.asarray(context["scores"])[read] > 0)
    # Through the time-aligned model the unread early snippets reach the answer too.
    assert np.all(np.asarray(latents["scores"])[mask & ~read] > 0)
    # Whatever decoded the answer: greedy's and beam search's tokens both get a distribution over the
    # snippets read (each the gradient of its own tokens' log-probability).
    for method in (decoding.DecodeConfig(max_new_tokens=4), decoding.DecodeConfig(method="beam", beam_size=3,
                                                                                  max_new_tokens=4)):
        generated = decoding.make_generate_fn(model, method)(params, batch, jax.random.key(0))["tokens"]
        found = np.asarray(evidence.make_evidence_fn(model, method.eos_id, "context")(params, batch, generated)["scores"])
        np.testing.assert_allclose(found.sum(1), 1.0, rtol=1e-5)
        assert np.all(found[~read] == 0)
    with pytest.raises(ValueError, match="evidence level must be one of"):
        evidence.make_evidence_fn(model, 1, "attention")
