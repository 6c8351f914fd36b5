"""Scale and colour references of a smear, read off the image itself.

Red cells are the smear's own ruler: their diameter (about 7.5 um) is nearly constant across
people, stains and microscopes, so the median red-cell diameter in pixels tells the
magnification. The brightest, least stained part of the field is the background and gives the
illumination colour.
"""

import numpy as np
from scipy import ndimage as ndi

# Working resolution for the estimates: enough to resolve red cells, cheap on huge fields.
_WORK_PIXELS = 1_000_000


def _downsample(rgb):
    factor = max(1, int(np.ceil(np.sqrt(rgb.shape[0] * rgb.shape[1] / _WORK_PIXELS))))
    if factor == 1:
        return rgb, 1
    rows = rgb.shape[0] // factor * factor
    cols = rgb.shape[1] // factor * factor
    small = rgb[:rows, :cols].reshape(rows // factor, factor, cols // factor, factor, 3)
    return small.mean(axis=(1, 3)), factor


def background_colour(rgb):
    """Return the RGB colour of the empty background of a float RGB smear image."""
    small, _ = _downsample(rgb)
    brightness = small.sum(axis=-1)
    bright = small[brightness >= np.percentile(brightness, 80)]
    return np.median(bright, axis=0).astype(np.float32)


def stain_density(rgb, background=None):
    """Per-pixel optical density relative to the background (0 on background, larger on stain)."""
    if background is None:
        background = background_colour(rgb)
    ratio = np.clip(rgb, 1e-3, None) / np.clip(background, 1e-3, None)
    return np.clip(-np.log(ratio), 0.0, None).sum(axis=-1)


def foreground_mask(rgb, background=None):
    """Boolean mask of everything stained (cells of all kinds) against the background."""
    from skimage.filters import threshold_otsu

    if background is None:
        background = background_colour(rgb)
    density = stain_density(rgb, background)
    # Nuclei are far darker than red cells; leave them out of the threshold so that the
    # faint red cells are not lumped in with the background.
    nuclei = nucleus_mask(rgb, background)
    pale = density[~nuclei] if (~nuclei).sum() > 16 else density.ravel()
    threshold = max(threshold_otsu(pale), 0.08)
    return (density > threshold) | nuclei


def nucleus_mask(rgb, background=None):
    """Boolean mask of nuclei and platelets, which Romanowsky stains turn blue to purple.

    Red cells pass red light and absorb blue; nuclei absorb red. The red minus half the blue
    optical density is therefore high on nuclei and near zero on red cells and background,
    across the stains and microscopes we have seen.
    """
    if background is None:
        background = background_colour(rgb)
    density = -np.log(np.clip(rgb, 1e-3, None) / np.clip(background, 1e-3, None))
    return (density[..., 0] - 0.5 * density[..., 2]) > 0.3


def estimate_rbc_diameter(rgb):
    """Estimate the median red-cell diameter of a smear in pixels.

    Parameters
    ----------
    rgb : ndarray
        Float RGB image in [0, 1] (see :func:`napari_cytodiffusion.core.image.to_rgb_float`).

    Returns
    -------
    float
        The typical cell diameter in pixels of ``rgb``. Measured from the distance-transform
        ridges of the stained area, so touching and overlapping red cells still count by their
        own width.
    """
    from skimage.feature import peak_local_max

    small, factor = _downsample(rgb)
    background = background_colour(small)
    mask = ndi.binary_fill_holes(foreground_mask(small, background))
    mask = ndi.binary_opening(mask, iterations=1)
    # White cells and platelets are not red cells: drop every stained blob that holds a nucleus.
    components, _ = ndi.label(mask)
    nucleated = np.unique(components[nucleus_mask(small, background) & mask])
    mask &= ~np.isin(components, nucleated[nucleated > 0])
    if mask.mean() < 0.005:
        return float(min(rgb.shape[:2]) / 4)
    # Edge padding so cells cut by the border keep their width.
    padded = np.pad(mask, 1, mode="edge")
    distance = ndi.distance_transform_edt(padded)[1:-1, 1:-1]
    peaks = peak_local_max(distance, min_distance=2, threshold_abs=1.5, exclude_border=False)
    if len(peaks) == 0:
        return float(2 * distance.max() * factor)
    return float(2 * np.median(distance[tuple(peaks.T)]) * factor)
