"""The synthetic audio-visual QA dataset: generator properties, the media round trip, a TFDS build."""

import collections
import hashlib

import numpy as np
import pytest

from configs import tiny
from mirasol3b_data import synthetic
from mirasol3b_data.builders.report import skipped_report_path
from mirasol3b_data.builders.synthetic_avqa import Builder, SyntheticAvqaConfig
from mirasol3b_data.builders.synthetic_avqa.synthetic_avqa import _Maker
from mirasol3b_data.spec import MediaSpec

T = MediaSpec.from_config(tiny.get_config()).max_snippets  # snippets per clip at the tiny geometry


def qa_set(split="validation", n=600, num_snippets=T, seed=0):
    return [synthetic.generate_qa(seed, split, i, num_snippets) for i in range(n)]


def clip_digest(frames, audio):
    return hashlib.sha256(frames.tobytes() + audio.tobytes()).hexdigest()


def test_builder_geometry_is_the_tiny_config():
    expected = MediaSpec.from_config(tiny.get_config())
    for name in ("tiny", "tiny_smoke"):
        assert Builder.builder_configs[name].spec == expected, name
    long = MediaSpec.from_config(tiny.get_config("long"))
    assert Builder.builder_configs["long"].spec == long and long.max_snippets == 32


def test_long_clips_spread_their_events_and_ask_about_early_ones():
    n = 32
    qas = qa_set(n=150, num_snippets=n)
    for qa in qas:
        for first, second in (qa.layout.shapes, qa.layout.tones):
            assert first.end <= n // 2 <= second.start, qa.layout
            assert max(first.end - first.start, second.end - second.start) <= n // 4, qa.layout
    assert {qa.question_type for qa in qas} == set(synthetic.TEMPLATES_BY_TYPE)
    # The events asked about start anywhere in their half: the first shape ends 16 or more snippets
    # before the clip does, beyond the last 4 snippets configs/tiny.py:long's decoder reads.
    starts = [qa.layout.shapes[0].start for qa in qas if qa.question_type == "video/first_colour"]
    assert min(starts) < 4 and max(starts) >= 8


def test_same_seed_same_example_other_seed_other_example():
    qa, frames, audio = synthetic.generate_example(0, "train", 7, T)
    again = synthetic.generate_example(0, "train", 7, T)
    assert qa == again[0] and np.array_equal(frames, again[1]) and np.array_equal(audio, again[2])
    assert qa == synthetic.generate_qa(0, "train", 7, T)  # QA alone draws the same as with rendering
    # Shapes at the boundary: the source geometry, whole snippets.
    src = synthetic.SourceSpec()
    assert frames.shape == (T * src.frames_per_snippet, src.image_size, src.image_size, 3) and frames.dtype == np.uint8
    assert audio.shape == (T * src.samples_per_snippet,) and audio.dtype == np.float32
    assert qa_set("train", 30, seed=0) != qa_set("train", 30, seed=1)
    assert clip_digest(*synthetic.generate_example(1, "train", 7, T)[1:]) != clip_digest(frames, audio)


def test_splits_draw_disjoint_clips():
    digests = {split: {clip_digest(*synthetic.generate_example(0, split, i, T)[1:]) for i in range(20)}
               for split in synthetic.SPLITS}
    assert all(len(d) == 20 for d in digests.values())
    assert not (digests["train"] & digests["validation"] or digests["train"] & digests["test"]
                or digests["validation"] & digests["test"])
    with pytest.raises(ValueError, match="split"):
        synthetic.generate_qa(0, "val", 0, T)


def test_answer_set_is_fixed_and_every_answer_is_in_it():
    assert synthetic.ANSWERS == ("red", "green", "blue", "yellow", "low", "mid", "high", "yes", "no")
    for num_snippets in (T, 2 * T):
        qas = qa_set(n=300, num_snippets=num_snippets)
        assert {q.answer for q in qas} == set(synthetic.ANSWERS)
        assert {q.question_type for q in qas} == set(synthetic.TEMPLATES_BY_TYPE)
        assert all(q.question_type.split("/")[0] in ("audio", "video", "both") for q in qas)


def test_majority_answer_baseline_is_at_most_30_percent():
    qas = qa_set(n=600)
    answer, accuracy = synthetic.majority_baseline(qas)
    assert accuracy <= 0.30, (answer, accuracy)
    # Within each template too, no answer dominates (uniform target answers).
    by_type = collections.defaultdict(list)
    for q in qas:
        by_type[q.question_type].append(q.answer)
    for question_type, answers in by_type.items():
        share = collections.Counter(answers).most_common(1)[0][1] / len(answers)
        assert share <= 1 / len(synthetic.TEMPLATES_BY_TYPE[question_type].answers) + 0.15, question_type


def test_single_modality_fraction_is_as_reported():
    assert synthetic.single_modality_fraction() == pytest.approx(2 / 7)
    measured = synthetic.single_modality_fraction(qa_set(n=600))
    assert abs(measured - synthetic.single_modality_fraction()) < 0.06


@pytest.mark.parametrize("num_snippets,n", [(T, 300), (2 * T, 60), (32, 8)])
def test_only_single_modality_questions_are_answerable_from_one_modality(num_snippets, n):
    """`answer_support(keep=m)` tries every layout of the other modality with m's events fixed:
    one answer means m alone answers the question."""
    for qa in qa_set(n=n, num_snippets=num_snippets):
        supports = {m: synthetic.answer_support(qa, keep=m) for m in synthetic.MODALITIES}
        assert all(qa.answer in s for s in supports.values())
        if qa.question_type.startswith("both/"):
            assert all(len(s) >= 2 for s in supports.values()), (qa, supports)
        else:
            own = qa.question_type.split("/")[0]
            other = "audio" if own == "video" else "video"
            assert supports[own] == {qa.answer} and len(supports[other]) >= 2, (qa, supports)


def test_answer_event_is_not_predictable_from_its_span():
    """For both/ colour and pitch questions, the answer is each of its modality's two events equally
    often, even when one lasts longer (no "the longer shape" shortcut from one modality)."""
    longer, first = [], []
    for qa in qa_set(n=1500):
        if qa.question_type.startswith("both/") and qa.answer not in ("yes", "no"):
            events = qa.layout.events("video" if qa.answer in synthetic.COLOURS else "audio")
            answer_event = next(e for e in events if e.attr == qa.answer)
            first.append(answer_event is events[0])
            lengths = [e.end - e.start for e in events]
            if lengths[0] != lengths[1]:
                longer.append(answer_event.end - answer_event.start == max(lengths))
    assert abs(np.mean(first) - 0.5) < 0.07 and abs(np.mean(longer) - 0.5) < 0.08, (np.mean(first), np.mean(longer))


def _colour_fraction(frames, colour, tolerance=60):
    """[frames] fraction of pixels within `tolerance` of `colour` in every channel."""
    return (np.abs(frames.astype(int) - np.array(colour)).max(-1) < tolerance).mean(axis=(1, 2))


def _stored_media(example):
    """The (video uint8, audio float32) that training reads from a stored example."""
    import tensorflow as tf

    from mirasol3b_data.storage import AUDIO_SCALE

    video = np.stack([tf.io.decode_image(frame, channels=3).numpy() for frame in example["video"]])
    return video, example["audio"].astype(np.float32) / AUDIO_SCALE


def test_events_are_where_they_should_be_after_encode_and_decode():
    """The builder's path (render -> mp4 -> decode_clip at the tiny geometry -> stored images and
    int16): in each snippet a shape is visible exactly when its event says so, and a playing tone is
    the spectral peak."""
    cfg = Builder.builder_configs["tiny_smoke"]
    spec = cfg.spec
    made = _Maker(cfg)(("validation", range(3)))
    assert [key for key, _ in made] == [synthetic.source_id(cfg.seed, "validation", i) for i in range(3)]
    for index, (_, example) in enumerate(made):
        qa = synthetic.generate_qa(cfg.seed, "validation", index, spec.max_snippets)
        assert [(t["prompt"], t["answer"]) for t in example["texts"]] == [(qa.question, qa.answer)]
        video, audio = _stored_media(example)
        video = video.reshape(spec.max_snippets, spec.snippet_frames, *video.shape[1:])
        audio = audio.reshape(spec.max_snippets, spec.samples_per_snippet)
        for snippet in range(spec.max_snippets):
            for shape in qa.layout.shapes:
                present = _colour_fraction(video[snippet], synthetic.COLOURS[shape.attr])
                if shape.start <= snippet < shape.end:
                    assert (present > 0.03).all(), (index, snippet, shape, present)
                else:
                    assert (present < 0.005).all(), (index, snippet, shape, present)
            playing = [t for t in qa.layout.tones if t.start <= snippet < t.end]
            samples = audio[snippet]
            if playing:
                spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
                peak = np.fft.rfftfreq(len(samples), 1 / spec.sample_rate)[spectrum.argmax()]
                assert abs(peak - synthetic.PITCHES[playing[0].attr]) < 20, (index, snippet, playing, peak)
            else:
                assert np.sqrt(np.mean(samples**2)) < 0.02, (index, snippet)


def test_more_questions_are_distinct_well_posed_questions_about_the_same_clip():
    rng = np.random.default_rng(0)
    for index in range(30):
        qa = synthetic.generate_qa(0, "train", index, 4)
        extra = synthetic.extra_questions(0, "train", index, qa, 5)
        assert extra == synthetic.extra_questions(0, "train", index, qa, 5)  # deterministic
        keys = [(q.question_type, q.params) for q in [qa, *extra]]
        assert len(set(keys)) == len(keys) == 6
        for q in extra:
            assert q.layout == qa.layout
            assert q.answer == synthetic.ask(q.template, q.layout, dict(q.params)) is not None
    qa = synthetic.sample_qa(rng, 4)
    everything = synthetic.well_posed_questions(qa.layout)
    assert len(synthetic.more_questions(rng, qa, 1000)) == len(everything) - 1


def test_training_clips_carry_extra_questions_and_evaluation_clips_one():
    import dataclasses

    cfg = dataclasses.replace(Builder.builder_configs["tiny_smoke"], train_questions_per_clip=3)
    train = _Maker(cfg)(("train", range(2)))
    assert [key for key, _ in train] == [synthetic.source_id(cfg.seed, "train", i) for i in range(2)]
    for index, (_, example) in enumerate(train):  # each clip once, with its questions
        texts = example["texts"]
        first = synthetic.generate_qa(cfg.seed, "train", index, cfg.spec.max_snippets)
        assert (texts[0]["prompt"], texts[0]["answer"]) == (first.question, first.answer)
        assert len(texts) == 3 and len({t["prompt"] for t in texts}) == 3
        assert {t["kind"] for t in texts} == {"qa"}
    assert [len(example["texts"]) for _, example in _Maker(cfg)(("validation", range(2)))] == [1, 1]


def test_tiny_smoke_builds_and_loads(tmp_path, capsys):
    import tensorflow_datasets as tfds

    builder = Builder(config="tiny_smoke", data_dir=str(tmp_path))
    builder.download_and_prepare()
    cfg, spec = builder.builder_config, builder.builder_config.spec
    assert ("synthetic_avqa/tiny_smoke: kept 60 clips with 60 texts (train 40 with 40, validation 10 with 10, test 10 "
            "with 10), skipped 0") in capsys.readouterr().out
    assert skipped_report_path(builder).read_text() == ""
    for split, size in cfg.split_sizes.items():
        examples = list(tfds.as_numpy(builder.as_dataset(split=split)))
        assert len(examples) == size
        for ex in examples:
            assert ex["video"].shape == (spec.num_frames, spec.image_size, spec.image_size, 3)
            assert ex["video"].dtype == np.uint8
            assert ex["audio"].shape == (spec.max_snippets * spec.samples_per_snippet,)
            assert ex["audio"].dtype == np.int16
            assert ex["num_snippets"] == spec.max_snippets and not ex["audio_missing"]
            texts = ex["texts"]
            assert list(texts["kind"]) == [b"qa"] and texts["answer"][0].decode() in synthetic.ANSWERS
            assert texts["question_type"][0].decode() in synthetic.TEMPLATES_BY_TYPE
        # Sources are unique, and each example is the generator's for its index.
        sources = sorted(ex["source"].decode() for ex in examples)
        assert sources == sorted(synthetic.source_id(cfg.seed, split, i) for i in range(size))
        ex = examples[0]
        index = int(ex["source"].decode().rsplit("/", 1)[1])
        question = synthetic.generate_qa(cfg.seed, split, index, spec.max_snippets).question
        assert ex["texts"]["prompt"][0].decode() == question


def test_config_rejects_a_bad_geometry_or_size():
    with pytest.raises(ValueError, match="whole"):
        SyntheticAvqaConfig(name="bad", source_sample_rate=22_050)  # 5512.5 samples per 0.25 s snippet
    with pytest.raises(ValueError, match="split"):
        SyntheticAvqaConfig(name="bad", test_size=0)
    with pytest.raises(ValueError, match="snippets"):
        SyntheticAvqaConfig(name="bad", num_frames=4)  # 2 snippets: too short for the "*_after_*" questions
