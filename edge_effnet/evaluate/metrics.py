"""Scores compared: probabilities, top-k, accuracy against labels, agreement with a reference.

numpy only: the export self-check, `eval` and the benchmarks share these.
"""
from __future__ import annotations

import numpy as np

from ..errors import UserError

CONFIDENCE_BINS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)  # of the reference's top-1 probability


def to_probabilities(scores: np.ndarray) -> np.ndarray:
    """Rows of probabilities: softmax outputs are renormalized, logits go through a softmax.

    A uint8 softmax output (scale 1/256) loses the many small classes, so its rows can sum well
    below 1 (0.93 seen for Lite0): non-negative rows summing to at most ~1 are probabilities."""
    s = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    sums = s.sum(axis=1, keepdims=True)
    if s.min() >= 0 and np.all(sums > 0) and np.all(sums < 1.05):
        return s / sums
    e = np.exp(s - s.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def align(p: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Compare a 1001-class (background first) model with a 1000-class one on the 1000 classes."""
    if p.shape[1] == q.shape[1] + 1:
        p = p[:, 1:]
    elif q.shape[1] == p.shape[1] + 1:
        q = q[:, 1:]
    if p.shape[1] != q.shape[1]:
        raise UserError(f"the models have different numbers of classes ({p.shape[1]} and {q.shape[1]})")
    return p, q


def topk(p: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-p, axis=1, kind="stable")[:, :k]


def accuracy(probs: np.ndarray, labels: np.ndarray, k: int = 5) -> dict:
    top = topk(probs, k)
    return {"top1": float(np.mean(top[:, 0] == labels)), f"top{k}": float(np.mean((top == labels[:, None]).any(1)))}


def agreement(probs: np.ndarray, reference: np.ndarray, k: int = 5, bins=CONFIDENCE_BINS) -> dict:
    """How far `probs` (N, C) follows `reference` (N, C) on the same images."""
    p, q = align(to_probabilities(probs), to_probabilities(reference))
    tp, tq = topk(p, k), topk(q, k)
    same = tp[:, 0] == tq[:, 0]
    overlap = np.array([len(set(a) & set(b)) / k for a, b in zip(tp, tq)])
    eps = 1e-7
    kl = np.sum(q * (np.log(q + eps) - np.log(p + eps)), axis=1)
    conf = q.max(axis=1)
    per_bin = []
    for lo, hi in zip(bins[:-1], bins[1:]):
        inside = (conf >= lo) & ((conf < hi) if hi < bins[-1] else (conf <= hi))
        per_bin.append({"min": lo, "max": hi, "count": int(inside.sum()),
                        "top1_agreement": float(same[inside].mean()) if inside.any() else None})
    return {"count": int(len(p)), "top1_agreement": float(same.mean()), f"top{k}_overlap": float(overlap.mean()),
            "mean_kl": float(kl.mean()), "disagreements": int((~same).sum()), "by_reference_confidence": per_bin}
