"""One answer and its evidence on one page: the clip's frames, its log-mel spectrogram and the
evidence score per snippet on one time axis, drawn with matplotlib, saved as a PNG and embedded in
a self-contained HTML file (no external resources: it opens from a mail or a bucket as it is).

Figures are made with `Figure` + `FigureCanvasAgg`, never pyplot: no global backend is chosen and
nothing global is left open, so importing this module changes nothing for its importer.
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mirasol3b.encoders.spectrogram import LogMelSpec, log_mel_spectrogram

Span = tuple[float, float]

# Opaque, distinct from the frames (synthetic shapes are saturated primaries) and from the log-mel's
# colour map; tests/test_report.py finds them in the browser's screenshot.
CURVE_COLOUR = "#1f4e9c"
SPAN_COLOUR = "#f28e2b"
TRUTH_COLOUR = "#2a9d4b"
MAIN_SPAN_ALPHA = 0.35  # the other chosen spans are paler: the first is the one the answer rests on
OTHER_SPAN_ALPHA = 0.15
LOGMEL_CMAP = "magma"
FIGSIZE = (12.0, 7.5)  # inches at DPI: 1200 x 750 pixels, the width of a laptop's browser window
DPI = 100


def default_logmel_spec(sample_rate: int) -> LogMelSpec:
    """25 ms Hann windows every 10 ms, 64 mels (the usual speech/audio-event front end) at `sample_rate`."""
    win = max(1, round(0.025 * sample_rate))
    # dft="fft": drawn on the host's CPU, where the FFT is the cheaper one (spectrogram.py).
    return LogMelSpec(sample_rate=sample_rate, n_fft=1 << (win - 1).bit_length(), win_length=win,
                      hop_length=max(1, round(0.010 * sample_rate)), n_mels=64, dft="fft")


def _check_spans(name: str, spans: Sequence[Span], clip_seconds: float, slack: float) -> list[Span]:
    out = []
    for i, span in enumerate(spans):
        if len(span) != 2:
            raise ValueError(f"{name}[{i}]={span!r}: expected (start_s, end_s)")
        start, end = float(span[0]), float(span[1])
        if not (-slack <= start < end <= clip_seconds + slack):
            raise ValueError(f"{name}[{i}]=({start:g}, {end:g}): expected 0 <= start < end <= {clip_seconds:g} s "
                             f"(the clip's length)")
        out.append((start, end))
    return out


def _checked(frames, audio, fps: float, sample_rate: int, snippet_seconds: float, scores, spans: Sequence[Span],
             truth: Sequence[Span], logmel) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[Span], list[Span],
                                                     np.ndarray | None, float]:
    """The inputs as arrays, with the clip's length in seconds; ValueError naming what is wrong."""
    frames, audio = np.asarray(frames), np.asarray(audio)
    scores = np.asarray(scores, np.float64)
    for name, value in (("fps", fps), ("sample_rate", sample_rate), ("snippet_seconds", snippet_seconds)):
        if not value > 0:
            raise ValueError(f"{name}={value!r}: expected > 0")
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or not frames.shape[0]:
        raise ValueError(f"frames: expected uint8 [F, H, W, 3] with F >= 1, got {frames.dtype} {list(frames.shape)}")
    frame_seconds = 1.0 / fps  # decoded media may be a frame short or long: tolerated, more is not
    video_seconds = frames.shape[0] / fps
    snippets = max(1, round(video_seconds / snippet_seconds))
    if scores.ndim != 1 or scores.size != snippets or abs(snippets * snippet_seconds - video_seconds) > frame_seconds:
        raise ValueError(f"scores: expected one per {snippet_seconds:g} s snippet of the {video_seconds:g} s clip "
                         f"({video_seconds / snippet_seconds:g}), got shape {list(scores.shape)}")
    clip_seconds = snippets * snippet_seconds  # the time axis: snippets are what the model saw
    if audio.ndim != 1 or not audio.size or not np.issubdtype(audio.dtype, np.floating):
        raise ValueError(f"audio: expected float mono [S] with S >= 1, got {audio.dtype} {list(audio.shape)}")
    if abs(audio.size / sample_rate - clip_seconds) > frame_seconds:
        raise ValueError(f"audio: expected {clip_seconds:g} s ({snippets} snippets of {snippet_seconds:g} s), got "
                         f"{audio.size} samples = {audio.size / sample_rate:g} s at {sample_rate} Hz")
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"scores: expected finite values, got {scores.tolist()}")
    if logmel is not None:
        logmel = np.asarray(logmel, np.float32)
        if logmel.ndim != 2 or not logmel.size:
            raise ValueError(f"logmel: expected [frames, mels], got {list(logmel.shape)}")
    return (frames, audio.astype(np.float32), scores, _check_spans("spans", spans, clip_seconds, 1e-6),
            _check_spans("truth", truth, clip_seconds, 1e-6), logmel, clip_seconds)


def timeline_figure(frames, audio, *, fps: float, sample_rate: int, snippet_seconds: float, scores,
                    spans: Sequence[Span], truth: Sequence[Span] = (), logmel=None,
                    logmel_spec: LogMelSpec | None = None, title: str | None = None) -> Figure:
    """Three rows on one time axis in seconds: a frame per snippet, the log-mel, the evidence curve.

    frames uint8 [F, H, W, 3] at `fps`; audio float [S] in [-1, 1] at `sample_rate`; scores [T], one
    per `snippet_seconds` snippet (T * snippet_seconds = the clip's length); spans the chosen
    evidence (the first the main one) and truth the ground truth, as (start_s, end_s); logmel
    [frames, mels], or None to compute it with `logmel_spec` (default: `default_logmel_spec`).
    """
    frames, audio, scores, spans, truth, logmel, clip_seconds = _checked(
        frames, audio, fps, sample_rate, snippet_seconds, scores, spans, truth, logmel)
    if logmel is None:
        spec = logmel_spec or default_logmel_spec(sample_rate)
        if spec.sample_rate != sample_rate:
            raise ValueError(f"logmel_spec.sample_rate={spec.sample_rate}: expected the audio's {sample_rate}")
        logmel = np.asarray(log_mel_spectrogram(audio, spec))

    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)  # attaches itself: savefig renders with Agg whatever pyplot's backend is
    ax_frames, ax_mel, ax_score = fig.subplots(3, 1, sharex=True, height_ratios=(1.0, 1.4, 1.4))
    if title:
        fig.suptitle(title, fontsize=13)

    # (a) the frame in the middle of each snippet, stretched over the snippet's time.
    edges = np.arange(scores.size + 1) * snippet_seconds
    for t in range(scores.size):
        index = min(frames.shape[0] - 1, int((t + 0.5) * snippet_seconds * fps))
        ax_frames.imshow(frames[index], extent=(edges[t], edges[t + 1], 0, 1), aspect="auto",
                         interpolation="nearest")
    ax_frames.set_yticks([])
    ax_frames.set_ylabel("frames")

    # (b) the log-mel, its frames spread over the clip (a centred STFT has one more frame than hops).
    ax_mel.imshow(logmel.T, origin="lower", aspect="auto", cmap=LOGMEL_CMAP, interpolation="nearest",
                  extent=(0, clip_seconds, 0, logmel.shape[1]))
    ax_mel.set_ylabel("mel bin")

    # (c) the evidence curve, the chosen spans shaded, the truth hatched.
    ax_score.stairs(scores, edges, baseline=None, color=CURVE_COLOUR, linewidth=2.5, label="evidence score", zorder=3)
    for i, (start, end) in enumerate(spans):
        ax_score.axvspan(start, end, color=SPAN_COLOUR, lw=0, alpha=MAIN_SPAN_ALPHA if i == 0 else OTHER_SPAN_ALPHA,
                         label="chosen span" if i == 0 else ("other spans" if i == 1 else None))
    for i, (start, end) in enumerate(truth):
        ax_score.axvspan(start, end, facecolor="none", edgecolor=TRUTH_COLOUR, hatch="//", lw=1.5,
                         label="ground truth" if i == 0 else None)
    if spans:  # the main span's edges through the rows above, so frames and sound line up with it
        for ax in (ax_frames, ax_mel):
            for x in spans[0]:
                ax.axvline(x, color=SPAN_COLOUR, lw=2)
    low, high = float(scores.min()), float(scores.max())
    pad = 0.1 * (high - low) or 0.5
    ax_score.set_ylim(low - pad, high + pad)
    ax_score.set_ylabel("evidence")
    ax_score.set_xlabel("time (s)")
    ax_score.legend(loc="upper right", fontsize=9)
    ax_score.set_xlim(0, clip_seconds)  # imshow autoscaled to each image: the shared axis is the clip
    return fig


def span_text(span: Span) -> str:
    """(0.5, 1.25) -> '0.50–1.25 s'."""
    return f"{span[0]:.2f}–{span[1]:.2f} s"


def _page(title: str, question: str, answer: str, reference: str | None, correct: bool | None,
          spans: Sequence[Span], truth: Sequence[Span], scores: np.ndarray, snippet_seconds: float,
          png: bytes) -> str:
    e = html.escape
    rows = [("Question", e(question)), ("Answer", e(answer))]
    if reference is not None:
        rows.append(("Reference", f"{e(reference)} <b>({'right' if correct else 'wrong'})</b>"))
    rows.append(("Evidence", ", ".join(
        e(span_text(s)) + (" (main)" if i == 0 and len(spans) > 1 else "") for i, s in enumerate(spans)) or "none"))
    if truth:
        rows.append(("Ground truth", ", ".join(e(span_text(s)) for s in truth)))
    facts = "\n".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    table = "\n".join(f"<tr><td>{t}</td><td>{e(span_text((t * snippet_seconds, (t + 1) * snippet_seconds)))}</td>"
                      f"<td>{s:.4g}</td></tr>" for t, s in enumerate(scores))
    image = base64.b64encode(png).decode("ascii")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{e(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 1em; color: #222; }}
img {{ max-width: 100%; height: auto; display: block; }}
table {{ border-collapse: collapse; margin: 0.5em 0; }}
th, td {{ text-align: left; padding: 0.15em 0.8em 0.15em 0; }}
table.scores td {{ font-family: monospace; }}
</style>
</head>
<body>
<h1>{e(title)}</h1>
<table class="facts">
{facts}
</table>
<img alt="frames, log-mel spectrogram and evidence score over time" src="data:image/png;base64,{image}">
<h2>Evidence score per snippet</h2>
<table class="scores">
<tr><th>snippet</th><th>time</th><th>score</th></tr>
{table}
</table>
</body>
</html>
"""


def write_report(html_path: str | os.PathLike, *, frames, audio, fps: float, sample_rate: int,
                 snippet_seconds: float, scores, spans: Sequence[Span], question: str, answer: str,
                 reference: str | None = None, correct: bool | None = None, truth: Sequence[Span] = (),
                 logmel=None, logmel_spec: LogMelSpec | None = None, title: str | None = None) -> tuple[str, str]:
    """Writes OUT.html (self-contained, the figure embedded) and OUT.png beside it; returns both paths.

    Arguments as `timeline_figure`'s, plus the question, the answer and the reference when known;
    `correct` is the caller's verdict on answer vs reference (evaluate's normalised exact match),
    None: the two compared ignoring case and surrounding spaces. `title` heads the page.
    """
    html_path = Path(html_path)
    if html_path.suffix.lower() not in (".html", ".htm"):
        raise ValueError(f"html_path={str(html_path)!r}: expected a name ending in .html (its PNG goes beside it)")
    png_path = html_path.with_suffix(".png")
    if reference is not None and correct is None:
        correct = answer.strip().casefold() == reference.strip().casefold()
    headline = f"Q: {question}\nA: {answer}"
    if reference is not None:
        headline += f"    (reference: {reference}, {'right' if correct else 'wrong'})"
    fig = timeline_figure(frames, audio, fps=fps, sample_rate=sample_rate, snippet_seconds=snippet_seconds,
                          scores=scores, spans=spans, truth=truth, logmel=logmel, logmel_spec=logmel_spec,
                          title=headline)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    png = buffer.getvalue()
    scores = np.asarray(scores, np.float64)
    html_path.parent.mkdir(parents=True, exist_ok=True)
    png_path.write_bytes(png)
    html_path.write_text(_page(title or "Mirasol3B: an answer and its evidence", question, answer, reference,
                               correct, [tuple(map(float, s)) for s in spans], [tuple(map(float, s)) for s in truth],
                               scores, snippet_seconds, png), encoding="utf-8")
    return str(html_path), str(png_path)

