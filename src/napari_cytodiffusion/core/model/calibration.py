"""Fitting the classifier's calibration on the validation split.

Everything the classifier needs beyond the network weights is fitted here, once, on
validation cells (never on test cells), and stored inside the model file:

* the spread of paired class differences at each timestep (to weigh trials fairly),
* a bias per class (some class-conditional denoisers are better on every cell),
* an inverse temperature that turns evidence into calibrated probabilities,
* the typical best-class error per class and timestep (the anomaly score's reference),
* review thresholds for uncertainty and anomaly score.
"""

import numpy as np

from napari_cytodiffusion.core.model.classifier import (
    anomaly_scores,
    evidence,
    replay_adaptive,
    trial_timesteps,
)

TARGET_UNFLAGGED_ACCURACY = 0.995
MAX_REVIEW_FRACTION = 0.2
ANOMALY_FALSE_ALARM = 0.01


def fit_calibration(model, errors, labels):
    """Fit the calibration from an exhaustive run on labelled validation cells.

    Parameters
    ----------
    model : DiffusionModel
        Its ``calibration`` is replaced by the fitted one (and also returned).
    errors : ndarray (n, trials, k)
        Paired errors of :func:`~napari_cytodiffusion.core.model.classifier.class_errors` with the
        ``exhaustive`` strategy for the ``k`` real classes.
    labels : ndarray (n,)
        True class ids.

    Returns
    -------
    dict
    """
    labels = np.asarray(labels)
    timesteps = trial_timesteps(errors.shape[1])
    order = np.argsort(timesteps)
    centred = errors - errors.mean(axis=2, keepdims=True)
    spread = centred.std(axis=(0, 2))
    calibration = {
        "timestep_grid": timesteps[order].tolist(),
        "timestep_sd": spread[order].tolist(),
    }
    model.calibration = calibration
    calibration["class_bias"] = _fit_class_bias(model, errors, labels).tolist()
    adaptive, _ = replay_adaptive(model, errors)
    against, best = evidence(model, adaptive)
    calibration["inverse_temperature"] = _fit_inverse_temperature(against, labels)
    calibration.update(_anomaly_reference(errors, labels, timesteps))
    model.calibration = calibration
    probabilities = _softmax(-against * calibration["inverse_temperature"])
    uncertainty = _normalised_entropy(probabilities)
    calibration["uncertainty_threshold"] = _review_threshold(uncertainty, best == labels)
    anomaly = anomaly_scores(model, adaptive, best)
    calibration["anomaly_threshold"] = float(np.quantile(anomaly, 1 - ANOMALY_FALSE_ALARM))
    calibration["fitted_on"] = f"{len(labels)} validation cells, {errors.shape[1]} trials"
    model.calibration = calibration
    return calibration


def _fit_class_bias(model, errors, labels):
    """Per-class offsets (platelet fixed at 0) maximising class-balanced likelihood."""
    from scipy.optimize import minimize

    from napari_cytodiffusion.core.model.classifier import normalised_scores

    means = np.nanmean(normalised_scores(model, errors), axis=1)
    means = means - means.mean(axis=1, keepdims=True)
    k = means.shape[1]
    weights = 1.0 / np.bincount(labels, minlength=k)[labels]

    def loss(params):
        scale, bias = np.exp(params[0]), np.r_[params[1:], 0.0]
        log_p = _log_softmax(-scale * (means - bias))
        return -np.sum(weights * log_p[np.arange(len(labels)), labels]) / weights.sum()

    fitted = minimize(loss, np.zeros(k), method="L-BFGS-B")
    return np.r_[fitted.x[1:], 0.0]


def _fit_inverse_temperature(against, labels):
    from scipy.optimize import minimize_scalar

    def loss(log_beta):
        log_p = _log_softmax(-np.exp(log_beta) * against)
        return -np.mean(log_p[np.arange(len(labels)), labels])

    return float(np.exp(minimize_scalar(loss, bounds=(-5, 5), method="bounded").x))


def _anomaly_reference(errors, labels, timesteps):
    """Mean and SD of the true class's log error per class and timestep, smoothed over t."""
    order = np.argsort(timesteps)
    k = errors.shape[2]
    log_true = np.log(errors[np.arange(len(labels)), :, labels])  # (n, trials)
    means, sds = [], []
    for c in range(k):
        rows = log_true[labels == c][:, order]
        means.append(_smooth(rows.mean(axis=0)).tolist())
        sds.append(np.maximum(_smooth(rows.std(axis=0)), 1e-3).tolist())
    return {"class_log_error_mean": means, "class_log_error_sd": sds}


def _smooth(values, width=5):
    kernel = np.ones(width) / width
    padded = np.pad(values, width // 2, mode="edge")
    return np.convolve(padded, kernel, mode="valid")


def _review_threshold(uncertainty, correct):
    """Lowest uncertainty cut whose unflagged cells reach the target accuracy."""
    order = np.argsort(uncertainty)
    accuracy = np.cumsum(correct[order]) / np.arange(1, len(order) + 1)
    least_kept = int(np.ceil((1 - MAX_REVIEW_FRACTION) * len(order)))
    ok = np.flatnonzero(accuracy >= TARGET_UNFLAGGED_ACCURACY)
    keep = max(ok.max() + 1 if len(ok) else 0, least_kept)
    return float(uncertainty[order][min(keep, len(order)) - 1])


def _log_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _softmax(z):
    return np.exp(_log_softmax(z))


def _normalised_entropy(p):
    return -np.sum(p * np.log(np.clip(p, 1e-12, None)), axis=1) / np.log(p.shape[1])


def store_calibration(model_path, calibration, out_path=None, metadata=None):
    """Write ``calibration`` (and optionally ``metadata``) into a model file.

    The file is rewritten in place unless ``out_path`` is given; its weights are untouched.
    """
    import json

    import torch

    state = torch.load(model_path, map_location="cpu", weights_only=True)
    state["calibration"] = json.dumps(calibration)
    if metadata is not None:
        state["metadata"] = json.dumps(metadata)
    torch.save(state, out_path or model_path)
