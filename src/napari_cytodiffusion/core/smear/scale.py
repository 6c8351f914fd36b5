"""Scale and colour references of a smear, read off the image itself.

Red cells are the smear's own ruler: their diameter (about 7.5 um) is nearly constant across
people, stains and microscopes, so the median red-cell diameter in pixels tells the
magnification. The brightest, least stained part of the field is the background and gives the
illumination colour.
"""

import os

import numpy as np
from scipy import ndimage as ndi

from napari_cytodiffusion.core.progress import report
from napari_cytodiffusion.core.smear.image import SmearPixels
from napari_cytodiffusion.core.smear.stain import (
    nucleus_mask,
    optical_density,
    otsu_threshold,
    total_density,
    vignette,
)

# Image-wide colour statistics are read off an overview of at most this many pixels.
_OVERVIEW_PIXELS = 1_000_000


def overview(rgb):
    """(image shrunk to at most a megapixel by block means, the integer factor used).

    ``rgb`` is a float RGB array or a :class:`~napari_cytodiffusion.core.smear.image.SmearPixels`
    view, which is read band by band.
    """
    if rgb.shape[0] * rgb.shape[1] <= _OVERVIEW_PIXELS:
        return np.asarray(rgb), 1
    if not isinstance(rgb, SmearPixels):
        rgb = SmearPixels(rgb)
    return rgb.overview(_OVERVIEW_PIXELS)


def background_colour(rgb):
    """Return the RGB colour of the empty background of a float RGB smear image."""
    small, _ = overview(rgb)
    brightness = small.sum(axis=-1)
    bright = small[brightness >= np.percentile(brightness, 80)]
    return np.median(bright, axis=0).astype(np.float32)


def estimate_rbc_diameter(rgb, background=None, progress=None):
    """Estimate the median red-cell diameter of a smear in pixels.

    Parameters
    ----------
    rgb : ndarray
        Float RGB image in [0, 1] (see :func:`~napari_cytodiffusion.core.smear.image.to_rgb_float`).
    background : array of 3 floats, optional
        The image's background colour (:func:`background_colour`); measured when not given.
    progress : callable, optional
        Called as ``progress(done, total)`` after every radius tried; raise
        ``progress.Cancelled`` from it to stop.

    Returns
    -------
    float
        The typical red-cell diameter in pixels of ``rgb``.

    Notes
    -----
    Red cells are round: the stain-density edges of a cell of radius R, each followed a
    distance R inwards (against its gradient), all meet at the cell's centre. The radius at
    which these votes pile up most tightly, relative to votes cast sideways (which never pile
    up), is the red-cell radius. This works for filled cells, for pale-centred rings, and for
    overlapping clumps, where the edges are still arcs of the cells' own circles. A second
    pass, near the first answer, leaves out the white cells (the stained blobs around the
    nuclei), which can outvote the red cells in a single-cell image. Images over 1.5
    megapixels are measured on the three most stained 512-px windows; the median is returned.

    The result is in the units the shipped model was trained with: the estimate's median over
    PBC training images (30.8 px at the stain-density half-maximum edge) is scaled to the 29 px
    used there, so a crop of any smear covers the same field in micrometres as a PBC crop.
    """
    from concurrent.futures import ThreadPoolExecutor

    windows = _scale_windows(rgb)
    done = [0] * len(windows)

    def measure(number):
        def tried(count):
            done[number] = count
            report(progress, sum(done), len(windows) * _RADII_TRIED)

        # A window's own background, unless the window is the whole image.
        pixels = np.asarray(rgb[windows[number]])
        whole = len(windows) == 1 and background is not None
        local = background if whole else background_colour(pixels)
        return _radial_symmetry_diameter(pixels, local, tried)

    # Windows are measured side by side: numpy and scipy release the GIL in their loops.
    with ThreadPoolExecutor(max_workers=min(len(windows), os.cpu_count() or 1)) as pool:
        estimates = list(pool.map(measure, range(len(windows))))
    return float(np.median(estimates) * _CALIBRATION)


# PBC training images measure 30.8 px raw; the model was trained with 29 px for them.
_CALIBRATION = 29.0 / 30.8
# Votes are cast on a copy of the image scaled so that the radius tried spans this many pixels.
_VOTE_RADIUS = 6.0
_RADII_TRIED = 48
_WHOLE_IMAGE_PIXELS = 1_500_000
_WINDOW = 512


def _scale_windows(rgb, count=3):
    """The whole image if small, else the ``count`` most stained of a grid of windows."""
    rows, cols = rgb.shape[:2]
    if rows * cols <= _WHOLE_IMAGE_PIXELS:
        return [(slice(None), slice(None))]
    side_r, side_c = min(rows, _WINDOW), min(cols, _WINDOW)
    starts_r = np.linspace(0, rows - side_r, max(1, int(np.ceil(rows / side_r)))).astype(int)
    starts_c = np.linspace(0, cols - side_c, max(1, int(np.ceil(cols / side_c)))).astype(int)
    small, factor = overview(rgb)
    density = total_density(optical_density(small, background_colour(small)))
    candidates = []
    for r0 in starts_r:
        for c0 in starts_c:
            patch = density[
                r0 // factor : (r0 + side_r) // factor, c0 // factor : (c0 + side_c) // factor
            ]
            stained = float(np.mean(patch > 0.1)) if patch.size else 0.0
            candidates.append((stained, (slice(r0, r0 + side_r), slice(c0, c0 + side_c))))
    candidates.sort(key=lambda item: -item[0])
    return [window for _, window in candidates[:count]]


def _radial_symmetry_diameter(rgb, background, tried):
    if min(rgb.shape[:2]) < 4 * _VOTE_RADIUS:
        return float(min(rgb.shape[:2]) / 4)
    channels = optical_density(rgb, background)
    density = ndi.gaussian_filter(total_density(channels), 1.0)
    radii = np.geomspace(4.0, min(rgb.shape[:2]) / 3, _RADII_TRIED)
    in_field = _in_field(channels)
    first = _best_radius(density, in_field, radii, lambda done: tried(done // 2))
    # Second look without the white cells, which in a single-cell image can outvote the red
    # cells: the stained blob around every nucleus bigger than a platelet is left out, as far
    # as a white cell reaches.
    nuclei = nucleus_mask(channels)
    labels, count = ndi.label(nuclei)
    sizes = ndi.sum(nuclei, labels, np.arange(1, count + 1))
    # Nuclei at least 0.3 red-cell diameters across (first is a radius).
    big = np.isin(labels, 1 + np.flatnonzero(sizes >= np.pi * (0.3 * first) ** 2))
    blobs, _ = ndi.label(density > otsu_threshold(density[~nuclei], default=0.1))
    white = np.isin(blobs, np.unique(blobs[big])[1:]) | big
    white &= ndi.distance_transform_edt(~big) <= 1.4 * first
    voters = ~ndi.binary_dilation(white, iterations=3) & in_field
    if voters.mean() < 0.25 or not white.any():
        tried(_RADII_TRIED)
        return 2 * first
    # Red cells are smaller than the white cells they might have been mistaken for, and not
    # much smaller than that: stay near the first answer.
    near = radii[(radii >= 0.45 * first) & (radii <= 1.1 * first)]
    if len(near) < 3:
        tried(_RADII_TRIED)
        return 2 * first
    second = _best_radius(density, voters, near, lambda done: tried((_RADII_TRIED + done) // 2))
    return 2 * second


def _in_field(density):
    """Pixels away from a photo's black vignette, whose edge, one huge circle, would outvote
    the cells."""
    black = vignette(density)
    if not black.any():
        return np.ones(black.shape, bool)
    return ndi.distance_transform_edt(~black) > 2 * _VOTE_RADIUS


def _best_radius(density, voters, radii, tried):
    pyramid = _pyramid(density, voters, radii[-1] / _VOTE_RADIUS)
    scores = np.zeros(len(radii))
    for done, radius in enumerate(radii, 1):
        scores[done - 1] = _symmetry_score(pyramid, radius)
        tried(done)
    return _peak(radii, scores)


def _peak(radii, scores):
    """Radius of the highest score, refined by a parabola through its neighbours (log radius)."""
    best = int(np.argmax(scores))
    if 0 < best < len(radii) - 1:
        left, mid, right = scores[best - 1 : best + 2]
        curvature = left - 2 * mid + right
        if curvature < 0:
            shift = 0.5 * (left - right) / curvature
            step = np.log(radii[1] / radii[0])
            return float(radii[best] * np.exp(np.clip(shift, -0.5, 0.5) * step))
    return float(radii[best])


def _pyramid(density, voters, largest_factor):
    """Density and voter mask at 1, 1/2, 1/4, ... scale (block means), as far as needed."""
    levels = [(density, voters)]
    while 2 ** len(levels) <= largest_factor and min(levels[-1][0].shape) >= 8:
        image, mask = levels[-1]
        rows, cols = image.shape[0] // 2 * 2, image.shape[1] // 2 * 2
        image = image[:rows, :cols].reshape(rows // 2, 2, cols // 2, 2).mean(axis=(1, 3))
        mask = mask[:rows, :cols].reshape(rows // 2, 2, cols // 2, 2).all(axis=(1, 3))
        levels.append((image, mask))
    return levels


def _symmetry_score(pyramid, radius):
    """How tightly edge votes cast ``radius`` inwards pile up, relative to sideways votes."""
    level = int(np.clip(np.floor(np.log2(radius / _VOTE_RADIUS)), 0, len(pyramid) - 1))
    image, mask = pyramid[level]
    zoom = _VOTE_RADIUS * 2**level / radius
    if abs(zoom - 1) > 1e-3:
        image = ndi.zoom(image, zoom, order=1)
        mask = ndi.zoom(mask.astype(np.uint8), zoom, order=0).astype(bool)
        rows, cols = min(image.shape[0], mask.shape[0]), min(image.shape[1], mask.shape[1])
        image, mask = image[:rows, :cols], mask[:rows, :cols]
    grad_r, grad_c = ndi.sobel(image, 0), ndi.sobel(image, 1)
    magnitude = np.hypot(grad_r, grad_c)
    edges = mask & (magnitude > np.percentile(magnitude, 70)) & (magnitude > 0)
    if edges.sum() < 10:
        return 0.0
    rows, cols = np.nonzero(edges)
    weight = magnitude[edges]
    unit_r, unit_c = grad_r[edges] / weight, grad_c[edges] / weight
    inward = _vote_map(
        image.shape, rows + _VOTE_RADIUS * unit_r, cols + _VOTE_RADIUS * unit_c, weight
    )
    sideways = _vote_map(
        image.shape, rows + _VOTE_RADIUS * unit_c, cols - _VOTE_RADIUS * unit_r, weight
    )
    return float((inward**2).sum() / max((sideways**2).sum(), 1e-12))


def _vote_map(shape, rows, cols, weight):
    rows, cols = np.rint(rows).astype(int), np.rint(cols).astype(int)
    inside = (rows >= 0) & (rows < shape[0]) & (cols >= 0) & (cols < shape[1])
    votes = np.bincount(
        rows[inside] * shape[1] + cols[inside],
        weights=weight[inside],
        minlength=shape[0] * shape[1],
    )
    return ndi.gaussian_filter(votes.reshape(shape), 1.0)
