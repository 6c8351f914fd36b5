"""Finding every cell of a blood smear: white cells, red cells and platelets.

White cells (WBCs, here every nucleated cell) are found from their nuclei, which Romanowsky
stains turn blue to purple: nucleus fragments closer than a fraction of a red cell are one cell
(the lobes of a neutrophil), and each cell grows from its nucleus into the surrounding pixels
whose colour is closer to the smear's own cytoplasm colour than to its red cells or background.
Touching white cells are split between their nuclei. Small nucleus-coloured blobs are
platelets. Everything else that is stained is red cells, split into instances at the narrow
necks between them.

All sizes are fractions of the red-cell diameter, estimated from the image when not given, so
the same settings work at any magnification. Large images are cut into overlapping tiles
(computed in parallel with dask); a cell belongs to the tile that holds its centroid, so each
cell is found exactly once and always whole.
"""

import threading
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from napari_cytodiffusion.core.smear.image import SmearPixels
from napari_cytodiffusion.core.smear.prepare import PreparedSmear, prepare_smear
from napari_cytodiffusion.core.smear.stain import (
    NUCLEUS_SCORE,
    nucleus_score,
    optical_density,
    otsu_threshold,
    total_density,
    vignette,
)

CELL_TYPES = ("wbc", "rbc", "platelet")
FEATURE_COLUMNS = (
    "index",
    "cell_type",
    "area",
    "equivalent_diameter",
    "centroid_row",
    "centroid_col",
    "bbox_min_row",
    "bbox_min_col",
    "bbox_max_row",
    "bbox_max_col",
    "mean_r",
    "mean_g",
    "mean_b",
    "nucleus_fraction",
)

# Sizes in red-cell diameters (D). A white cell is 1.2 to 2.7 D across, its nucleus at least
# about 0.5 D; platelets are 0.25 to 0.45 D.
NUCLEUS_GAP = 0.25  # nucleus fragments closer than this belong to one cell (neutrophil lobes)
MIN_WBC_NUCLEUS = 0.5  # equivalent diameter of the smallest nucleus of a nucleated cell
MIN_PLATELET = 0.12  # smaller nucleus-coloured specks are dust or stain precipitate
MAX_CYTOPLASM = 0.8  # widest cytoplasm rim around a nucleus
MIN_RBC_AREA = 0.2  # red-cell fragments smaller than this fraction of a red cell are dropped
MIN_EDGE_WBC_AREA = 1.0  # visible area, in red-cell areas, of a white cell cut by the image edge
MERGE_SOLIDITY = 0.9  # two halves of one cell make a union at least this convex
MAX_WBC_DIAMETER = 3.2  # largest white cell (a big monocyte), in red-cell diameters
STAR_LIMIT = 1.3  # a white cell's edge is at most this times its median radius from its centre
NUCLEUS_LEVEL = 0.35  # nucleus edge: this far from the cytoplasm to the chromatin stain level
# The chromatin threshold is at least the always-nucleus score; the upper bound keeps the pale
# edges of very dark nuclei (which push Otsu's threshold up) inside.
MAX_NUCLEUS_THRESHOLD = 0.7
# In a crowded field (at least CROWDED_FIELD cells' worth of stain) the stained pixels are
# mostly red cells, and chromatin must score at least RED_CELL_RATIO times their typical
# score: with some stains (Wright, phone photos) the red cells are purple too.
CROWDED_FIELD = 60
RED_CELL_RATIO = 4.0
# Pale parts of a nucleus joined to its darker parts count down to this share of the threshold.
NUCLEUS_HYSTERESIS = 0.8
# Tiles: the halo must hold a whole cell whose centroid is in the tile's core.
HALO_RBC = 2.0
DEFAULT_TILE = 512
# Cells are found at a working resolution where a red cell spans about this many pixels (an
# integer shrinking factor, never enlarging): finer detail only adds noise and time.
WORKING_RBC = 20.0


@dataclass
class SmearSegmentation:
    """Cells found in one smear image.

    Attributes
    ----------
    wbc_labels, rbc_labels, platelet_labels : ndarray of uint32
        Instance labels (0 = none), one array per cell type, each the image's shape.
    nucleus_labels : ndarray of uint32
        The nucleus part of each white cell, with the white cell's label value.
    features : pandas.DataFrame
        One row per cell of every type (see ``FEATURE_COLUMNS``); ``index`` is the cell's
        label value in the labels array of its ``cell_type``.
    smear : PreparedSmear
        The image it was made from, with its scale and background.
    """

    wbc_labels: np.ndarray
    nucleus_labels: np.ndarray
    rbc_labels: np.ndarray
    platelet_labels: np.ndarray
    features: object
    smear: object

    @property
    def rbc_diameter(self):
        """Red-cell diameter in pixels (given or estimated), the scale of every crop."""
        return self.smear.rbc_diameter

    @property
    def background(self):
        """RGB colour of the empty slide, in [0, 1]."""
        return self.smear.background

    def table(self, cell_type):
        """The features of one cell type (``"wbc"``, ``"rbc"`` or ``"platelet"``)."""
        return self.features[self._rows(cell_type)].reset_index(drop=True)

    def count(self, cell_type):
        """The number of cells of one type."""
        return int(self._rows(cell_type).sum())

    def _rows(self, cell_type):
        if cell_type not in CELL_TYPES:
            raise ValueError(f"Unknown cell type {cell_type!r}; use one of {CELL_TYPES}.")
        return self.features["cell_type"] == cell_type

    def boxes(self, cell_type="wbc"):
        """Bounding boxes ``[min_row, min_col, max_row, max_col]`` (end-exclusive) as ints."""
        table = self.table(cell_type)
        columns = ["bbox_min_row", "bbox_min_col", "bbox_max_row", "bbox_max_col"]
        return table[columns].to_numpy(int).tolist()


@dataclass(frozen=True)
class _SmearConstants:
    """What every tile must share so that tiles agree: scale, colours, thresholds."""

    rbc_diameter: float
    background: np.ndarray
    stain_threshold: float
    nucleus_threshold: float


def segment_smear(image, rbc_diameter=None, progress=None, tile_size=DEFAULT_TILE, workers=None):
    """Find the white cells, red cells and platelets of a blood-smear image.

    Parameters
    ----------
    image : array-like or PreparedSmear
        RGB or RGBA image, any size, uint8 / uint16 / float (see ``image.to_rgb_float``), or
        the smear prepared once by :func:`~napari_cytodiffusion.core.smear.prepare.prepare_smear`.
    rbc_diameter : float, optional
        Red-cell diameter in pixels. Estimated from the image when None or 0 (and not
        already known to a prepared smear).
    progress : callable, optional
        Called as ``progress(done, total)`` several times per second of work; raise
        ``progress.Cancelled`` from it to stop.
    tile_size : int
        Side of the square tiles that large images are cut into, each with an overlap of two
        red-cell diameters (tiles are made at least three overlaps wide).
    workers : int, optional
        Tiles processed at once (threads); default: the CPU count, at most 4.

    Returns
    -------
    SmearSegmentation

    Raises
    ------
    ImageError
        If the image is not a usable RGB(A) image.
    ValueError
        If ``rbc_diameter`` or ``tile_size`` is not a sensible positive number.
    """
    if tile_size < 256:
        raise ValueError(f"tile_size must be at least 256 pixels, got {tile_size}.")
    tracker = _ProgressTracker(progress)
    tracker.check()
    smear = prepare_smear(image, rbc_diameter, progress=lambda *_: tracker.check())
    factor = working_factor(smear.rbc_diameter)
    work = _working_smear(smear, factor)
    constants = _smear_constants(work)
    halo = int(np.ceil(HALO_RBC * constants.rbc_diameter))
    # Tiles larger than their halo, so that not too much work is done twice.
    tiles = _tiles(work.shape, max(tile_size, 3 * halo), halo)
    tracker.total = len(tiles) * _TileWork.STEPS + 2
    results = _run_tiles(work.rgb, tiles, constants, tracker, workers)
    arrays = _paste_tiles(work.shape, results)
    if factor > 1:
        arrays = _full_resolution(arrays, smear, factor, constants)
    tracker.step()
    segmentation = _assemble(smear, arrays, tracker)
    tracker.step()
    return segmentation


def working_factor(rbc_diameter):
    """The integer factor a smear is shrunk by to find its cells (see ``WORKING_RBC``)."""
    return max(1, int(rbc_diameter // WORKING_RBC))


def _working_smear(smear, factor):
    """The smear at the working resolution (the smear itself when ``factor`` is 1)."""
    if factor == 1:
        return smear
    pixels = smear.rgb if isinstance(smear.rgb, SmearPixels) else SmearPixels(smear.rgb)
    return PreparedSmear(pixels.block_means(factor), smear.background, smear.rbc_diameter / factor)


class _ProgressTracker:
    """Thread-safe step counter in front of the user's progress callback."""

    def __init__(self, progress):
        self._progress = progress
        self._lock = threading.Lock()
        self.done = 0
        self.total = 1

    def check(self):
        """Report without advancing: lets a cancel through between steps."""
        if self._progress is not None:
            with self._lock:
                self._progress(self.done, self.total)

    def step(self):
        with self._lock:
            self.done += 1
            if self._progress is not None:
                self._progress(min(self.done, self.total), self.total)


def _smear_constants(smear):
    density = optical_density(_sample(smear.rgb), smear.background)
    density = density[~vignette(density)]  # the field of view only
    score = nucleus_score(density)
    total = total_density(density)
    nuclei = score > NUCLEUS_SCORE
    stain = otsu_threshold(total[~nuclei], default=0.1)
    stain = float(np.clip(stain, 0.08, 0.6))
    # Chromatin against everything else stained; never below the always-nucleus level.
    stained = score[total > stain]
    chromatin = otsu_threshold(stained, default=NUCLEUS_SCORE)
    chromatin = float(np.clip(chromatin, NUCLEUS_SCORE, MAX_NUCLEUS_THRESHOLD))
    cell_area = np.pi / 4 * (smear.rbc_diameter / _sample_step(smear.shape)) ** 2
    if stained.size >= CROWDED_FIELD * cell_area:
        chromatin = max(chromatin, RED_CELL_RATIO * float(np.median(stained)))
    return _SmearConstants(
        rbc_diameter=smear.rbc_diameter,
        background=smear.background,
        stain_threshold=stain,
        nucleus_threshold=chromatin,
    )


def _sample(rgb):
    """A strided view of the image, for image-wide statistics."""
    step = _sample_step(rgb.shape)
    return rgb[::step, ::step]


def _sample_step(shape, pixels=4_000_000):
    """The stride of :func:`_sample`: at most ``pixels`` pixels are sampled."""
    return max(1, int(np.ceil(np.sqrt(shape[0] * shape[1] / pixels))))


# ----------------------------------------------------------------------------- tiles


def _tiles(shape, tile_size, halo):
    """Cut ``shape`` into cores of about ``tile_size``; each tile is (core, window) slices."""
    tiles = []
    row_edges = _edges(shape[0], tile_size)
    col_edges = _edges(shape[1], tile_size)
    for r0, r1 in zip(row_edges[:-1], row_edges[1:], strict=True):
        for c0, c1 in zip(col_edges[:-1], col_edges[1:], strict=True):
            core = (slice(r0, r1), slice(c0, c1))
            window = (
                slice(max(0, r0 - halo), min(shape[0], r1 + halo)),
                slice(max(0, c0 - halo), min(shape[1], c1 + halo)),
            )
            tiles.append((core, window))
    return tiles


def _edges(length, tile_size):
    count = max(1, int(round(length / tile_size)))
    return np.linspace(0, length, count + 1).round().astype(int)


def _run_tiles(rgb, tiles, constants, tracker, workers):
    import os

    import dask

    if len(tiles) == 1:
        return [_TileWork(rgb, tiles[0], constants, tracker).run()]
    workers = workers or min(4, os.cpu_count() or 1)
    tasks = [dask.delayed(_TileWork(rgb, tile, constants, tracker).run)() for tile in tiles]
    return list(dask.compute(*tasks, scheduler="threads", num_workers=workers))


class _TileWork:
    """Segment one tile window and keep the cells whose centroid lies in its core."""

    STEPS = 4

    def __init__(self, rgb, tile, constants, tracker):
        self.core, self.window = tile
        self.image_shape = rgb.shape[:2]
        self.image = rgb
        self.constants = constants
        self.tracker = tracker

    def run(self):
        constants = self.constants
        diameter = constants.rbc_diameter
        self.tracker.check()
        rgb = np.asarray(self.image[self.window])  # read (and converted) only now
        density = optical_density(_smooth(rgb, diameter / 50), constants.background)
        outside = _outside_field(density, diameter)
        wbc, nuclei, platelets = _white_cells(density, outside, constants, self.tracker)
        self.tracker.step()
        rbc = _red_cells(density, wbc, platelets, outside, constants, self.tracker)
        self.tracker.step()
        wbc = self._without_edge_slivers(wbc)
        origin = (self.window[0].start, self.window[1].start)
        wbc, renumber = _relabel(self._owned(wbc), with_map=True)
        nuclei = renumber[np.where(wbc > 0, nuclei, 0)]
        self.tracker.step()
        platelets, rbc = _relabel(self._owned(platelets)), _relabel(self._owned(rbc))
        self.tracker.step()
        return origin, wbc, nuclei, rbc, platelets

    def _without_edge_slivers(self, wbc):
        """Drop white cells cut by the image edge with less than ``MIN_EDGE_WBC_AREA`` visible.

        Too little of such a cell is seen to measure or classify it.
        """
        edge = np.zeros(wbc.shape, bool)
        if self.window[0].start == 0:
            edge[0] = True
        if self.window[1].start == 0:
            edge[:, 0] = True
        if self.window[0].stop == self.image_shape[0]:
            edge[-1] = True
        if self.window[1].stop == self.image_shape[1]:
            edge[:, -1] = True
        cut = np.unique(wbc[edge & (wbc > 0)])
        if cut.size == 0:
            return wbc
        areas = ndi.sum(wbc > 0, wbc, cut)
        rbc_area = np.pi * self.constants.rbc_diameter**2 / 4
        slivers = cut[areas < MIN_EDGE_WBC_AREA * rbc_area]
        return np.where(np.isin(wbc, slivers), 0, wbc)

    def _owned(self, labels):
        """Keep only the labels whose centroid falls inside this tile's core."""
        index = np.unique(labels[labels > 0])
        if index.size == 0:
            return labels
        centroids = np.array(ndi.center_of_mass(labels > 0, labels, index)).reshape(-1, 2)
        rows = centroids[:, 0] + self.window[0].start
        cols = centroids[:, 1] + self.window[1].start
        inside = (
            (rows >= self.core[0].start)
            & (rows < self.core[0].stop)
            & (cols >= self.core[1].start)
            & (cols < self.core[1].stop)
        )
        keep = np.zeros(int(index[-1]) + 1, bool)
        keep[index] = inside
        return np.where(keep[labels], labels, 0)


def _smooth(rgb, sigma):
    if sigma < 0.5:
        return rgb
    return ndi.gaussian_filter(rgb, sigma=(sigma, sigma, 0))


# ----------------------------------------------------------------------------- white cells


def _outside_field(density, diameter):
    """The black vignette of a photo through the eyepiece, and a red cell around it.

    No cell is looked for there: its dark edge would pass for stained cells.
    """
    black = vignette(density)
    if not black.any():
        return black
    return ndi.distance_transform_edt(~black) <= diameter


def _white_cells(density, outside, constants, tracker):
    """Return (wbc labels, nucleus labels, platelet labels) of one tile."""
    diameter = constants.rbc_diameter
    score = nucleus_score(density)
    nuclei = _nuclei(score, constants) & ~outside
    groups = _group_fragments(nuclei, diameter)
    tracker.check()
    sizes = np.sqrt(4 / np.pi * ndi.sum(nuclei, groups, np.arange(1, groups.max() + 1)))
    is_wbc = np.concatenate([[False], sizes >= MIN_WBC_NUCLEUS * diameter])
    is_platelet = np.concatenate(
        [[False], (sizes >= MIN_PLATELET * diameter) & (sizes < MIN_WBC_NUCLEUS * diameter)]
    )
    markers = _relabel(np.where(is_wbc[groups] & nuclei, groups, 0))
    cytoplasm = _cytoplasm_like(density, nuclei, markers, constants)
    tracker.check()
    wbc = _grow_cells(markers, cytoplasm, diameter)
    # Platelet-sized nucleus fragments inside or against a white cell are part of it.
    platelet_groups = np.where(is_platelet[groups] & nuclei, groups, 0)
    touching = np.unique(platelet_groups[ndi.binary_dilation(wbc > 0)])
    platelet_groups[np.isin(platelet_groups, touching)] = 0
    platelets = _relabel(platelet_groups)
    nucleus = _cell_nuclei(score, wbc, constants)
    return wbc, nucleus, platelets


def _nuclei(score, constants):
    """Nucleus and platelet pixels, without specks smaller than a platelet."""
    from skimage.filters import apply_hysteresis_threshold
    from skimage.morphology import remove_small_objects

    diameter = constants.rbc_diameter
    threshold = constants.nucleus_threshold
    mask = apply_hysteresis_threshold(score, NUCLEUS_HYSTERESIS * threshold, threshold)
    mask = ndi.binary_opening(mask, iterations=max(1, int(diameter / 40)))
    return remove_small_objects(mask, max_size=int((MIN_PLATELET * diameter) ** 2 * np.pi / 4))


def _cell_nuclei(score, wbc, constants):
    """The nucleus of each white cell: its pixels closer to the cell's chromatin level."""
    nuclei = np.zeros_like(wbc)
    for index, box in enumerate(ndi.find_objects(wbc), 1):
        if box is None:
            continue
        cell = wbc[box] == index
        values = score[box][cell]
        dark = values > constants.nucleus_threshold
        if dark.all() or not dark.any():
            nuclei[box][cell & (score[box] > constants.nucleus_threshold)] = index
            continue
        level = NUCLEUS_LEVEL * np.median(values[dark]) + (1 - NUCLEUS_LEVEL) * np.median(
            values[~dark]
        )
        level = min(level, constants.nucleus_threshold)
        inside = ndi.binary_fill_holes(cell & (score[box] > level))
        nuclei[box][inside & cell] = index
    return nuclei


def _group_fragments(nuclei, diameter):
    """Label nucleus fragments, giving fragments closer than ``NUCLEUS_GAP`` one label."""
    reach = ndi.distance_transform_edt(~nuclei) <= NUCLEUS_GAP * diameter / 2
    groups, _ = ndi.label(reach)
    return np.where(nuclei, groups, 0)


def _relabel(labels, with_map=False):
    """Renumber labels 1..n; ``with_map`` also returns the old-to-new lookup array."""
    from skimage.segmentation import relabel_sequential

    relabelled, forward, _ = relabel_sequential(labels)
    if not with_map:
        return relabelled
    lookup = np.zeros(int(labels.max()) + 1, relabelled.dtype)
    lookup[forward.in_values] = forward.out_values
    return relabelled, lookup


def _cytoplasm_like(density, nuclei, markers, constants):
    """Pixels coloured more like white-cell cytoplasm than like red cells or background.

    The colours are read off this smear: cytoplasm from a thin rim around the white-cell
    nuclei, red cells from stained pixels far from any nucleus, background is zero density.
    """
    diameter = constants.rbc_diameter
    total = total_density(density)
    stained = total > constants.stain_threshold
    if markers.max() == 0:
        return np.zeros_like(stained)
    distance = ndi.distance_transform_edt(markers == 0)
    rim = (distance > 0.04 * diameter) & (distance < 0.2 * diameter) & ~nuclei
    rim &= total > 0.5 * constants.stain_threshold
    far = stained & ~nuclei & (distance > 1.5 * diameter)
    if far.sum() < 50:
        far = stained & ~nuclei & (distance > MAX_CYTOPLASM * diameter)
    if rim.sum() < 20:
        return stained
    means = [np.zeros(3), np.median(density[rim], axis=0)]
    if far.sum() >= 50:
        means.append(np.median(density[far], axis=0))
    distances = [((density - m) ** 2).sum(axis=-1) for m in means]
    return np.argmin(distances, axis=0) == 1


def _grow_cells(markers, cytoplasm, diameter):
    """Grow each white-cell nucleus into the cytoplasm-like pixels around it.

    Touching cells are split between their nuclei.
    """
    from skimage.segmentation import watershed

    if markers.max() == 0:
        return markers
    near = ndi.distance_transform_edt(markers == 0) <= MAX_CYTOPLASM * diameter
    body = (cytoplasm & near) | (markers > 0)
    body = ndi.binary_opening(body, iterations=max(1, int(diameter / 20)))
    body |= markers > 0
    cells = watershed(ndi.distance_transform_edt(markers == 0), markers, mask=body)
    cells, markers = _merge_split_cells(cells, markers, diameter)
    rounded = np.zeros_like(cells)
    for index, box in enumerate(ndi.find_objects(cells), 1):
        if box is None:
            continue
        own = ndi.binary_fill_holes(cells[box] == index) & np.isin(cells[box], (0, index))
        centre = ndi.center_of_mass(markers[box] == index)
        rounded[box][_star_shape(own, centre)] = index
    return rounded


def _merge_split_cells(cells, markers, diameter):
    """Join neighbours that are two halves of one round cell (far-apart nucleus lobes).

    Two touching white cells meet along a short contact and their union has a waist; the two
    halves of one neutrophil share a long border and together make a round, convex cell.
    """
    from skimage.measure import regionprops

    pairs = _shared_borders(cells)
    if not pairs:
        return cells, markers
    parent = np.arange(cells.max() + 1)
    boxes = ndi.find_objects(cells)
    for (a, b), length in sorted(pairs.items(), key=lambda item: -item[1]):
        box = tuple(
            slice(min(p.start, q.start), max(p.stop, q.stop))
            for p, q in zip(boxes[a - 1], boxes[b - 1], strict=True)
        )
        union = np.isin(cells[box], (a, b))
        props = regionprops(union.astype(np.uint8))[0]
        smaller = np.sqrt(4 / np.pi * min(np.sum(cells[box] == a), np.sum(cells[box] == b)))
        if (
            length >= 0.6 * smaller
            and props.solidity >= MERGE_SOLIDITY
            and props.equivalent_diameter_area <= MAX_WBC_DIAMETER * diameter
        ):
            parent[_root(parent, b)] = _root(parent, a)
    roots = np.array([_root(parent, i) for i in range(len(parent))])
    return _relabel(roots[cells]), _relabel(roots[markers])


def _root(parent, i):
    while parent[i] != i:
        i = parent[i]
    return i


def _shared_borders(labels):
    """{(a, b): number of 4-neighbour pixel pairs where label a meets label b}."""
    pairs = {}
    for first, second in (
        (labels[:, :-1], labels[:, 1:]),
        (labels[:-1, :], labels[1:, :]),
    ):
        touching = (first != second) & (first > 0) & (second > 0)
        a = np.minimum(first[touching], second[touching])
        b = np.maximum(first[touching], second[touching])
        keys, counts = np.unique(np.stack([a, b], axis=1), axis=0, return_counts=True)
        for (x, y), count in zip(keys, counts, strict=True):
            pairs[(int(x), int(y))] = pairs.get((int(x), int(y)), 0) + int(count)
    return pairs


def _star_shape(mask, centre, rays=72):
    """``mask`` cut to a rounded star shape around ``centre``.

    A white cell is nearly round. Where its cytoplasm colour continues into a pale red cell or
    the background halo, the cell's edge along those rays sticks out: edges farther than
    ``STAR_LIMIT`` times the median edge distance are pulled in, and single rays are smoothed
    with their neighbours.
    """
    from skimage.draw import polygon

    angles = np.linspace(0, 2 * np.pi, rays, endpoint=False)
    steps = np.arange(0, np.hypot(*mask.shape), 0.5)
    rows = np.rint(centre[0] + np.outer(np.sin(angles), steps)).astype(int)
    cols = np.rint(centre[1] + np.outer(np.cos(angles), steps)).astype(int)
    inside = (rows >= 0) & (rows < mask.shape[0]) & (cols >= 0) & (cols < mask.shape[1])
    hit = np.zeros(rows.shape, bool)
    hit[inside] = mask[rows[inside], cols[inside]]
    # Distance to the last cell pixel before the first gap of the ray.
    first_gap = np.argmin(np.concatenate([hit, np.zeros((rays, 1), bool)], axis=1), axis=1)
    radius = steps[np.maximum(first_gap - 1, 0)] + 0.5
    radius = ndi.median_filter(radius, size=5, mode="wrap")
    radius = np.minimum(radius, STAR_LIMIT * np.median(radius))
    shape = np.zeros_like(mask)
    rr, cc = polygon(
        centre[0] + radius * np.sin(angles), centre[1] + radius * np.cos(angles), mask.shape
    )
    shape[rr, cc] = True
    return shape & mask


# ----------------------------------------------------------------------------- red cells


def _red_cells(density, wbc, platelets, outside, constants, tracker):
    """Split the stained pixels that are neither white cells nor platelets (nor outside the
    field of view) into red cells."""
    from skimage.feature import peak_local_max
    from skimage.morphology import remove_small_holes, remove_small_objects
    from skimage.segmentation import watershed

    diameter = constants.rbc_diameter
    rbc_area = np.pi * diameter**2 / 4
    mask = total_density(density) > constants.stain_threshold
    mask &= ~ndi.binary_dilation((wbc > 0) | (platelets > 0), iterations=2) & ~outside
    mask = remove_small_holes(mask, max_size=int(0.4 * rbc_area))
    mask = ndi.binary_opening(mask, iterations=max(1, int(diameter / 25)))
    mask = remove_small_objects(mask, max_size=int(MIN_RBC_AREA * rbc_area))
    tracker.check()
    distance = ndi.distance_transform_edt(mask)
    smoothed = ndi.gaussian_filter(distance, diameter / 20)
    peaks = peak_local_max(
        smoothed,
        min_distance=max(2, int(0.3 * diameter)),
        threshold_abs=0.15 * diameter,
        labels=ndi.label(mask)[0],
        exclude_border=False,
    )
    markers = np.zeros(mask.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    tracker.check()
    cells = watershed(-smoothed, markers, mask=mask)
    sizes = np.bincount(cells.ravel())
    small = sizes < MIN_RBC_AREA * rbc_area
    small[0] = False
    cells[small[cells]] = 0
    return _relabel(cells)


# ----------------------------------------------------------------------------- assembly


def _paste_tiles(shape, results):
    """Every tile's own cells pasted into whole-image label arrays, numbered 1..n per type."""
    arrays = {name: np.zeros(shape, np.uint32) for name in ("wbc", "nucleus", "rbc", "platelet")}
    offsets = {"wbc": 0, "rbc": 0, "platelet": 0}
    for origin, wbc, nuclei, rbc, platelets in results:
        window = tuple(slice(o, o + n) for o, n in zip(origin, wbc.shape, strict=True))
        start = offsets["wbc"]
        offsets["wbc"] = _paste(arrays["wbc"][window], wbc, start)
        _paste(arrays["nucleus"][window], nuclei, start)
        offsets["rbc"] = _paste(arrays["rbc"][window], rbc, offsets["rbc"])
        offsets["platelet"] = _paste(arrays["platelet"][window], platelets, offsets["platelet"])
    return arrays


def _full_resolution(arrays, smear, factor, constants):
    """Working-resolution labels at the image's resolution.

    Red cells and platelets are enlarged pixel for pixel. Each white cell's outline is
    smoothed at full resolution, and its nucleus is found again there, from the chromatin
    score of its own pixels, so that the nucleus keeps its shape.
    """
    shape = smear.shape
    full = {name: _enlarge(arrays[name], factor, shape) for name in ("rbc", "platelet")}
    wbc, nuclei = np.zeros(shape, np.uint32), np.zeros(shape, np.uint32)
    for index, box in enumerate(ndi.find_objects(arrays["wbc"]), 1):
        if box is None:
            continue
        work = tuple(slice(max(0, b.start - 1), b.stop + 1) for b in box)
        window = tuple(
            slice(w.start * factor, min(n, w.stop * factor))
            for w, n in zip(work, shape, strict=True)
        )
        own = _enlarge(arrays["wbc"][work] == index, factor, wbc[window].shape)
        cell = ndi.gaussian_filter(own.astype(np.float32), factor / 2) > 0.5
        cell &= wbc[window] == 0
        wbc[window][cell] = index
        rgb = np.asarray(smear.rgb[window])
        density = optical_density(_smooth(rgb, smear.rbc_diameter / 50), smear.background)
        score = nucleus_score(density)
        own_nucleus = _cell_nuclei(score, np.where(cell, index, 0).astype(np.uint32), constants)
        nuclei[window][own_nucleus == index] = index
    return {**full, "wbc": wbc, "nucleus": nuclei}


def _enlarge(labels, factor, shape):
    """``labels`` enlarged ``factor`` times pixel for pixel, cut to ``shape``."""
    return labels.repeat(factor, axis=0).repeat(factor, axis=1)[: shape[0], : shape[1]]


def _assemble(smear, arrays, tracker):
    """Measure the cells of the whole-image label arrays."""
    import pandas as pd

    tables = [
        _measure(arrays["wbc"], smear.rgb, "wbc", tracker, arrays["nucleus"]),
        _measure(arrays["rbc"], smear.rgb, "rbc", tracker),
        _measure(arrays["platelet"], smear.rgb, "platelet", tracker),
    ]
    features = pd.concat(tables, ignore_index=True)
    return SmearSegmentation(
        wbc_labels=arrays["wbc"],
        nucleus_labels=arrays["nucleus"],
        rbc_labels=arrays["rbc"],
        platelet_labels=arrays["platelet"],
        features=features,
        smear=smear,
    )


def _paste(target, labels, start):
    """Write ``labels`` (numbered 1..n) as ``start + 1..n`` where ``target`` is still empty."""
    count = int(labels.max())
    if count:
        where = (labels > 0) & (target == 0)
        target[where] = labels[where] + start
    return start + count


def _measure(labels, rgb, cell_type, tracker, nuclei=None):
    """Per-cell features of one labels array, ``index`` being the label value."""
    import pandas as pd

    rows = []
    for index, box in enumerate(ndi.find_objects(labels), 1):
        if index % 500 == 0:
            tracker.check()
        if box is None:
            continue
        mask = labels[box] == index
        area = int(mask.sum())
        if area == 0:
            continue
        rr, cc = np.nonzero(mask)
        colour = rgb[box][mask].mean(axis=0)
        nucleus = 0.0 if nuclei is None else float((nuclei[box][mask] == index).mean())
        rows.append(
            (
                index,
                cell_type,
                area,
                float(np.sqrt(4 * area / np.pi)),
                float(rr.mean() + box[0].start),
                float(cc.mean() + box[1].start),
                box[0].start + int(rr.min()),
                box[1].start + int(cc.min()),
                box[0].start + int(rr.max()) + 1,
                box[1].start + int(cc.max()) + 1,
                float(colour[0]),
                float(colour[1]),
                float(colour[2]),
                nucleus if cell_type == "wbc" else (1.0 if cell_type == "platelet" else 0.0),
            )
        )
    table = pd.DataFrame(rows, columns=list(FEATURE_COLUMNS))
    return table.astype({"index": "int64", "area": "int64"})
