"""Scale and colour references of a smear, read off the image itself.

Red cells are the smear's own ruler: their diameter (about 7.5 um) is nearly constant across
people, stains and microscopes, so the median red-cell diameter in pixels tells the
magnification. The brightest, least stained part of the field is the background and gives the
illumination colour.
"""

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from napari_cytodiffusion.core.progress import report
from napari_cytodiffusion.core.smear.image import SmearPixels
from napari_cytodiffusion.core.smear.stain import (
    NUCLEUS_SCORE,
    chromatin_threshold,
    fill_holes,
    nucleus_score,
    optical_density,
    otsu_threshold,
    total_density,
    vignette,
)
from napari_cytodiffusion.core.smear.threads import in_threads

# Image-wide colour statistics are read off an overview of at most this many pixels.
_OVERVIEW_PIXELS = 1_000_000


def overview(rgb):
    """(image shrunk to at most a megapixel by block means, the integer factor used).

    ``rgb`` is a float RGB array or a :class:`~napari_cytodiffusion.core.smear.image.SmearPixels`
    view, which is read band by band.
    """
    if overview_factor(rgb.shape) == 1:
        return np.asarray(rgb), 1
    if not isinstance(rgb, SmearPixels):
        rgb = SmearPixels(rgb)
    return rgb.overview(_OVERVIEW_PIXELS)


def overview_factor(shape):
    """The factor :func:`overview` shrinks an image of ``shape`` by."""
    return max(1, int(np.ceil(np.sqrt(shape[0] * shape[1] / _OVERVIEW_PIXELS))))


def background_colour(rgb):
    """Return the RGB colour of the empty background of a float RGB smear image."""
    small, _ = overview(rgb)
    brightness = small.sum(axis=-1)
    bright = small[brightness >= np.percentile(brightness, 80)]
    return np.median(bright, axis=0).astype(np.float32)


# Where a red-cell diameter came from.
GIVEN, RED_CELLS, WHITE_CELL = "given", "red cells", "white cell"
# Fewer red cells than this (in red-cell areas of stain outside the white cells) are too few
# to measure: the scale then comes from the white cell.
MIN_RED_CELLS = 2.0
# A white cell's diameter in red-cell diameters, typically (see docs/segmentation.md).
WHITE_CELL_RATIO = 2.0
# Votes are cast on a copy of the image scaled so that the radius tried spans this many pixels.
_VOTE_RADIUS = 6.0
# Radii tried: first all plausible ones (from _MIN_RADIUS px to a third of the image), then
# near the first answer (factors of it).
_MIN_RADIUS = 3.0
_NEAR = (0.45, 1.25)
_WIDE_RADII_TRIED = 9
_RADII_TRIED = 10
# Other peaks of the wide search scoring within this share of the best are measured closely too.
_TIE = 0.05
# The scale is measured on the overview unless a red cell spans fewer pixels there than this.
_MIN_OVERVIEW_DIAMETER = 10.0
_WINDOW = 512
# A window measures the scale only if this many red cells (first guess) fit across it.
_CELLS_ACROSS = 6


@dataclass(frozen=True)
class ScaleEstimate:
    """A red-cell diameter and where it came from.

    Attributes
    ----------
    diameter : float
        Red-cell diameter in pixels.
    source : str
        ``RED_CELLS`` (measured on them) or ``WHITE_CELL`` (too few red cells: from the
        white cell's size and a typical ratio).
    red_cells : float
        How many red cells' worth of stain the measure had outside the white cells.
    """

    diameter: float
    source: str
    red_cells: float


def estimate_rbc_diameter(rgb, background=None, progress=None):
    """Estimate the median red-cell diameter of a smear in pixels.

    The diameter of :func:`estimate_scale`; see there.
    """
    return estimate_scale(rgb, background, progress).diameter


def estimate_scale(rgb, background=None, progress=None):
    """Estimate the red-cell diameter of a smear, and say where the estimate came from.

    Parameters
    ----------
    rgb : ndarray or SmearPixels
        Float RGB image in [0, 1] (see :func:`~napari_cytodiffusion.core.smear.image.to_rgb_float`).
    background : array of 3 floats, optional
        The image's background colour (:func:`background_colour`); measured when not given.
    progress : callable, optional
        Called as ``progress(done, total)`` after every radius tried; raise
        ``progress.Cancelled`` from it to stop.

    Returns
    -------
    ScaleEstimate

    Notes
    -----
    Red cells are round: the stain-density edges of a cell of radius R, each followed a
    distance R inwards (against its gradient), all meet at the cell's centre. The radius at
    which these votes pile up most tightly, relative to votes cast sideways (which never pile
    up), is the red-cell radius. This works for filled cells, for pale-centred rings, and for
    overlapping clumps, where the edges are still arcs of the cells' own circles. The radii
    tried are first all plausible ones, then those near the first answer with the white
    cells (the stained blobs around large nuclei) left out: in a single-cell image they can
    outvote the red cells. Where another peak of the first search scores nearly as high (a
    white cell's granules under some stains), it is measured the same way, and the answer
    that scores best closely is kept.

    A large image is measured on the most stained 512-px window of its one-megapixel
    overview (block means), on the whole overview where fewer than ``_CELLS_ACROSS`` red cells
    fit across a window (a high magnification), or on its three most stained 512-px windows
    where a red cell spans too few pixels in the overview. With
    fewer than ``MIN_RED_CELLS`` red cells outside the white cells (a tight crop around one
    white cell) the votes mean little; the diameter is then the largest white cell's
    diameter over ``WHITE_CELL_RATIO``, and ``source`` says so.
    """
    small, factor = overview(rgb)
    background = background_colour(small) if background is None else background
    # Plenty of red cells in one window of a large overview: the rest would add only time.
    window = small[_windows(small, background, count=1)[0]]
    field = _ScaleField(window, background)
    if factor > 1 and field.first_guess() < _MIN_OVERVIEW_DIAMETER:
        return _median_of_windows(rgb, background, progress)
    if window.shape != small.shape and field.first_guess() * _CELLS_ACROSS > min(window.shape[:2]):
        # At a high magnification a window holds a few red cells, and a clump or a white cell
        # outvotes them: the whole overview (at most a megapixel) is measured instead.
        field = _ScaleField(small, background)
    estimate = field.estimate(progress)
    return ScaleEstimate(estimate.diameter * factor, estimate.source, estimate.red_cells)


def white_cell_diameter(rgb, background=None):
    """The red-cell diameter from the white cell alone: the largest white cell's diameter
    over ``WHITE_CELL_RATIO`` (the fallback of :func:`estimate_scale`); NaN without one."""
    small, factor = overview(rgb)
    background = background_colour(small) if background is None else background
    return _ScaleField(small, background).white_cell_diameter() * factor


def _median_of_windows(rgb, background, progress):
    windows = _windows(rgb, background)
    estimates = []
    for done, window in enumerate(windows, 1):
        estimates.append(_ScaleField(np.asarray(rgb[window]), background).estimate())
        report(progress, done, len(windows))
    return sorted(estimates, key=lambda e: e.diameter)[len(estimates) // 2]


def _windows(rgb, background, count=3):
    """The ``count`` most stained of a grid of ``_WINDOW`` px windows of a large image whose
    background colour is ``background``."""
    rows, cols = rgb.shape[:2]
    side_r, side_c = min(rows, _WINDOW), min(cols, _WINDOW)
    starts_r = np.linspace(0, rows - side_r, max(1, int(np.ceil(rows / side_r)))).astype(int)
    starts_c = np.linspace(0, cols - side_c, max(1, int(np.ceil(cols / side_c)))).astype(int)
    small, factor = overview(rgb)
    density = total_density(optical_density(small, background))
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


class _ScaleField:
    """One image (an overview or a window) measured for its red-cell scale."""

    def __init__(self, rgb, background):
        channels = optical_density(rgb, background)
        self.density = ndi.gaussian_filter(total_density(channels), 1.0)
        self.in_field = _in_field(channels)
        self.score = nucleus_score(channels)
        always = self.score > NUCLEUS_SCORE
        self.stain = otsu_threshold(self.density[self.in_field & ~always], default=0.1)
        self.stained = fill_holes(self.density > self.stain) & self.in_field
        self._guesses = None

    def first_guess(self, progress=None):
        """A red cell's diameter from the votes over a wide range of radii, all cells voting."""
        return self.first_guesses(progress)[0]

    def first_guesses(self, progress=None):
        """The wide search's diameter, then those of its other peaks that score within
        ``_TIE`` of it (another lab's stain can bring a white cell's granules level with
        the red cells there)."""
        if self._guesses is None:
            self._guesses = _wide_diameters(self.density, self.in_field, progress)
        return self._guesses

    def estimate(self, progress=None):
        """The :class:`ScaleEstimate` of this image: of the wide search's near-equal answers,
        the one whose red cells, measured closely with the white cells left out, score best."""
        guesses = self.first_guesses(lambda done, total: report(progress, done, 2 * total))

        def refining(done, total):
            report(progress, total + done, 2 * total)

        best, best_score = None, -np.inf
        for i, guess in enumerate(guesses):
            white = self.white_cells(guess)
            voters = ~ndi.binary_dilation(white, iterations=3) & self.in_field
            red_cells = float((self.stained & voters).sum() / (np.pi / 4 * guess**2))
            if red_cells < MIN_RED_CELLS and white.any():
                if i == 0:  # the wide search's own answer: too few red cells
                    report(progress, 1, 1)
                    return ScaleEstimate(self.white_cell_diameter(), WHITE_CELL, red_cells)
                continue
            if voters.mean() < 0.25:
                voters = self.in_field
            radii = guess / 2 * np.geomspace(*_NEAR, _RADII_TRIED)
            # Progress follows the wide search's own answer; the others are rare and short.
            diameter, score = _radial_diameter(
                self.density, voters, radii, refining if i == 0 else None
            )
            if best is None or score > best_score:
                best, best_score = ScaleEstimate(float(diameter), RED_CELLS, red_cells), score
        return best

    def white_cells(self, guess=None):
        """The white cells: stained blobs around nuclei (sizes from ``guess``, by default the
        first guess)."""
        guess = self.first_guess() if guess is None else guess
        field = self.in_field
        threshold = chromatin_threshold(
            self.score[field], self.density[field], self.stain, np.pi / 4 * guess**2
        )
        return _white_cells(self.stained, (self.score > threshold) & field, guess)

    def white_cell_diameter(self):
        """The red-cell diameter from the largest white cell (NaN without one)."""
        white = self.white_cells()
        if not white.any():
            return float("nan")
        return _largest_diameter(white) / WHITE_CELL_RATIO


def _wide_diameters(density, voters, progress):
    """Twice the red-cell radius among all plausible radii, from ``_MIN_RADIUS`` px to a
    third of the image; then twice the radius of every other peak scoring within ``_TIE``."""
    top = max(min(density.shape) / 3, 2 * _MIN_RADIUS)
    radii = np.geomspace(_MIN_RADIUS, top, _WIDE_RADII_TRIED)
    searched = _radial_scores(density, voters, radii, progress, _MIN_RADIUS)
    if searched is None:
        return [float(min(density.shape) / 4)]
    radii, scores = searched
    best = int(np.argmax(scores))
    peaks = [
        i
        for i in range(len(scores))
        if i != best
        and scores[i] >= (1 - _TIE) * scores[best]
        and scores[i] >= scores[max(i - 1, 0)]
        and scores[i] >= scores[min(i + 1, len(scores) - 1)]
    ]
    return [2 * _peak(radii, scores)] + [
        2 * _peak(radii[max(i - 1, 0) : i + 2], scores[max(i - 1, 0) : i + 2]) for i in peaks
    ]


def _radial_diameter(density, voters, radii, progress):
    """(Twice the radius among ``radii``, in pixels, where edge votes pile up most tightly,
    the highest score)."""
    searched = _radial_scores(density, voters, radii, progress)
    if searched is None:
        return float(min(density.shape) / 4), -np.inf
    return 2 * _peak(*searched), float(np.max(searched[1]))


def _radial_scores(density, voters, radii, progress, smallest=_VOTE_RADIUS):
    """(radii, scores) of how tightly edge votes pile up at each radius; None where too few
    radii fit the image.

    The votes are counted on a copy shrunk by block means so that the smallest radius tried
    spans at least ``smallest`` pixels: large red cells cost no more than small ones.
    """
    from napari_cytodiffusion.core.smear.resample import block_mean

    shrink = max(1, int(radii[0] / smallest))
    small = block_mean(density, shrink)
    mask = block_mean(voters.astype(np.float32), shrink) > 0.99
    radii = radii[radii / shrink <= min(small.shape) / 3]
    if len(radii) < 3:
        return None

    def tried(done):
        report(progress, done, len(radii))

    return radii, _radius_scores(small, mask, radii / shrink, tried)


def _white_cells(stained, nuclei, diameter):
    """The stained blobs around nuclei of a white cell's size, as far as a white cell reaches."""
    labels, count = ndi.label(nuclei)
    if count == 0:
        return np.zeros(stained.shape, bool)
    sizes = ndi.sum(nuclei, labels, np.arange(1, count + 1))
    # Nuclei at least 0.3 red-cell diameters across (a platelet is smaller).
    big = np.isin(labels, 1 + np.flatnonzero(sizes >= np.pi * (0.15 * diameter) ** 2))
    blobs, _ = ndi.label(stained)
    around = np.unique(blobs[big])
    white = np.isin(blobs, around[around > 0]) | big
    return white & (ndi.distance_transform_edt(~big) <= 0.7 * diameter)


def _largest_diameter(mask):
    """The equivalent diameter of the largest blob of ``mask``."""
    labels, _ = ndi.label(mask)
    return float(np.sqrt(4 / np.pi * np.bincount(labels.ravel())[1:].max()))


def _in_field(density):
    """Pixels away from a photo's black vignette, whose edge, one huge circle, would outvote
    the cells."""
    black = vignette(density)
    if not black.any():
        return np.ones(black.shape, bool)
    return ndi.distance_transform_edt(~black) > 2 * _VOTE_RADIUS


def _radius_scores(density, voters, radii, tried):
    pyramid = _pyramid(density, voters, radii[-1] / _VOTE_RADIUS)
    done = []

    def score(radius):
        value = _symmetry_score(pyramid, radius)
        done.append(radius)
        tried(len(done))
        return value

    return np.array(in_threads(score, radii))


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
    """How tightly edge votes cast ``radius`` inwards pile up, relative to sideways votes.

    The votes are cast ``_VOTE_RADIUS`` pixels far on a copy shrunk to make the radius that
    long (never enlarged: a smaller radius is voted on the image itself).
    """
    level = int(np.clip(np.floor(np.log2(radius / _VOTE_RADIUS)), 0, len(pyramid) - 1))
    image, mask = pyramid[level]
    zoom = min(1.0, _VOTE_RADIUS * 2**level / radius)
    if zoom < 1 - 1e-3:
        image = ndi.zoom(image, zoom, order=1)
        mask = ndi.zoom(mask.astype(np.uint8), zoom, order=0).astype(bool)
        rows, cols = min(image.shape[0], mask.shape[0]), min(image.shape[1], mask.shape[1])
        image, mask = image[:rows, :cols], mask[:rows, :cols]
    reach = radius * zoom / 2**level
    grad_r, grad_c = ndi.sobel(image, 0), ndi.sobel(image, 1)
    magnitude = np.hypot(grad_r, grad_c)
    strong = np.percentile(magnitude[::3, ::3], 70)  # a sample tells the level
    edges = mask & (magnitude > strong) & (magnitude > 0)
    if edges.sum() < 10:
        return 0.0
    rows, cols = np.nonzero(edges)
    weight = magnitude[edges]
    unit_r, unit_c = grad_r[edges] / weight, grad_c[edges] / weight
    inward = _vote_map(image.shape, rows + reach * unit_r, cols + reach * unit_c, weight)
    sideways = _vote_map(image.shape, rows + reach * unit_c, cols - reach * unit_r, weight)
    return float((inward**2).sum() / max((sideways**2).sum(), 1e-12))


def _vote_map(shape, rows, cols, weight):
    rows, cols = np.rint(rows).astype(int), np.rint(cols).astype(int)
    inside = (rows >= 0) & (rows < shape[0]) & (cols >= 0) & (cols < shape[1])
    votes = np.bincount(
        rows[inside] * shape[1] + cols[inside],
        weights=weight[inside],
        minlength=shape[0] * shape[1],
    )
    return ndi.gaussian_filter(votes.reshape(shape), 1.0, truncate=2.5)
