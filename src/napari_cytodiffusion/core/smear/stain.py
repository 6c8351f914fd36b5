"""Stain measures of a Romanowsky-stained smear, relative to its own background.

Every module that asks "how much stain is here?" or "is this chromatin?" asks it here, so the
scale estimate, the central-cell locator and the segmentation agree on what a nucleus is.
"""

import numpy as np

# Green-minus-blue optical density above which a pixel is chromatin whatever the smear.
NUCLEUS_SCORE = 0.35
# A smear's own chromatin threshold is at least NUCLEUS_SCORE; the upper bound keeps the pale
# edges of very dark nuclei (which push Otsu's threshold up) inside.
MAX_NUCLEUS_THRESHOLD = 0.7
# In a crowded field (at least CROWDED_FIELD red cells' worth of stain) the stained pixels are
# mostly red cells, and chromatin must score at least RED_CELL_RATIO times their typical
# score: with some stains (Wright, phone photos) the red cells are purple too.
CROWDED_FIELD = 60
RED_CELL_RATIO = 4.0
# The black vignette of a photo through the eyepiece: this dark in every channel.
VIGNETTE_DENSITY = 1.5


def optical_density(rgb, background):
    """Per-channel optical density relative to the background (0 on the empty slide).

    Parameters
    ----------
    rgb : ndarray (..., 3)
        Float RGB in [0, 1].
    background : array of 3 floats
        The smear's background colour.

    Returns
    -------
    ndarray (..., 3) float32, never negative.
    """
    ratio = np.clip(rgb, 1e-3, None) / np.clip(np.asarray(background, np.float32), 1e-3, None)
    return np.clip(-np.log(ratio), 0.0, None).astype(np.float32, copy=False)


def total_density(density):
    """All stain of every kind: the optical density summed over the channels."""
    return density.sum(axis=-1)


def nucleus_score(density):
    """Chromatin score of each pixel: green minus blue optical density.

    Romanowsky-stained chromatin absorbs green and passes blue; haemoglobin absorbs both, and
    the background neither, so nuclei (and platelets) stand out at any stain intensity.
    """
    return density[..., 1] - density[..., 2]


def chromatin_threshold(score, total, stain, cell_area):
    """The chromatin score above which a pixel of this smear is nucleus (or platelet).

    Parameters
    ----------
    score, total : ndarray
        :func:`nucleus_score` and :func:`total_density` of (sampled) pixels of the field.
    stain : float
        The total density above which a pixel is stained.
    cell_area : float
        A red cell's area in the same (sampled) pixels.

    Returns
    -------
    float
        Otsu's threshold between chromatin and the rest of the stain, within
        ``NUCLEUS_SCORE`` to ``MAX_NUCLEUS_THRESHOLD``, raised to ``RED_CELL_RATIO`` times
        the red cells' typical score in a crowded field.
    """
    stained = score[total > stain]
    chromatin = otsu_threshold(stained, default=NUCLEUS_SCORE)
    chromatin = float(np.clip(chromatin, NUCLEUS_SCORE, MAX_NUCLEUS_THRESHOLD))
    if stained.size >= CROWDED_FIELD * cell_area:
        chromatin = max(chromatin, RED_CELL_RATIO * float(np.median(stained)))
    return chromatin


def nucleus_mask(density, threshold=NUCLEUS_SCORE):
    """Boolean mask of nuclei and platelets from an :func:`optical_density` image."""
    return nucleus_score(density) > threshold


def vignette(density):
    """Pixels of the black vignette around a photo's field of view.

    The vignette is dark and grey (about as dark in every channel) and reaches the image
    border; a very dark nucleus is purple (far less dense in blue) and lies inside the field.
    Each pixel is judged as it is and by the mean light of its 5 x 5 neighbourhood: a noisy
    camera's black field has channels far apart pixel by pixel, but not on average. Its soft
    rim, grey and at least half as dark, belongs to it where it joins the black: a camera
    that lifts its blacks leaves little of the vignette fully black.
    """
    from scipy import ndimage as ndi

    local = -np.log(np.clip(ndi.uniform_filter(np.exp(-density), size=(5, 5, 1)), 1e-6, None))
    black = _dark_and_grey(density) | _dark_and_grey(local)
    if not black.any():
        return black
    regions, _ = ndi.label(black | _dark_and_grey(local, VIGNETTE_DENSITY / 2))
    border = np.concatenate([regions[0], regions[-1], regions[:, 0], regions[:, -1]])
    seeded = np.unique(regions[black])
    return np.isin(regions, np.intersect1d(seeded[seeded > 0], border))


def _dark_and_grey(density, least_density=VIGNETTE_DENSITY):
    darkest, palest = density.max(axis=-1), density.min(axis=-1)
    return (palest > least_density) & (darkest - palest < 0.5 * darkest)


def fill_holes(mask):
    """``mask`` with its holes filled: what of the rest does not reach the border.

    The same as ``scipy.ndimage.binary_fill_holes``, in one labelling pass instead of a
    dilation repeated across the hole.
    """
    from scipy import ndimage as ndi

    rest, _ = ndi.label(~mask)
    border = np.concatenate([rest[0], rest[-1], rest[:, 0], rest[:, -1]])
    return mask | ~np.isin(rest, np.unique(border))


def otsu_threshold(values, default):
    """Otsu's threshold of ``values``, or ``default`` when they are too few or all equal."""
    from skimage.filters import threshold_otsu

    values = np.asarray(values)
    if values.size < 16 or np.ptp(values) <= 0:
        return float(default)
    return float(threshold_otsu(values))
