"""Fitting the classifier's calibration on the validation split.

Everything the classifier needs beyond the network weights is fitted here, once, on
validation cells (never on test cells), and stored inside the model file:

* the spread of paired class differences at each timestep (to weigh trials fairly),
* a bias per class (some class-conditional denoisers are better on every cell),
* an inverse temperature that turns evidence into calibrated probabilities,
* the anomaly score's reference (``calibration["anomaly"]``, see
  :mod:`~napari_cytodiffusion.core.model.anomaly`; needs the null class's errors) and, for
  models calibrated before it, the typical best-class error per class and timestep,
* the domain-shift reference (``calibration["domain"]``,
  :mod:`~napari_cytodiffusion.core.model.domain`), when training and validation features
  are given,
* review thresholds for uncertainty and anomaly score.
"""

import numpy as np

from napari_cytodiffusion.core.model.classifier import (
    anomaly_scores,
    evidence,
    replay_adaptive,
    split_null,
    trial_timesteps,
)

TARGET_UNFLAGGED_ACCURACY = 0.995
ANOMALY_FALSE_ALARM = 0.01
# With a base calibration (adapting to a lab), the fitted log inverse temperature is drawn
# towards the base's with this prior spread, worth one cell's likelihood: a few held-back
# cells that are all right would otherwise drive it to its bound and make every call sure.
TEMPERATURE_PRIOR_SD = 1.0
# The anomaly score fitted when the null class's errors are given (benchmarks/anomaly.py).
ANOMALY_METHOD = "null_gain"


def fit_calibration(model, errors, labels, base=None, bias_cells=None):
    """Fit the calibration from an exhaustive run on labelled cells.

    Parameters
    ----------
    model : DiffusionModel
        Its ``calibration`` is replaced by the fitted one (and also returned).
    errors : ndarray (n, trials, k)
        Paired errors of :func:`~napari_cytodiffusion.core.model.classifier.class_errors` with the
        ``exhaustive`` strategy for the ``k`` real classes, optionally with the null class
        as one more, last column (``class_errors(..., null=True)``): then the anomaly score
        is the null-gain score (:data:`ANOMALY_METHOD`).
    labels : ndarray (n,)
        True class ids.
    base : dict, optional
        An earlier calibration of the same classes (the base model's, when adapting). A class
        without cells here keeps its class bias and anomaly reference from it, so a lab that
        has no basophils still gets basophil calls; without ``base`` every class needs cells.
        Fitted on a few cells, the temperature is drawn towards the base's and the review
        threshold is never more lenient than the base's, which thousands of cells fixed.
    bias_cells : tuple (errors, labels), optional
        Exhaustive errors (``(m, trials, k)``, any number of trials, no null class) and class
        ids of more labelled cells that join the class-bias fit only: a lab's adapting cells.
        A bias is a property of a class's denoiser, so every labelled cell informs it, and
        fitted on a few held-back cells alone it swings with which cells were held back; the
        temperature and the review thresholds say how sure calls on *new* cells may be, so they
        stay fitted on the held-back cells.

    Returns
    -------
    dict
    """
    from napari_cytodiffusion.core.model import anomaly

    labels = np.asarray(labels)
    errors, null = split_null(model, errors)
    k = errors.shape[2]
    present = np.bincount(labels, minlength=k) > 0
    if not present.all() and not (base or {}).get("class_bias"):
        missing = np.flatnonzero(~present).tolist()
        raise ValueError(f"Calibration needs cells of every class; none of class ids {missing}.")
    timesteps = trial_timesteps(errors.shape[1])
    order = np.argsort(timesteps)
    centred = errors - errors.mean(axis=2, keepdims=True)
    spread = np.maximum(centred.std(axis=(0, 2)), 1e-9)  # > 0 even for an untrained model
    calibration = {
        "timestep_grid": timesteps[order].tolist(),
        "timestep_sd": spread[order].tolist(),
    }
    model.calibration = calibration
    fitted = [(errors, labels)] + ([bias_cells] if bias_cells is not None else [])
    calibration["class_bias"] = _fit_class_bias(model, fitted, base).tolist()
    adaptive, _ = replay_adaptive(model, errors)
    against, best = evidence(model, adaptive)
    calibration["inverse_temperature"] = _fit_inverse_temperature(
        against, labels, (base or {}).get("inverse_temperature")
    )
    calibration.update(_anomaly_reference(errors, labels, timesteps, base))
    adaptive_null = None
    if null is not None:
        # The anomaly reference sees the trials a live adaptive run scores.
        replayed, _ = replay_adaptive(model, np.concatenate([errors, null[:, :, None]], axis=2))
        adaptive, adaptive_null = replayed[:, :, :-1], replayed[:, :, -1]
        calibration["anomaly"] = anomaly.fit_reference(
            ANOMALY_METHOD, adaptive, adaptive_null, labels, timesteps, (base or {}).get("anomaly")
        )
    model.calibration = calibration
    probabilities = _softmax(-against * calibration["inverse_temperature"])
    uncertainty = _normalised_entropy(probabilities)
    threshold = _review_threshold(uncertainty, best == labels)
    if (base or {}).get("uncertainty_threshold") is not None:
        threshold = min(threshold, float(base["uncertainty_threshold"]))
    calibration["uncertainty_threshold"] = threshold
    scores = anomaly_scores(model, adaptive, best, adaptive_null)
    calibration["anomaly_threshold"] = float(np.quantile(scores, 1 - ANOMALY_FALSE_ALARM))
    calibration["fitted_on"] = f"{len(labels)} labelled cells, {errors.shape[1]} trials"
    model.calibration = calibration
    return calibration


def fit_review(
    model,
    errors,
    labels,
    method=ANOMALY_METHOD,
    domain=None,
    false_alarm=ANOMALY_FALSE_ALARM,
):
    """Add the anomaly reference and threshold (and the domain reference) to a model whose
    classifier calibration (spread, class bias, temperature, uncertainty threshold) stays.

    Used to give the shipped model the scores of issue 9 without refitting what it was
    calibrated with on the whole validation split.

    Parameters
    ----------
    errors : ndarray (n, trials, k + 1)
        Exhaustive errors of labelled validation cells with the null class as the last column.
    labels : ndarray (n,)
    method : str
        The anomaly score (:data:`~napari_cytodiffusion.core.model.anomaly.METHODS`).
    domain : dict, optional
        A :func:`~napari_cytodiffusion.core.model.domain.fit_domain_reference` result.
    false_alarm : float
        Share of validation cells the anomaly threshold flags.

    Returns
    -------
    dict
        The model's updated calibration.
    """
    from napari_cytodiffusion.core.model import anomaly

    labels = np.asarray(labels)
    timesteps = trial_timesteps(errors.shape[1])
    replayed, _ = replay_adaptive(model, errors, null=True)
    real, null = replayed[:, :, :-1], replayed[:, :, -1]
    _, best = evidence(model, real)
    calibration = dict(model.calibration or {})
    calibration["anomaly"] = anomaly.fit_reference(method, real, null, labels, timesteps)
    model.calibration = calibration
    scores = anomaly_scores(model, real, best, null)
    calibration["anomaly_threshold"] = float(np.quantile(scores, 1 - false_alarm))
    if domain is not None:
        calibration["domain"] = domain
    calibration["review_fitted_on"] = (
        f"{len(labels)} labelled validation cells, {errors.shape[1]} trials"
    )
    model.calibration = calibration
    return calibration


def _fit_class_bias(model, cells, base=None):
    """Per-class offsets maximising class-balanced likelihood over ``cells``, a list of
    (errors, labels) pairs whose trial counts may differ.

    One class with cells is the anchor (its offset fixed); classes without cells keep their
    offsets from ``base`` relative to it.
    """
    from scipy.optimize import minimize

    from napari_cytodiffusion.core.model.classifier import normalised_scores

    means = np.concatenate(
        [np.nanmean(normalised_scores(model, errors), axis=1) for errors, _ in cells]
    )
    labels = np.concatenate([np.asarray(labels) for _, labels in cells])
    means = means - means.mean(axis=1, keepdims=True)
    k = means.shape[1]
    counts = np.bincount(labels, minlength=k)
    fitted_ids = np.flatnonzero(counts > 0)
    anchor, free = fitted_ids[-1], fitted_ids[:-1]
    bias = np.array(base["class_bias"], float) if base else np.zeros(k)
    weights = 1.0 / counts[labels]

    def loss(params):
        scale = np.exp(params[0])
        trial = bias.copy()
        trial[free] = params[1:]
        log_p = _log_softmax(-scale * (means - trial))
        return -np.sum(weights * log_p[np.arange(len(labels)), labels]) / weights.sum()

    start = np.r_[0.0, bias[free]]
    fitted = minimize(loss, start, method="L-BFGS-B")
    bias[free] = fitted.x[1:]
    return bias - bias[anchor] if base is None else bias


def _fit_inverse_temperature(against, labels, prior=None):
    """The inverse temperature of the calibrated probabilities; ``prior`` (the base's) adds
    a log-normal prior of spread ``TEMPERATURE_PRIOR_SD``, worth one cell."""
    from scipy.optimize import minimize_scalar

    def loss(log_beta):
        log_p = _log_softmax(-np.exp(log_beta) * against)
        nll = -np.mean(log_p[np.arange(len(labels)), labels])
        if prior is None:
            return nll
        return nll + 0.5 * ((log_beta - np.log(prior)) / TEMPERATURE_PRIOR_SD) ** 2 / len(labels)

    return float(np.exp(minimize_scalar(loss, bounds=(-5, 5), method="bounded").x))


def _anomaly_reference(errors, labels, timesteps, base=None):
    """Mean and SD of the true class's log error per class and timestep, smoothed over t.

    A class without cells keeps ``base``'s reference, resampled onto this timestep grid.
    """
    order = np.argsort(timesteps)
    grid = timesteps[order]
    k = errors.shape[2]
    log_true = np.log(errors[np.arange(len(labels)), :, labels])  # (n, trials)
    means, sds = [], []
    for c in range(k):
        rows = log_true[labels == c][:, order]
        if len(rows):
            mean, sd = _smooth(rows.mean(axis=0)), np.maximum(_smooth(rows.std(axis=0)), 1e-3)
        else:
            old_grid = base["timestep_grid"]
            mean = np.interp(grid, old_grid, base["class_log_error_mean"][c])
            sd = np.interp(grid, old_grid, base["class_log_error_sd"][c])
        means.append(mean.tolist())
        sds.append(sd.tolist())
    return {"class_log_error_mean": means, "class_log_error_sd": sds}


def _smooth(values, width=5):
    kernel = np.ones(width) / width
    padded = np.pad(values, width // 2, mode="edge")
    return np.convolve(padded, kernel, mode="valid")


def _review_threshold(uncertainty, correct):
    """Highest uncertainty cut whose unflagged (less uncertain) cells reach the target
    accuracy; 0 (every call flagged) when even the most certain call is wrong.

    Accuracy comes first, however many calls that flags: a model calibrated on another lab's
    cells may have to send most of them to review, and says so instead of being wrong.
    """
    order = np.argsort(uncertainty)
    accuracy = np.cumsum(correct[order]) / np.arange(1, len(order) + 1)
    ok = np.flatnonzero(accuracy >= TARGET_UNFLAGGED_ACCURACY)
    return float(uncertainty[order][ok.max()]) if len(ok) else 0.0


def _log_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _softmax(z):
    return np.exp(_log_softmax(z))


def _normalised_entropy(p):
    return -np.sum(p * np.log(np.clip(p, 1e-12, None)), axis=1) / np.log(p.shape[1])
