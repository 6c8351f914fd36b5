"""Anomaly scores: how unlike every known class a cell is, with the image's own cost cancelled.

A diffusion model explains a smooth, blurred or low-contrast image well whatever it shows:
there is little to denoise. A score built on the best class's error alone therefore calls
smooth images typical and sharp ones anomalous (the input-complexity confound of
likelihood-based out-of-distribution scores). The scores here compare candidates **on the same
noisy input** (same noise, same timestep, same orientation), so the image's own denoising cost
cancels:

``null_gain`` (the shipped score)
    The log-likelihood-ratio of the best class against the null (unconditional) class, per
    trial: ``g(t) = log e_null(t) - log e_best(t)``, how much knowing the class helps. Each
    trial's gain is compared with the gains of validation cells *of that class* at that
    timestep (mean and SD, smoothed over timesteps), and the anomaly score is the mean of
    ``(typical gain - gain) / SD`` over the trials on which both were scored: about 0 for a
    typical cell of its class, high when no class helps as much as it should.
``margin``
    CytoDiffusion's within-trial normalisation: per trial, every class's error minus the
    trial's smallest, divided by the trials' mean error; the score is how narrowly the best
    class wins (the smallest margin of the other classes), against validation cells of the
    best class. Needs trials on which every class was scored.
``profile``
    The profile of log error ratios of every class against the null class, over the trials on
    which every class was scored, and its Mahalanobis distance to the validation profiles of
    the best class (shared covariance).
``best_error``
    The earlier score: the best class's log error against validation cells of that class.
    Kept for comparison (``benchmarks/anomaly.py``) and for models calibrated before.

Errors are arrays (n, trials, k) for the k real classes with NaN where a (trial, class) was
not scored, and (n, trials) for the null class.
"""

import numpy as np

METHODS = ("null_gain", "margin", "profile", "best_error")
# Timestep references are smoothed over this many neighbouring grid points.
_SMOOTH = 5


def _smooth(values, width=_SMOOTH):
    kernel = np.ones(width) / width
    padded = np.pad(values, width // 2, mode="edge")
    return np.convolve(padded, kernel, mode="valid")


def _on_grid(reference, grid, timesteps):
    """Per-class values on a timestep grid, interpolated at ``timesteps``: (classes, trials)."""
    return np.array([np.interp(timesteps, grid, row) for row in reference])


def log_gain(errors, null_errors, best):
    """(n, trials) log error ratio null / best class (NaN where either was not scored)."""
    rows = np.arange(len(errors))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log(null_errors) - np.log(errors[rows, :, best])


def full_trials(errors):
    """(n, trials) bool: trials on which every class was scored."""
    return ~np.isnan(errors).any(axis=2)


def margins(errors, best):
    """Mean within-trial normalised margin of the runner-up class (n,), NaN when no trial
    has every class."""
    full = full_trials(errors)
    with np.errstate(invalid="ignore"):
        normalised = (errors - np.nanmin(errors, axis=2, keepdims=True)) / np.nanmean(
            errors, axis=2, keepdims=True
        )
    normalised = np.where(full[:, :, None], normalised, np.nan)
    with np.errstate(invalid="ignore"), _quiet():
        per_class = np.nanmean(normalised, axis=1)  # (n, k)
    per_class[np.arange(len(errors)), best] = np.inf
    runner_up = np.min(per_class, axis=1)
    return np.where(full.any(axis=1), runner_up, np.nan)


def profiles(errors, null_errors, scale=None):
    """(n, k) mean log error ratio class / null over the trials with every class scored, each
    trial divided by ``scale`` (trials,) when given."""
    full = full_trials(errors) & ~np.isnan(null_errors)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = np.log(errors) - np.log(null_errors)[:, :, None]
    if scale is not None:
        ratios = ratios / np.asarray(scale)[None, :, None]
    ratios = np.where(full[:, :, None], ratios, np.nan)
    with _quiet():
        return np.nanmean(ratios, axis=1)


class _quiet:
    """Silence numpy's warnings about means of empty slices (they give NaN, as wanted)."""

    def __enter__(self):
        import warnings

        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        self._catch.__exit__(*exc)


def fit_reference(method, errors, null_errors, labels, timesteps, base=None):
    """The validation reference of an anomaly score.

    Parameters
    ----------
    method : str
        One of :data:`METHODS`.
    errors, null_errors : ndarray
        Errors of labelled validation cells, as the classifier would score them (the adaptive
        schedule replayed, so the reference sees the trials a live run sees).
    labels : ndarray (n,)
        True class ids; the reference of class ``c`` is made from cells of class ``c``.
    timesteps : ndarray (trials,)
        The trials' timesteps.
    base : dict, optional
        A reference of the same method whose classes without cells here are kept.

    Returns
    -------
    dict
        JSON-ready; ``{"method": method, ...}``.
    """
    labels = np.asarray(labels)
    k = errors.shape[2]
    order = np.argsort(timesteps)
    grid = np.asarray(timesteps)[order]
    reference = {"method": method, "timestep_grid": grid.tolist()}
    if method in ("null_gain", "best_error"):
        if method == "null_gain":
            values = log_gain(errors, null_errors, labels)
        else:
            with np.errstate(divide="ignore", invalid="ignore"):
                values = np.log(errors[np.arange(len(labels)), :, labels])
        means, sds = [], []
        pooled = None
        for c in range(k):
            rows = values[labels == c][:, order]
            if np.sum(~np.isnan(rows)) >= 8:
                mean, sd = _timestep_stats(rows, grid)
            elif base and base.get("method") == method and c < len(base["mean"]):
                mean = np.interp(grid, base["timestep_grid"], base["mean"][c])
                sd = np.interp(grid, base["timestep_grid"], base["sd"][c])
            else:
                # Too few cells of this class: the reference of all cells together.
                if pooled is None:
                    if np.sum(~np.isnan(values)) < 2:
                        raise ValueError("The anomaly reference needs more validation cells.")
                    pooled = _timestep_stats(values[:, order], grid)
                mean, sd = pooled
            means.append(np.round(mean, 6).tolist())
            sds.append(np.round(sd, 6).tolist())
        reference.update(mean=means, sd=sds)
        return reference
    if method == "margin":
        raw = np.log(np.clip(margins(errors, labels), 1e-6, None))
        reference.update(_per_class_stats(raw, labels, k, base))
        return reference
    if method == "profile":
        scale = _profile_scale(errors, null_errors)
        vectors = profiles(errors, null_errors, scale)
        ok = ~np.isnan(vectors).any(axis=1)
        centres = np.zeros((k, k))
        for c in range(k):
            members = ok & (labels == c)
            if members.any():
                centres[c] = vectors[members].mean(axis=0)
            elif base and base.get("method") == method:
                centres[c] = base["centres"][c]
        residual = vectors[ok] - centres[labels[ok]]
        covariance = np.cov(residual.T) if len(residual) > k else np.eye(k)
        shrink = 0.1 * np.trace(covariance) / k
        precision = np.linalg.inv(covariance + shrink * np.eye(k))
        reference.update(
            scale=np.round(scale, 6).tolist(),
            centres=np.round(centres, 6).tolist(),
            precision=np.round(precision, 6).tolist(),
        )
        distances = _mahalanobis(vectors, centres[labels], precision)
        reference.update(_per_class_stats(np.log(distances + 1e-6), labels, k, base))
        return reference
    raise ValueError(f"Unknown anomaly score {method!r}; use one of {', '.join(METHODS)}.")


def _timestep_stats(rows, grid):
    """Mean and SD per timestep of (cells, timesteps) values with gaps, smoothed over t."""
    with _quiet():
        mean, sd = np.nanmean(rows, axis=0), np.nanstd(rows, axis=0)
    mean = _smooth(_fill_gaps(mean, grid))
    sd = np.maximum(_smooth(_fill_gaps(sd, grid)), 1e-3)
    return mean, sd


def _fill_gaps(values, grid):
    """NaN entries of a per-timestep row filled by interpolation over the grid."""
    bad = np.isnan(values)
    if not bad.any():
        return values
    if bad.all():
        return np.zeros_like(values)
    return np.interp(grid, grid[~bad], values[~bad])


def _per_class_stats(raw, labels, k, base):
    centre, spread = [], []
    for c in range(k):
        values = raw[(labels == c) & np.isfinite(raw)]
        if len(values) >= 2:
            centre.append(float(np.median(values)))
            spread.append(float(max(np.std(values), 1e-3)))
        elif base and "centre" in base:
            centre.append(base["centre"][c])
            spread.append(base["spread"][c])
        else:
            values = raw[np.isfinite(raw)]
            if len(values) < 2:
                raise ValueError("The anomaly reference needs more validation cells.")
            centre.append(float(np.median(values)))
            spread.append(float(max(np.std(values), 1e-3)))
    return {"centre": centre, "spread": spread}


def _profile_scale(errors, null_errors):
    """Spread of the class / null log ratios per trial, so that every trial weighs the same."""
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = np.log(errors) - np.log(null_errors)[:, :, None]
    with _quiet():
        sd = np.nanstd(ratios, axis=(0, 2))
    return np.where(np.isfinite(sd) & (sd > 0), sd, 1.0)


def _mahalanobis(vectors, centres, precision):
    d = vectors - centres
    return np.sqrt(np.maximum(np.einsum("ni,ij,nj->n", d, np.asarray(precision), d), 0))


def score(reference, errors, null_errors, best, timesteps):
    """Anomaly scores (n,) of cells under a :func:`fit_reference` reference.

    ``null_errors`` may be None for ``best_error``; cells on which the score cannot be
    computed (no trial with both classes) get NaN.
    """
    method = reference["method"]
    best = np.asarray(best)
    if method in ("null_gain", "best_error"):
        grid = reference["timestep_grid"]
        means = _on_grid(reference["mean"], grid, timesteps)[best]
        sds = _on_grid(reference["sd"], grid, timesteps)[best]
        if method == "null_gain":
            z = (means - log_gain(errors, null_errors, best)) / sds
        else:
            with np.errstate(divide="ignore", invalid="ignore"):
                z = (np.log(errors[np.arange(len(best)), :, best]) - means) / sds
        with _quiet():
            return np.nanmean(z, axis=1)
    centre = np.asarray(reference["centre"])[best]
    spread = np.asarray(reference["spread"])[best]
    if method == "margin":
        raw = np.log(np.clip(margins(errors, best), 1e-6, None))
        return (centre - raw) / spread
    if method == "profile":
        vectors = profiles(errors, null_errors, np.asarray(reference["scale"])[: errors.shape[1]])
        centres = np.asarray(reference["centres"])[best]
        raw = np.log(_mahalanobis(vectors, centres, reference["precision"]) + 1e-6)
        return (raw - centre) / spread
    raise ValueError(f"Unknown anomaly score {method!r}.")
