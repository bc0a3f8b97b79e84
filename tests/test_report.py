"""The evidence report: the page is one self-contained HTML file whose figure (frames, log-mel, evidence
curve on one time axis) decodes; wrong shapes are errors naming the argument; and headless Chromium
really draws the plot from the page (a broken image is told apart)."""

import base64
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from matplotlib.colors import to_rgb
from PIL import Image

from mirasol3b import report
from mirasol3b_data import synthetic

SOURCE = synthetic.SourceSpec()  # 0.25 s snippets, 24 fps, 44.1 kHz
SNIPPETS = 4
SCORES = [0.1, 0.7, 0.9, 0.2]
SPANS = [(0.25, 0.75), (0.0, 0.25)]
TRUTH = [(0.5, 1.0)]


@pytest.fixture(scope="module")
def clip():
    qa, frames, audio = synthetic.generate_example(0, "train", 0, SNIPPETS, SOURCE)
    return qa, frames, audio


def _kwargs(clip, **overrides):
    _, frames, audio = clip
    kwargs = dict(frames=frames, audio=audio, fps=SOURCE.fps, sample_rate=SOURCE.sample_rate,
                  snippet_seconds=SOURCE.snippet_seconds, scores=SCORES, spans=SPANS, truth=TRUTH)
    kwargs.update(overrides)
    return kwargs


@pytest.fixture(scope="module")
def page(clip, tmp_path_factory):
    qa = clip[0]
    out = tmp_path_factory.mktemp("report") / "answer.html"
    # The question carries markup: the page must show it as text.
    html_path, png_path = report.write_report(out, question=qa.question + " <b>&</b>", answer=qa.answer,
                                              reference=qa.answer, **_kwargs(clip))
    return Path(html_path), Path(png_path)


def _blend(colour: str, alpha: float) -> np.ndarray:
    """`colour` at `alpha` over white, in 0..255 RGB: what a shaded span looks like."""
    return 255 * (1 - alpha) + 255 * np.asarray(to_rgb(colour)) * alpha


def _plot_measures(png: Path) -> dict[str, float]:
    """How much of a picture is the report's plot: non-white share, distinct colours, pixels of the main
    span's shading and of the evidence curve."""
    img = np.asarray(Image.open(png).convert("RGB")).astype(int)
    q = img // 8

    def near(colour: np.ndarray, tol: int) -> int:
        return int((np.abs(img - colour).max(-1) <= tol).sum())

    return {"non_white": float((img.min(-1) < 235).mean()),
            "colours": len(np.unique(q[..., 0] * 1024 + q[..., 1] * 32 + q[..., 2])),
            "span_pixels": near(_blend(report.SPAN_COLOUR, report.MAIN_SPAN_ALPHA), 6),
            "curve_pixels": near(255 * np.asarray(to_rgb(report.CURVE_COLOUR)), 12)}


def _shows_plot(m: dict[str, float]) -> bool:
    # The plot fills over a third of a 1200 x 1000 window; the main span is ~8% of it, the curve a few
    # thousand pixels (measured: 54%, ~830 colours, ~96k and ~3k).
    return m["non_white"] > 0.3 and m["colours"] > 200 and m["span_pixels"] > 20_000 and m["curve_pixels"] > 1_000


def test_page_is_self_contained_with_the_figure_and_the_spans(page):
    html_path, png_path = page
    assert html_path.name == "answer.html" and png_path == html_path.with_suffix(".png")
    text = html_path.read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", text), "the page loads something from outside"
    assert "<script" not in text and "<link" not in text
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(images) == 1 and text.count("<img") == 1
    assert base64.b64decode(images[0]) == png_path.read_bytes(), "the page embeds another picture than the PNG"
    assert "0.25–0.75 s (main)" in text and "0.00–0.25 s" in text and "0.50–1.00 s" in text
    assert "&lt;b&gt;&amp;&lt;/b&gt;" in text and "<b>&</b>" not in text, "the question was not escaped"
    assert "(right)" in text
    assert text.count("<tr><td>") == SNIPPETS  # one score row per snippet
    with Image.open(png_path) as img:
        assert img.size == (1200, 750)
    assert _shows_plot(_plot_measures(png_path)), _plot_measures(png_path)


def test_figure_rows_share_the_clip_time_axis(clip):
    logmel = np.linspace(-80, 0, 101 * 16, dtype=np.float32).reshape(101, 16)
    fig = report.timeline_figure(**_kwargs(clip, logmel=logmel), title="t")
    frames_ax, mel_ax, score_ax = fig.axes[:3]
    for ax in (frames_ax, mel_ax, score_ax):
        assert ax.get_xlim() == (0.0, 1.0)
    assert len(frames_ax.images) == SNIPPETS
    np.testing.assert_array_equal(mel_ax.images[0].get_array(), logmel.T)  # a given log-mel is drawn as is
    assert [t.get_text() for t in score_ax.get_legend().get_texts()] == [
        "evidence score", "chosen span", "other spans", "ground truth"]


@pytest.mark.parametrize("overrides, message", [
    (dict(frames=np.zeros((24, 8, 8, 3), np.float32)), r"frames: expected uint8 \[F, H, W, 3\]"),
    (dict(frames=np.zeros((24, 8, 8), np.uint8)), r"frames: expected uint8 \[F, H, W, 3\]"),
    (dict(scores=[0.1, 0.2, 0.3]), r"scores: expected one per 0.25 s snippet of the 1 s clip \(4\)"),
    (dict(snippet_seconds=0.3), r"scores: expected one per 0.3 s snippet"),
    (dict(audio=np.zeros(22050, np.float32)), r"audio: expected 1 s"),
    (dict(spans=[(0.5, 1.5)]), r"spans\[0\]=\(0.5, 1.5\): expected 0 <= start < end <= 1 s"),
    (dict(truth=[(0.75, 0.5)]), r"truth\[0\]=\(0.75, 0.5\)"),
    (dict(logmel=np.zeros(10, np.float32)), r"logmel: expected \[frames, mels\]"),
    (dict(logmel_spec=report.default_logmel_spec(16000)), r"logmel_spec.sample_rate=16000"),
])
def test_bad_inputs_name_the_argument(clip, overrides, message):
    with pytest.raises(ValueError, match=message):
        report.timeline_figure(**_kwargs(clip, **overrides))


def test_page_name_must_be_html(clip, tmp_path):
    with pytest.raises(ValueError, match="html_path"):
        report.write_report(tmp_path / "answer.png", question="q", answer="a", **_kwargs(clip))


def _screenshot(browser: str, page: Path, out: Path) -> dict[str, float]:
    # Chromium >= 132's --headless is the new headless; --no-sandbox because tests run as root;
    # --disable-dev-shm-usage because Debian's launcher fails to decide it (its findmnt test errs).
    argv = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
            f"--user-data-dir={out.parent / (out.stem + '-profile')}", f"--screenshot={out}",
            "--window-size=1200,1000", page.resolve().as_uri()]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and out.exists(), f"{argv} failed ({run.returncode}):\n{run.stderr[-2000:]}"
    return _plot_measures(out)


def test_chromium_draws_the_plot(page, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium on PATH: `make chromium` installs Debian's (as root)")
    html_path, _ = page
    drawn = _screenshot(browser, html_path, tmp_path / "page.png")
    assert _shows_plot(drawn), f"the screenshot does not show the plot: {drawn}"
    # The same page with its image broken must fail the same check, or the check proves nothing.
    broken = tmp_path / "broken.html"
    broken.write_text(re.sub(r"base64,[A-Za-z0-9+/=]+", "base64,AAAA", html_path.read_text(encoding="utf-8")),
                      encoding="utf-8")
    shown = _screenshot(browser, broken, tmp_path / "broken.png")
    assert not _shows_plot(shown), f"a page without its image passes the check: {shown}"
