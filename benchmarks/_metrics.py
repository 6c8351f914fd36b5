"""Metrics shared by the benchmark scripts (plain numpy/scipy)."""

import numpy as np
from scipy.stats import rankdata


def balanced_accuracy(true, predicted, classes):
    recalls = per_class_recall(true, predicted, classes)
    return float(np.mean([r for r in recalls.values() if r is not None]))


def per_class_recall(true, predicted, classes):
    true, predicted = np.asarray(true), np.asarray(predicted)
    return {
        c: (float(np.mean(predicted[true == c] == c)) if np.any(true == c) else None)
        for c in classes
    }


def expected_calibration_error(confidence, correct, bins=15):
    """Mean |accuracy - confidence| over equal-width confidence bins, weighted by size."""
    confidence, correct = np.asarray(confidence), np.asarray(correct, float)
    index = np.clip((confidence * bins).astype(int), 0, bins - 1)
    error = 0.0
    for b in range(bins):
        members = index == b
        if members.any():
            error += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return float(error)


def selective_accuracy(uncertainty, correct, keep=0.8):
    """Accuracy of the ``keep`` fraction of calls with the lowest uncertainty."""
    order = np.argsort(uncertainty, kind="stable")
    kept = order[: int(round(keep * len(order)))]
    return float(np.mean(np.asarray(correct)[kept]))


def auroc(positive, score):
    """Area under the ROC curve of ``score`` for telling ``positive`` items from the rest."""
    positive = np.asarray(positive, bool)
    ranks = rankdata(score)
    n_pos, n_neg = positive.sum(), (~positive).sum()
    if n_pos == 0 or n_neg == 0:
        return None
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def call_metrics(calls, true_labels, classes):
    """The classifier's report card for a list of CellCall against true class names."""
    predicted = np.array([c.label for c in calls])
    true = np.asarray(true_labels)
    correct = predicted == true
    confidence = np.array([c.probabilities[c.label] for c in calls])
    uncertainty = np.array([c.uncertainty for c in calls])
    return {
        "cells": len(calls),
        "accuracy": float(correct.mean()),
        "balanced_accuracy": balanced_accuracy(true, predicted, classes),
        "recall_per_class": per_class_recall(true, predicted, classes),
        "expected_calibration_error": expected_calibration_error(confidence, correct),
        "accuracy_80pct_most_confident": selective_accuracy(uncertainty, correct, 0.8),
        "uncertainty_auroc_wrong_vs_right": auroc(~correct, uncertainty),
        "needs_review_fraction": float(np.mean([c.needs_review for c in calls])),
        "mean_unet_evals": float(np.mean([c.unet_evals for c in calls])),
        **_review_metrics(calls, correct),
    }


def _review_metrics(calls, correct):
    """Accuracy of the calls left unflagged, and the share flagged for each reason."""
    review = np.array([c.needs_review for c in calls])
    from napari_cytodiffusion.core.model.classifier import REASONS

    why = [getattr(c, "why", "") for c in calls]
    return {
        "unflagged_accuracy": float(np.mean(correct[~review])) if (~review).any() else None,
        "unflagged_cells": int((~review).sum()),
        "flagged_by_reason": {r: float(np.mean([r in w for w in why])) for r in REASONS},
    }
