"""Thresholds and metrics of the anomaly stage (pure functions on arrays).

Voxel level, pooled over the brain voxels of all cases (as the MOOD challenge does): AUROC,
AUPRC (average precision), Dice at a given threshold and the best Dice over all thresholds
(optimistic: the threshold is chosen on the very data it is scored on). Scan level: accuracy,
precision, sensitivity, specificity, F1 and ROC AUC of the flag ``score > threshold``.
"""

from __future__ import annotations

import numpy as np


def voxel_threshold(healthy_values: np.ndarray, fpr: float) -> float:
    """The map value above which a fraction ``fpr`` of healthy brain voxels lie."""
    v = np.asarray(healthy_values, dtype=np.float64).ravel()
    if v.size == 0:
        raise ValueError("no healthy voxels to calibrate on")
    if not 0 < fpr < 1:
        raise ValueError(f"fpr must be in (0, 1), got {fpr}")
    return float(np.quantile(v, 1.0 - fpr))


def scan_threshold(healthy_scores, percentile: float = 95.0) -> float:
    """The ``percentile`` of healthy scan scores (the rule of our sources: 95th)."""
    s = np.asarray(healthy_scores, dtype=np.float64).ravel()
    if s.size == 0:
        raise ValueError("no healthy scan scores to calibrate on")
    return float(np.percentile(s, percentile))


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two masks (non-zero = inside), MONAI's ``compute_dice``; both empty: 1.0, an
    empty ``truth`` with a non-empty ``pred``: 0.0."""
    import torch
    from monai.metrics import compute_dice

    p = torch.as_tensor(np.asarray(pred) > 0)[None, None]
    t = torch.as_tensor(np.asarray(truth) > 0)[None, None]
    return float(compute_dice(p, t, ignore_empty=False).item())


def voxel_metrics(scores: np.ndarray, truth: np.ndarray, threshold: float | None = None) -> dict:
    """AUROC, AUPRC, Dice at ``threshold`` and the best Dice over thresholds, pooled."""
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

    s = np.asarray(scores, dtype=np.float64).ravel()
    t = np.asarray(truth).ravel() > 0
    out = {"voxels": int(s.size), "positives": int(t.sum())}
    if 0 < t.sum() < t.size:
        out["auroc"] = float(roc_auc_score(t, s))
        out["auprc"] = float(average_precision_score(t, s))
        prec, rec, thr = precision_recall_curve(t, s)
        f1 = np.where(prec + rec > 0, 2 * prec * rec / np.maximum(prec + rec, 1e-12), 0.0)
        i = int(np.argmax(f1[:-1])) if len(thr) else 0
        out["best_dice"] = float(f1[i])
        out["best_dice_threshold"] = float(thr[i]) if len(thr) else float("nan")
    else:
        out.update(auroc=float("nan"), auprc=float("nan"), best_dice=float("nan"), best_dice_threshold=float("nan"))
    if threshold is not None:
        out["threshold"] = float(threshold)
        out["dice"] = dice(s > threshold, t)
        out["fpr"] = float((s[~t] > threshold).mean()) if (~t).any() else float("nan")
        out["sensitivity"] = float((s[t] > threshold).mean()) if t.any() else float("nan")
    return out


def scan_metrics(labels, scores, threshold: float) -> dict:
    """Scan-level classification of ``score > threshold`` against ``labels`` (1 = anomalous)."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    p = s > threshold
    tp, tn = int((p & y).sum()), int((~p & ~y).sum())
    fp, fn = int((p & ~y).sum()), int((~p & y).sum())

    def ratio(a, b):
        return float(a / b) if b else float("nan")

    prec, sens = ratio(tp, tp + fp), ratio(tp, tp + fn)
    return {
        "n": int(y.size), "anomalous": int(y.sum()), "threshold": float(threshold),
        "tp": tp, "tn": tn, "fp": fp, "fn": fn,
        "accuracy": ratio(tp + tn, y.size), "precision": prec, "sensitivity": sens,
        "specificity": ratio(tn, tn + fp),
        "f1": float(2 * prec * sens / (prec + sens)) if tp else 0.0,
        "roc_auc": float(roc_auc_score(y, s)) if 0 < y.sum() < y.size else float("nan"),
    }


__all__ = ["voxel_threshold", "scan_threshold", "dice", "voxel_metrics", "scan_metrics"]
