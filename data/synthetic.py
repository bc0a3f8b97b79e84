"""Procedural audio-visual QA clips: the `synthetic_avqa` dataset's generator (numpy only).

A clip is `num_snippets` snippets long. It holds exactly two shapes of different colours and two
tones of different pitches; every event spans whole snippets, and the two events of one modality
never overlap, so "the first shape" or "the shape while the high tone played" name one event. In
long clips (`LONG_SNIPPETS`) each modality's first event lies in the first half, its second in the
second half.

Questions come from `TEMPLATES`. Each template's `question_type` starts with the modalities its
answer needs ("video/", "audio/" or "both/"), and every answer lies in the fixed `ANSWERS`.
Sampling is two-stage so QA can be studied without rendering:
  `generate_qa(seed, split, index, num_snippets)`  -> `QA`   (layout of events, question, answer)
  `render(layout, rng, source)`                   -> frames uint8 [N, H, W, 3], audio float32 [M]
`generate_example` does both from one (seed, split, index) stream.

Templates are drawn uniformly, so 2 of 7 (`single_modality_fraction()`) can be answered from one
modality: "video/first_colour" and "audio/last_pitch". The `both/` ones cannot: the other modality
always holds a distractor (a second colour, a second pitch), so `answer_support(qa, keep=...)`,
which tries every layout of the modality not kept, finds more than one answer (tests check this).
There is no "which came first, the red shape or the high tone?": whatever the layouts, the earliest
onset a question can name answers it from its own modality alone; the `*_after_*` templates ask
about order through the other modality instead.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections import Counter
from collections.abc import Callable, Iterable, Sequence

import numpy as np

COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 80, 230), "yellow": (235, 215, 40)}
PITCHES = {"low": 300.0, "mid": 800.0, "high": 2000.0}  # Hz
ANSWERS = (*COLOURS, *PITCHES, "yes", "no")
_ATTRS = {*COLOURS, *PITCHES}
SPLITS = ("train", "validation", "test")
MODALITIES = ("video", "audio")
# Distinct streams per split: a (seed, split, index) triple never repeats across splits.
_SPLIT_IDS = {name: i for i, name in enumerate(SPLITS)}
_MAX_TRIES = 10_000
# An "*_after_*" question needs a first event after snippet 0 and a second one after that.
MIN_SNIPPETS = 3
# Clips of at least this many snippets spread their events over the whole clip: each modality's
# first event lies in the first half and its second in the second half, each at most a quarter of
# the clip long. Questions about the first events then ask about the clip's early part, far behind
# the last snippets a bounded streaming model reads (docs/streaming.md).
LONG_SNIPPETS = 16


@dataclasses.dataclass(frozen=True)
class Event:
    """One shape (attr = colour) or tone (attr = pitch) over snippets [start, end)."""

    attr: str
    start: int
    end: int

    def overlaps(self, other: "Event") -> bool:
        return self.start < other.end and other.start < self.end


@dataclasses.dataclass(frozen=True)
class Layout:
    """What a clip shows: two shapes and two tones, each pair in time order."""

    num_snippets: int
    shapes: tuple[Event, Event]
    tones: tuple[Event, Event]

    def events(self, modality: str) -> tuple[Event, Event]:
        return self.shapes if modality == "video" else self.tones

    def replace(self, modality: str, events: tuple[Event, Event]) -> "Layout":
        return dataclasses.replace(self, **{"shapes" if modality == "video" else "tones": events})

    def shape(self, colour: str) -> Event | None:
        return next((e for e in self.shapes if e.attr == colour), None)

    def tone(self, pitch: str) -> Event | None:
        return next((e for e in self.tones if e.attr == pitch), None)


# ---- question templates -----------------------------------------------------------------------

def _only(events: Sequence[Event]) -> Event | None:
    return events[0] if len(events) == 1 else None


def _colour_during_tone(lay: Layout, pitch: str) -> str | None:
    tone = lay.tone(pitch)
    shape = tone and _only([s for s in lay.shapes if s.overlaps(tone)])
    return shape.attr if shape else None


def _pitch_during_shape(lay: Layout, colour: str) -> str | None:
    shape = lay.shape(colour)
    tone = shape and _only([t for t in lay.tones if t.overlaps(shape)])
    return tone.attr if tone else None


def _colour_after_tone(lay: Layout, pitch: str) -> str | None:
    tone = lay.tone(pitch)
    # A first shape at snippet 0 can never follow a tone; allowing it would let video alone rule
    # that shape out, so such clips don't get this question.
    if not tone or lay.shapes[0].start == 0:
        return None
    return next((s.attr for s in lay.shapes if s.start > tone.start), None)


def _pitch_after_shape(lay: Layout, colour: str) -> str | None:
    shape = lay.shape(colour)
    if not shape or lay.tones[0].start == 0:  # as above, with the modalities swapped
        return None
    return next((t.attr for t in lay.tones if t.start > shape.start), None)


def _together(lay: Layout, colour: str, pitch: str) -> str | None:
    shape, tone = lay.shape(colour), lay.tone(pitch)
    return None if not (shape and tone) else ("yes" if shape.overlaps(tone) else "no")


@dataclasses.dataclass(frozen=True)
class Template:
    """A question form. `answer(layout, **params)` is None where the question is ill-posed."""

    question_type: str
    text: str  # formatted with params: "colour" names a shape of the clip, "pitch" a tone
    params: tuple[str, ...]
    answers: tuple[str, ...]  # what it can answer; sampling is uniform over these
    answer: Callable[..., str | None]

    @property
    def modality(self) -> str:
        return self.question_type.split("/")[0]


TEMPLATES = (
    Template("video/first_colour", "what colour was the first shape?", (), tuple(COLOURS),
             lambda lay: lay.shapes[0].attr),
    Template("audio/last_pitch", "what pitch was the last tone?", (), tuple(PITCHES),
             lambda lay: lay.tones[1].attr),
    Template("both/colour_during_tone", "what colour was the shape while the {pitch} tone played?", ("pitch",),
             tuple(COLOURS), _colour_during_tone),
    Template("both/pitch_during_shape", "what pitch was the tone while the {colour} shape was visible?",
             ("colour",), tuple(PITCHES), _pitch_during_shape),
    Template("both/colour_after_tone", "what colour was the next shape to appear after the {pitch} tone started?",
             ("pitch",), tuple(COLOURS), _colour_after_tone),
    Template("both/pitch_after_shape", "what pitch was the next tone to start after the {colour} shape appeared?",
             ("colour",), tuple(PITCHES), _pitch_after_shape),
    Template("both/together", "did the {pitch} tone play while the {colour} shape was visible?",
             ("colour", "pitch"), ("yes", "no"), _together),
)
TEMPLATES_BY_TYPE = {t.question_type: t for t in TEMPLATES}
assert all(set(t.answers) <= set(ANSWERS) for t in TEMPLATES)


@dataclasses.dataclass(frozen=True)
class QA:
    layout: Layout
    question_type: str
    params: tuple[tuple[str, str], ...]  # sorted (name, value) pairs the text names: hashable
    question: str
    answer: str

    @property
    def template(self) -> Template:
        return TEMPLATES_BY_TYPE[self.question_type]


def ask(template: Template, layout: Layout, params: dict[str, str]) -> str | None:
    return template.answer(layout, **params)


# ---- sampling ---------------------------------------------------------------------------------

@functools.cache
def _span_pairs(num_snippets: int) -> tuple[tuple[int, int, int, int], ...]:
    """All (a1, b1, a2, b2) with 0 <= a1 < b1 <= a2 < b2 <= T: two disjoint spans in time order.
    Long clips (`LONG_SNIPPETS`) spread them: the first in the first half, the second in the
    second, each at most a quarter of the clip long."""
    if num_snippets >= LONG_SNIPPETS:
        half, longest = num_snippets // 2, num_snippets // 4

        def spans(lo: int, hi: int) -> list[tuple[int, int]]:
            return [(a, b) for a in range(lo, hi) for b in range(a + 1, min(hi, a + longest) + 1)]
        return tuple(first + second for first in spans(0, half) for second in spans(half, num_snippets))
    r = range(num_snippets + 1)
    return tuple((a1, b1, a2, b2) for a1, b1, a2, b2 in itertools.product(r, r, r, r)
                 if a1 < b1 <= a2 < b2)


@functools.cache
def modality_layouts(modality: str, num_snippets: int) -> tuple[tuple[Event, Event], ...]:
    """Every event pair one modality can hold; layouts are sampled uniformly from these."""
    names = COLOURS if modality == "video" else PITCHES
    return tuple((Event(x, a1, b1), Event(y, a2, b2))
                 for a1, b1, a2, b2 in _span_pairs(num_snippets)
                 for x, y in itertools.permutations(names, 2))


def sample_layout(rng: np.random.Generator, num_snippets: int) -> Layout:
    shapes, tones = (modality_layouts(m, num_snippets) for m in MODALITIES)
    return Layout(num_snippets, shapes[rng.integers(len(shapes))], tones[rng.integers(len(tones))])


def _stream(seed: int, split: str, index: int) -> tuple[np.random.Generator, np.random.Generator]:
    """Independent (qa, render) generators, so QA is the same whether or not the clip is rendered."""
    if split not in _SPLIT_IDS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    qa_seq, render_seq = np.random.SeedSequence([seed, _SPLIT_IDS[split], index]).spawn(2)
    return np.random.default_rng(qa_seq), np.random.default_rng(render_seq)


def _drawn_first(template: Template, rng: np.random.Generator) -> str:
    """The modality holding the answer (random for yes/no): drawn before the answer is imposed."""
    answers = set(template.answers)
    if answers <= set(COLOURS):
        return "video"
    if answers <= set(PITCHES):
        return "audio"
    return MODALITIES[rng.integers(2)]


def sample_qa(rng: np.random.Generator, num_snippets: int, inner_tries: int = 200) -> QA:
    """A uniform template and target answer; the answer's modality, then the other one until it fits.

    Drawing the answer's modality first makes each of its two events equally likely to be the
    answer whatever their spans, so e.g. the longer shape is no better a guess from video alone.
    """
    if num_snippets < MIN_SNIPPETS:
        raise ValueError(f"clips need >= {MIN_SNIPPETS} snippets for every template, got {num_snippets}")
    template = TEMPLATES[rng.integers(len(TEMPLATES))]
    first = _drawn_first(template, rng)
    second = "audio" if first == "video" else "video"
    # The other modality cannot change a single-modality answer: one try tells.
    tries = inner_tries if template.modality == "both" else 1
    others = modality_layouts(second, num_snippets)
    for _ in range(_MAX_TRIES):
        layout = sample_layout(rng, num_snippets)
        target = template.answers[rng.integers(len(template.answers))]
        if target in _ATTRS and target not in {e.attr for e in layout.events(first)}:
            continue  # cheap early out: a colour (pitch) answer must be a shape (tone) of the clip
        for _ in range(tries):
            layout = layout.replace(second, others[rng.integers(len(others))])
            # Questions name events the clip holds; which one is uniform.
            params = {"colour": layout.shapes[rng.integers(2)].attr, "pitch": layout.tones[rng.integers(2)].attr}
            params = {k: params[k] for k in template.params}
            if ask(template, layout, params) == target:
                return QA(layout, template.question_type, tuple(sorted(params.items())),
                          template.text.format(**params), target)
    raise RuntimeError(f"{template.question_type}: no layout of {num_snippets} snippets gave an answer")


# ---- where each answer is seen or heard -------------------------------------------------------

def _overlap(a: Event, b: Event) -> tuple[int, int]:
    return max(a.start, b.start), min(a.end, b.end)


def evidence(qa: QA) -> tuple[tuple[int, int], ...]:
    """The snippet spans [start, end) the answer rests on, as NExT-GQA annotates them: the moment
    the answer is seen or heard, where the question's condition holds. "during" and "together: yes":
    where the two events overlap; "after" and first/last: the answering event; "together: no": both
    events (either one locates the answer, as NExT-GQA's several segments of one question do)."""
    lay, params, kind = qa.layout, dict(qa.params), qa.question_type.split("/")[1]
    if kind == "first_colour":
        return ((lay.shapes[0].start, lay.shapes[0].end),)
    if kind == "last_pitch":
        return ((lay.tones[1].start, lay.tones[1].end),)
    if kind in ("colour_during_tone", "colour_after_tone"):
        cue, answer = lay.tone(params["pitch"]), lay.shape(qa.answer)
    elif kind in ("pitch_during_shape", "pitch_after_shape"):
        cue, answer = lay.shape(params["colour"]), lay.tone(qa.answer)
    elif kind == "together":
        shape, tone = lay.shape(params["colour"]), lay.tone(params["pitch"])
        return (_overlap(shape, tone),) if qa.answer == "yes" else tuple(
            sorted({(shape.start, shape.end), (tone.start, tone.end)}))
    else:
        raise ValueError(f"no evidence rule for question type {qa.question_type!r}")
    return (_overlap(cue, answer),) if kind.endswith("during_tone") or kind.endswith("during_shape") else (
        (answer.start, answer.end),)


def well_posed_questions(layout: Layout) -> list[QA]:
    """Every (template, params) question the layout answers, in a fixed order."""
    out = []
    for template in TEMPLATES:
        choices = {"colour": [e.attr for e in layout.shapes], "pitch": [e.attr for e in layout.tones]}
        for values in itertools.product(*(choices[name] for name in template.params)):
            params = dict(zip(template.params, values))
            answer = ask(template, layout, params)
            if answer is not None:
                out.append(QA(layout, template.question_type, tuple(sorted(params.items())),
                              template.text.format(**params), answer))
    return out


def more_questions(rng: np.random.Generator, qa: QA, count: int) -> list[QA]:
    """Up to `count` further questions about `qa`'s clip, distinct from it and from each other.

    Training-only extras: a clip is far dearer to render and encode than a question, and several
    questions about one clip make the answer depend on the question as well as on the media. They
    are drawn uniformly from the well-posed questions, without `sample_qa`'s answer balancing, so
    evaluation splits keep one balanced question per clip.
    """
    pool = [q for q in well_posed_questions(qa.layout) if (q.question_type, q.params) != (qa.question_type, qa.params)]
    picks = rng.permutation(len(pool))[:count]
    return [pool[i] for i in sorted(picks)]


def generate_qa(seed: int, split: str, index: int, num_snippets: int) -> QA:
    return sample_qa(_stream(seed, split, index)[0], num_snippets)


def source_id(seed: int, split: str, index: int) -> str:
    return f"synthetic_avqa/seed{seed}/{split}/{index:07d}"


# ---- what one modality alone can tell -----------------------------------------------------------

def answer_support(qa: QA, keep: str) -> set[str]:
    """Answers the question can have over every layout that shares `keep`'s events with `qa` (the
    generator can draw each of them: every layout where the question is well-posed).

    A singleton means `keep` alone answers it; anything larger means the other modality is needed.
    """
    other = "audio" if keep == "video" else "video"
    params = dict(qa.params)
    answers = (ask(qa.template, qa.layout.replace(other, ev), params)
               for ev in modality_layouts(other, qa.layout.num_snippets))
    return {a for a in answers if a is not None}


def single_modality_fraction(qas: Iterable[QA] | None = None) -> float:
    """Fraction of questions answerable from one modality (type "audio/..." or "video/...").

    Without `qas`: the expected value by construction (templates are drawn uniformly).
    """
    types = [q.question_type for q in qas] if qas is not None else [t.question_type for t in TEMPLATES]
    return sum(not t.startswith("both/") for t in types) / len(types)


def majority_baseline(qas: Sequence[QA]) -> tuple[str, float]:
    """The most common answer and its accuracy if always predicted."""
    answer, count = Counter(q.answer for q in qas).most_common(1)[0]
    return answer, count / len(qas)


# ---- rendering --------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """Geometry the clips are rendered at, before encoding (finer than the model's, so decoding
    really resamples frames, resizes and resamples audio)."""

    snippet_seconds: float = 0.25
    fps: int = 24
    image_size: int = 64
    sample_rate: int = 44_100

    @property
    def frames_per_snippet(self) -> int:
        return self._whole(self.fps, "fps")

    @property
    def samples_per_snippet(self) -> int:
        return self._whole(self.sample_rate, "sample_rate")

    def _whole(self, rate: int, name: str) -> int:
        n = rate * self.snippet_seconds
        if abs(n - round(n)) > 1e-9:
            raise ValueError(f"SourceSpec.{name}={rate} gives {n} per {self.snippet_seconds} s snippet, not whole")
        return round(n)


def _snippet_mask(events: Sequence[Event], count: int, per_snippet: int) -> np.ndarray:
    """[len(events), count] bool: whether each event is on at each frame/sample."""
    snippet = np.arange(count) // per_snippet
    return np.stack([(e.start <= snippet) & (snippet < e.end) for e in events])


def render_video(shapes: Sequence[Event], num_frames: int, rng: np.random.Generator,
                 source: SourceSpec) -> np.ndarray:
    """uint8 [num_frames, S, S, 3]: each shape (square or circle) glides across its snippets."""
    s = source.image_size
    background = rng.integers(15, 70)
    frames = np.full((num_frames, s, s, 3), background, np.uint8)
    on = _snippet_mask(shapes, num_frames, source.frames_per_snippet)
    yy, xx = np.mgrid[0:s, 0:s] + 0.5
    for shape, visible in zip(shapes, on):
        radius = rng.uniform(0.16, 0.24) * s
        start, end = rng.uniform(radius, s - radius, size=(2, 2))  # centre path, kept inside the frame
        frame_ids = np.flatnonzero(visible)
        progress = np.linspace(0.0, 1.0, len(frame_ids))[:, None]
        centres = start + (end - start) * progress  # [n, (y, x)]
        dy = yy[None] - centres[:, 0, None, None]
        dx = xx[None] - centres[:, 1, None, None]
        if rng.integers(2):
            mask = dy**2 + dx**2 <= radius**2
        else:
            mask = np.maximum(abs(dy), abs(dx)) <= radius
        frames[frame_ids] = np.where(mask[..., None], np.array(COLOURS[shape.attr], np.uint8), frames[frame_ids])
    return frames


def render_audio(tones: Sequence[Event], num_samples: int, rng: np.random.Generator,
                 source: SourceSpec) -> np.ndarray:
    """float32 [num_samples]: sine tones over faint noise, ramped so onsets don't click across bands."""
    sr = source.sample_rate
    audio = rng.normal(0.0, 0.003, num_samples)
    t = np.arange(num_samples) / sr
    ramp = int(0.01 * sr)
    for tone, on in zip(tones, _snippet_mask(tones, num_samples, source.samples_per_snippet)):
        idx = np.flatnonzero(on)
        env = np.ones(len(idx))
        fade = 0.5 - 0.5 * np.cos(np.linspace(0.0, np.pi, ramp))
        env[:ramp] *= fade
        env[-ramp:] *= fade[::-1]
        amp = rng.uniform(0.2, 0.4)
        audio[idx] += amp * env * np.sin(2 * np.pi * PITCHES[tone.attr] * t[idx] + rng.uniform(0, 2 * np.pi))
    return audio.astype(np.float32)


def render(layout: Layout, rng: np.random.Generator, source: SourceSpec) -> tuple[np.ndarray, np.ndarray]:
    """(frames uint8 [N, S, S, 3], audio float32 [M]) at the source geometry, N = T * fps * snippet_seconds."""
    snippets = layout.num_snippets
    return (render_video(layout.shapes, snippets * source.frames_per_snippet, rng, source),
            render_audio(layout.tones, snippets * source.samples_per_snippet, rng, source))


def generate_example(seed: int, split: str, index: int, num_snippets: int,
                     source: SourceSpec = SourceSpec()) -> tuple[QA, np.ndarray, np.ndarray]:
    """(qa, frames, audio) for one (seed, split, index); identical on every call."""
    qa_rng, render_rng = _stream(seed, split, index)
    qa = sample_qa(qa_rng, num_snippets)
    frames, audio = render(qa.layout, render_rng, source)
    return qa, frames, audio


def extra_questions(seed: int, split: str, index: int, qa: QA, count: int) -> list[QA]:
    """`more_questions` for example (seed, split, index) from a stream of its own, so `qa` and the
    clip are the same whatever `count` is."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_IDS[split], index, 1]))
    return more_questions(rng, qa, count)
