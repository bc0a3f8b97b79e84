"""Grounding metrics, computed as NExT-GQA's evaluation computes them (doc-doc/NExT-GQA, eval_ground.py).

Per question: the predicted span (the evidence's strongest, `evidence.top_spans`) against each of its
true spans; IoU = intersection / union, IoP = intersection / the predicted span's length; the best
true span counts (a question may have several). Over the questions that have true spans:
  mIoP, IoP@0.3, IoP@0.5, mIoU, IoU@0.3, IoU@0.5   means and hit rates of the best IoP / IoU
  Acc@GQA                                          the answer right and IoP >= 0.5
as fractions (NExT-GQA prints percentages). The baseline: the same metrics for a span of the same
length placed uniformly at random in the clip (the mean over `RANDOM_DRAWS` draws a question,
drawn from a fixed seed): what a right-sized span without any evidence reaches.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

METRICS = ("mIoP", "IoP@0.3", "IoP@0.5", "mIoU", "IoU@0.3", "IoU@0.5", "Acc@GQA")
RANDOM_DRAWS = 100
_SEED = 0

Span = tuple[float, float]


def iou_iop(predicted: Span, truth: Span) -> tuple[float, float]:
    """(IoU, IoP) of two spans (start, end) in seconds; a zero-length prediction has IoP 1 inside
    the truth and 0 outside, and IoU 0 (as NExT-GQA scores it)."""
    (ps, pe), (ts, te) = predicted, truth
    if pe == ps:
        return 0.0, float(ts <= ps <= te)
    inter = max(0.0, min(pe, te) - max(ps, ts))
    union = max(pe, te) - min(ps, ts)
    return (inter / union if union > 0 else 0.0), inter / (pe - ps)


def best_iou_iop(predicted: Span, truths: Sequence[Span]) -> tuple[float, float]:
    """The best IoU and the best IoP over a question's true spans (each maximised on its own)."""
    pairs = [iou_iop(predicted, t) for t in truths]
    return max(p[0] for p in pairs), max(p[1] for p in pairs)


def _summary(ious: np.ndarray, iops: np.ndarray, right: np.ndarray) -> dict[str, float]:
    return {"mIoP": float(iops.mean()), "IoP@0.3": float((iops >= 0.3).mean()), "IoP@0.5": float((iops >= 0.5).mean()),
            "mIoU": float(ious.mean()), "IoU@0.3": float((ious >= 0.3).mean()), "IoU@0.5": float((ious >= 0.5).mean()),
            "Acc@GQA": float(((iops >= 0.5) & right).mean())}


def grounding_metrics(predicted: Sequence[Span | None], truths: Sequence[Sequence[Span]], right: Sequence[bool],
                      durations: Sequence[float]) -> dict:
    """`grounding/<metric>` and `grounding_random/<metric>` (the baseline) over the questions with true
    spans, and `grounding/num_examples`. A question without a predicted span (no evidence above 0)
    scores 0. `durations`: each clip's length in seconds, where random spans are placed."""
    rows = [(p, t, r, d) for p, t, r, d in zip(predicted, truths, right, durations, strict=True) if t]
    if not rows:
        return {"grounding/num_examples": 0}
    ious, iops, rand_ious, rand_iops = [], [], [], []
    rng = np.random.default_rng(_SEED)
    for p, t, _, d in rows:
        iou, iop = best_iou_iop(p, t) if p is not None else (0.0, 0.0)
        ious.append(iou)
        iops.append(iop)
        length = min(p[1] - p[0], d) if p is not None else 0.0
        starts = rng.uniform(0.0, d - length, RANDOM_DRAWS)
        drawn = np.array([best_iou_iop((s, s + length), t) for s in starts])
        rand_ious.append(drawn[:, 0])
        rand_iops.append(drawn[:, 1])
    right = np.array([r for _, _, r, _ in rows], bool)
    out = {f"grounding/{k}": v for k, v in _summary(np.array(ious), np.array(iops), right).items()}
    # Each draw is a full random baseline; their metrics are averaged.
    draws = [_summary(np.array(rand_ious)[:, k], np.array(rand_iops)[:, k], right) for k in range(RANDOM_DRAWS)]
    out.update({f"grounding_random/{k}": float(np.mean([d[k] for d in draws])) for k in METRICS})
    out["grounding/num_examples"] = len(rows)
    return out
