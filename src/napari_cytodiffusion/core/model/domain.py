"""Domain shift: how far a cell and its smear are from the training smears.

This is a different question from the anomaly score. A normal neutrophil of another lab is a
known kind of cell in an unfamiliar smear: its anomaly score may be low while every call on
that smear is less reliable than on the training smears. Two parts, each a distance from the
training smears' distribution, fitted on PBC **train** cells and thresholded on PBC **val**
cells (``fit_domain_reference``, stored in the model's calibration under ``"domain"``):

* **the cell** (texture, sharpness, noise, residual colour): the class-free encoder of the
  UNet sees the normalised crop (timestep 0, one pass, about a quarter of one noise
  prediction); the mean and SD of every channel at every level of the encoder are its
  features. Their distance is the Mahalanobis distance in the top principal components of the
  training cells' features plus the residual outside them (probabilistic PCA). Beside it, the
  crop's **sharpness** (:func:`crop_sharpness`), one-sided: a defocused cell is called a
  platelet or an erythroblast with confidence (their denoisers expect smooth images), and the
  encoder's features alone let most such cells through (``benchmarks/perturbations.py``);
* **the smear** (lamp and stain): the colour references the normalisation measured on the
  smear (:meth:`~napari_cytodiffusion.core.smear.normalise.ColourMap.statistics`: the
  background's tint, red-cell optical density, nuclear hue; all blind to exposure), by
  Mahalanobis distance; a reference that was not found counts as typical.

Each part is divided by its review threshold (the ``1 - FALSE_ALARM`` quantile on validation
cells), and the cell's domain-shift score is the larger of the two: above 1 means *unlike the
training smears*. A smear's score is the median over its cells (:func:`smear_domain_shift`).
"""

import numpy as np

# Share of validation cells each part of the score flags (so at most three times this together).
FALSE_ALARM = 0.005
# Principal components of the training features kept for the Mahalanobis part, and the
# training cells each one needs at least (a lab's few dozen cells support only a few).
COMPONENTS = 32
CELLS_PER_COMPONENT = 4
# Floors on the SD of the colour references (background tint, red-cell OD, nuclear direction),
# so that a scanner family's near-constant lamp does not make every other lamp "infinitely" far.
COLOUR_SD_FLOOR = np.array([0.01] * 3 + [0.02] * 3 + [0.02] * 3)
# Gaussian scales (model pixels) that split a crop's detail into a fine band (below the first)
# and a middle band (between the two) for the sharpness measure.
SHARPNESS_SCALES = (0.7, 2.0)
# What a user is told when a smear's cells are soft (median softness above 1).
SOFT_ADVICE = (
    "its cells are softer than the training cells (out of focus, or a camera that resolves "
    "less): check the focus"
)


def crop_sharpness(crops):
    """How sharp normalised crops are: the log ratio of the energy of their fine detail to
    that of their middle-sized detail, in grey level (n,). Lower is softer.

    A ratio, so that stain strength and contrast cancel; it falls by about one for a Gaussian
    blur of 1 model pixel, against a spread (SD) of 0.3 over PBC training cells.

    Examples
    --------
    >>> from scipy import ndimage as ndi
    >>> cell = np.random.default_rng(0).random((1, 64, 64, 3))
    >>> soft = ndi.gaussian_filter(cell, (0, 1, 1, 0))
    >>> bool(crop_sharpness(soft)[0] < crop_sharpness(cell)[0])
    True
    """
    from scipy import ndimage as ndi

    grey = np.asarray(crops, np.float32).mean(axis=-1)
    fine_scale, middle_scale = SHARPNESS_SCALES
    fine = ndi.gaussian_filter(grey, (0, fine_scale, fine_scale))
    middle = ndi.gaussian_filter(grey, (0, middle_scale, middle_scale))
    fine_energy = np.mean((grey - fine) ** 2, axis=(1, 2))
    middle_energy = np.mean((fine - middle) ** 2, axis=(1, 2))
    return np.log(np.maximum(fine_energy, 1e-12) / np.maximum(middle_energy, 1e-12))


def fit_sharpness_reference(train_sharpness, val_sharpness):
    """The sharpness part of the domain reference: the training cells' median, and the
    threshold below which a validation cell is as soft as only :data:`FALSE_ALARM` of them."""
    return {
        "median": float(np.median(train_sharpness)),
        "threshold": float(np.quantile(val_sharpness, FALSE_ALARM)),
    }


def _softness(reference, sharpness):
    """Sharpness in units of its threshold: 1 at the threshold, above 1 softer, 0 or below
    at the training cells' median or sharper."""
    median, threshold = reference["median"], reference["threshold"]
    return (median - np.asarray(sharpness, np.float64)) / max(median - threshold, 1e-6)


def cell_features(model, crops, batch_size=256):
    """Encoder features of normalised crops (n, F): the mean and SD of every channel of every
    encoder level, at timestep 0."""
    import torch

    from napari_cytodiffusion.core.model.batches import crops_to_tensor

    out = []
    with torch.inference_mode():
        for start in range(0, len(crops), batch_size):
            x = crops_to_tensor(crops[start : start + batch_size], model)
            t = torch.zeros(len(x), dtype=torch.long, device=model.device)
            _, skips, _ = model.unet.encode(x, t)
            parts = []
            for level in skips:
                level = level.float()
                parts += [level.mean(dim=(2, 3)), level.std(dim=(2, 3))]
            out.append(torch.cat(parts, dim=1).cpu().numpy())
    if not out:
        return np.zeros((0, 0), np.float32)
    return np.concatenate(out).astype(np.float32)


def fit_domain_reference(
    train_features,
    train_colours,
    val_features,
    val_colours,
    train_sharpness=None,
    val_sharpness=None,
):
    """The domain reference: fitted on training cells, thresholded on validation cells.

    Parameters
    ----------
    train_features, val_features : ndarray (n, F)
        :func:`cell_features` of normalised training / validation crops.
    train_colours, val_colours : ndarray (n, 9) or None
        The colour references of each cell's smear (NaN where not found); without them the
        reference has no smear part (a lab's packed cells do not keep their smears').
    train_sharpness, val_sharpness : ndarray (n,), optional
        :func:`crop_sharpness` of the same crops; without them the reference has no
        sharpness part.

    Returns
    -------
    dict
        JSON-ready; the model's ``calibration["domain"]``.
    """
    train_features = np.asarray(train_features, np.float64)
    mean = train_features.mean(axis=0)
    centred = train_features - mean
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    variances = singular**2 / max(len(train_features) - 1, 1)
    d = max(1, min(COMPONENTS, len(variances) - 1, len(train_features) // CELLS_PER_COMPONENT))
    residual = float(max(variances[d:].mean(), 1e-8)) if len(variances) > d else 1e-8
    features = {
        "mean": mean.round(6).tolist(),
        "components": vt[:d].round(6).tolist(),
        "variances": variances[:d].round(8).tolist(),
        "residual_variance": residual,
    }
    reference = {"features": features, "false_alarm": FALSE_ALARM}
    features["threshold"] = _review_quantile(_feature_distance(features, val_features))
    if train_colours is not None and val_colours is not None:
        reference["colour"] = _fit_colour_reference(train_colours, val_colours)
    if train_sharpness is not None and val_sharpness is not None:
        reference["sharpness"] = fit_sharpness_reference(train_sharpness, val_sharpness)
    return reference


def _fit_colour_reference(train_colours, val_colours):
    colours = np.asarray(train_colours, np.float64)
    colour_mean = np.nanmean(colours, axis=0)
    filled = np.where(np.isnan(colours), colour_mean, colours)
    covariance = np.cov(filled.T) + np.diag(COLOUR_SD_FLOOR**2)
    colour = {
        "mean": colour_mean.round(6).tolist(),
        "precision": np.linalg.inv(covariance).round(4).tolist(),
    }
    colour["threshold"] = _review_quantile(_colour_distance(colour, val_colours))
    return colour


def _review_quantile(distances):
    """The ``1 - FALSE_ALARM`` quantile of validation cells' distances.

    Fewer cells than that quantile needs (a lab's few dozen held-back cells) would put it at
    their largest distance, which new cells of the same lab pass several times as often as
    intended; their log-normal fit's quantile is used instead.
    """
    from statistics import NormalDist

    distances = np.asarray(distances, np.float64)
    if len(distances) * FALSE_ALARM >= 1 or len(distances) < 3:
        return float(np.quantile(distances, 1 - FALSE_ALARM))
    logs = np.log(np.maximum(distances, 1e-12))
    z = NormalDist().inv_cdf(1 - FALSE_ALARM)
    return float(np.exp(logs.mean() + z * logs.std(ddof=1)))


def _feature_distance(reference, features):
    features = np.asarray(features, np.float64)
    centred = features - np.asarray(reference["mean"])
    components = np.asarray(reference["components"])
    projected = centred @ components.T
    inside = np.sum(projected**2 / np.asarray(reference["variances"]), axis=1)
    outside = np.sum(centred**2, axis=1) - np.sum(projected**2, axis=1)
    dims = centred.shape[1] - len(components)
    # Both parts in units of their expected value for a training cell, so each counts fairly.
    distance = inside / len(components) + np.maximum(outside, 0) / reference[
        "residual_variance"
    ] / max(dims, 1)
    return np.sqrt(distance / 2)


def _colour_distance(reference, colours):
    colours = np.asarray(colours, np.float64)
    mean = np.asarray(reference["mean"])
    centred = np.where(np.isnan(colours), 0.0, colours - mean)
    d2 = np.einsum("ni,ij,nj->n", centred, np.asarray(reference["precision"]), centred)
    return np.sqrt(np.maximum(d2, 0) / len(mean))


def domain_parts(reference, features, colours=None, sharpness=None):
    """(cell part, smear part) of the domain-shift score (n,) each, in units of their
    thresholds; the smear part is NaN without colours or a colour reference. The cell part is
    the larger of the encoder features' distance and the crop's softness, where the reference
    and ``sharpness`` (:func:`crop_sharpness`) both have it."""
    cell = _feature_distance(reference["features"], features) / reference["features"]["threshold"]
    if sharpness is not None and "sharpness" in reference:
        cell = np.fmax(cell, _softness(reference["sharpness"], sharpness))
    if colours is None or "colour" not in reference:
        return cell, np.full(len(cell), np.nan)
    smear = _colour_distance(reference["colour"], colours) / reference["colour"]["threshold"]
    return cell, smear


def domain_scores(model, crops, colours=None):
    """(domain-shift score, softness) of normalised crops, (n,) each (see the module notes;
    softness: :func:`_softness`, above 1 softer than the training cells); NaN for every cell
    where the model has no domain reference (models calibrated or adapted before it existed), and
    softness NaN where the reference has no sharpness part."""
    nan = np.full(len(crops), np.nan)
    reference = (model.calibration or {}).get("domain")
    if not reference or len(crops) == 0:
        return nan, nan
    crops = np.asarray(crops, np.float32)
    sharpness = crop_sharpness(crops)
    cell, smear = domain_parts(reference, cell_features(model, crops), colours, sharpness)
    softness = _softness(reference["sharpness"], sharpness) if "sharpness" in reference else nan
    return np.fmax(cell, smear), softness


def shift_trust(shift, decay):
    """How far a call's probabilities are trusted, from its domain-shift score (n,): 1 up to
    the review threshold (shift 1, or unknown), ``exp(-decay * (shift - 1))`` beyond it."""
    excess = np.nan_to_num(np.asarray(shift, np.float64) - 1.0, nan=0.0)
    return np.exp(-float(decay) * np.maximum(excess, 0.0))


def trusted_probabilities(probabilities, shift, decay):
    """Class probabilities (n, k) of cells unlike the training smears, made honest.

    The calibration that turns evidence into probabilities was fitted on training smears; on
    an unfamiliar smear calls are right less often than it says (the shipped model gave
    another lab's cells a mean top probability of 0.96 and 6 % right calls). Each cell's
    probabilities are mixed with the uniform distribution by its :func:`shift_trust`, which
    keeps the call and its ranking and leaves cells of familiar smears as they were.

    Examples
    --------
    >>> p = np.array([[0.98, 0.01, 0.01], [0.98, 0.01, 0.01]])
    >>> trusted_probabilities(p, np.array([0.5, 3.0]), decay=1.0).round(2)
    array([[0.98, 0.01, 0.01],
           [0.42, 0.29, 0.29]])
    """
    probabilities = np.asarray(probabilities, np.float64)
    trust = shift_trust(shift, decay)[:, None]
    return trust * probabilities + (1.0 - trust) / probabilities.shape[1]


def fit_trust_decay(probabilities, truth, shift):
    """The ``decay`` of :func:`trusted_probabilities` that makes calls on smears unlike the
    training smears as likely as they are right: the maximum-likelihood value of the true
    classes' trusted probabilities over a grid from 0 to 20.

    Parameters
    ----------
    probabilities : ndarray (n, k)
        Calibrated probabilities, before trust.
    truth : ndarray (n,)
        Index of each cell's true class.
    shift : ndarray (n,)
        Domain-shift scores; only cells above 1 inform the fit.
    """
    probabilities = np.asarray(probabilities, np.float64)
    truth = np.asarray(truth, int)
    true_p = probabilities[np.arange(len(truth)), truth]
    k = probabilities.shape[1]
    grid = np.concatenate([[0.0], np.geomspace(0.01, 20.0, 200)])
    likelihood = [
        np.mean(np.log(np.maximum(t * true_p + (1 - t) / k, 1e-12)))
        for t in (shift_trust(shift, decay) for decay in grid)
    ]
    return float(grid[int(np.argmax(likelihood))])


def smear_domain_shift(scores):
    """A smear's domain-shift score: the median of its cells' (NaN when none is known)."""
    return _median_of_known(scores)


def smear_softness(values):
    """A smear's softness: the median of its cells' (NaN when none is known)."""
    return _median_of_known(values)


def _median_of_known(values):
    values = np.asarray(values, float)
    values = values[~np.isnan(values)]
    return float(np.median(values)) if len(values) else float("nan")
