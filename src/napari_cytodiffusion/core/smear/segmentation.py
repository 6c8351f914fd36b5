"""Finding every cell of a blood smear: white cells, red cells and platelets.

White cells (WBCs, here every nucleated cell) are found by a small convolutional network
(:mod:`~napari_cytodiffusion.core.smear.detector`) that sees the smear at one scale: each
pixel's probability of lying in a white cell (its *body*: nucleus and cytoplasm, however pale
or granular) and of lying near a cell's centre (its *core*). Each core is one cell; the cells
grow from their cores over their bodies, so touching cells are split between their centres.
The nucleus of each cell is its chromatin (green-minus-blue optical density), measured on the
cell's own full-resolution pixels. In an image where the detector finds no white cell (a
tight single-cell crop gives it too little smear to judge by), nucleus-sized chromatin blobs
are the cells. Small chromatin blobs outside white cells are platelets.
Everything else that is stained is red cells, split into instances at the narrow necks
between them.

All sizes are fractions of the red-cell diameter, estimated from the image when not given, so
the same settings work at any magnification. Cells are found at a working resolution (a red
cell 16 to 32 pixels across, an integer shrinking factor) and their outlines brought back to
the image's own resolution. Large images are cut into overlapping tiles (computed in parallel
in threads); a cell belongs to the tile that holds its centroid, so each cell is found exactly
once and always whole.
"""

import threading
from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage as ndi

from napari_cytodiffusion.core.checks import is_whole_number
from napari_cytodiffusion.core.smear.detector import DETECTOR_RBC, load_detector
from napari_cytodiffusion.core.smear.image import SmearPixels
from napari_cytodiffusion.core.smear.prepare import PreparedSmear, prepare_smear
from napari_cytodiffusion.core.smear.resample import block_mean, rescale, resize
from napari_cytodiffusion.core.smear.scale import (
    overview,
    overview_factor,
)
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
from napari_cytodiffusion.core.smear.threads import in_threads, thread_count

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

# Sizes in red-cell diameters (D); areas in red-cell areas.
MIN_PLATELET = 0.12  # smaller chromatin specks are dust or stain precipitate
MAX_PLATELET = 0.6  # larger chromatin blobs outside white cells are clumps, not counted
MIN_RBC_AREA = 0.2  # red-cell fragments smaller than this fraction of a red cell are dropped
MIN_WBC_AREA = 0.5  # the smallest white cell (a small lymphocyte is about 1.2)
MIN_EDGE_WBC_AREA = 1.0  # visible area of a white cell cut by the image edge
MAX_CYTOPLASM = 0.8  # widest cytoplasm rim around a nucleus
MIN_FALLBACK_NUCLEUS = 0.4  # smallest nucleus of a cell found from chromatin alone
# Smallest cell found from chromatin alone, cytoplasm included: a platelet clump has no
# cytoplasm to grow (PBC val: 90 % of the clumps of its platelet images fall below, no
# nucleated cell does, the smallest an erythroblast at 0.98).
MIN_FALLBACK_CELL = 0.8
STAR_LIMIT = 1.3  # a white cell's edge is at most this times its median radius from its centre
# Detector probabilities: a body pixel, a core pixel, and the core's peak that makes a cell.
BODY_LEVEL = 0.5
CORE_LEVEL = 0.5
CELL_CONFIDENCE = 0.95
# A cell grows over its cytoplasm colour only where the body map reaches this level: pale
# cytoplasm the map leaves out scores above it, the red cells around a cell near zero.
GROWTH_BODY_LEVEL = 0.01
NUCLEUS_LEVEL = 0.35  # nucleus edge: this far from the cytoplasm to the chromatin stain level
# A white cell with no pixel at the smear's chromatin threshold has its nucleus looked for again
# at this share of it (phone photos of a pale Wright stain: nuclei 2-3 times the red cells'
# chromatin score, the threshold 4 times).
PALE_NUCLEUS_SHARE = 0.5
# Pale parts of a nucleus joined to its darker parts count down to this share of the threshold.
NUCLEUS_HYSTERESIS = 0.8
# Tiles: the halo must hold a whole cell whose centroid is in the tile's core, and what the
# detector looks at around it.
HALO_RBC = 3.0
DEFAULT_TILE = 512
# Cells are found at a working resolution where a red cell spans WORKING_RBC to twice that
# many pixels (an integer shrinking factor, never enlarging): finer detail only adds noise
# and time.
WORKING_RBC = 16.0


@dataclass
class SmearSegmentation:
    """Cells found in one smear image.

    Only the white cells are kept at the image's resolution. Red cells and platelets are
    found at the working resolution and kept there (on a 12,000 x 12,000 image each full
    label array would hold 288 MB); ``rbc_labels`` and ``platelet_labels`` enlarge them on
    each access, so keep the array you get rather than reading the attribute in a loop.

    Attributes
    ----------
    wbc_labels, rbc_labels, platelet_labels : ndarray of uint16 or uint32
        Instance labels (0 = none), one array per cell type, each the image's shape; uint32
        only for a type with more than 65,535 cells (see :func:`label_dtype`).
    nucleus_labels : ndarray
        The nucleus part of each white cell, with the white cell's label value.
    features : pandas.DataFrame
        One row per cell of every type (see ``FEATURE_COLUMNS``); ``index`` is the cell's
        label value in the labels array of its ``cell_type``.
    smear : PreparedSmear
        The image it was made from, with its scale and background.
    scale_source : str
        Where the red-cell diameter came from (``PreparedSmear.scale_source``).
    """

    wbc_labels: np.ndarray
    nucleus_bits: np.ndarray  # the nucleus mask, np.packbits of the image-shaped array
    working_labels: dict  # {"rbc": ..., "platelet": ...} at the working resolution
    factor: int  # image pixels per working pixel
    features: object
    smear: object

    @property
    def scale_source(self):
        return self.smear.scale_source

    @property
    def rbc_labels(self):
        return _enlarge(self.working_labels["rbc"], self.factor, self.smear.shape)

    @property
    def platelet_labels(self):
        return _enlarge(self.working_labels["platelet"], self.factor, self.smear.shape)

    @property
    def nucleus_labels(self):
        wbc = self.wbc_labels
        rows, cols = wbc.shape
        out = np.zeros_like(wbc)
        step = 8 * max(1, 2**20 // max(cols, 1))  # rows a strip: whole bytes of bits
        for top in range(0, rows, step):
            bottom = min(rows, top + step)
            bits = self.nucleus_bits[top * cols // 8 :]
            mask = np.unpackbits(bits, count=(bottom - top) * cols).view(bool)
            np.copyto(out[top:bottom], wbc[top:bottom], where=mask.reshape(-1, cols))
        return out

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


@dataclass(frozen=True)
class SharedSettings:
    """What the pieces of one smear share when each is segmented on its own (the tiles of
    :func:`~napari_cytodiffusion.core.tasks.analyze.analyze_smear`), so that a cell is found
    the same way whichever piece holds it: the working resolution and the stain thresholds."""

    factor: int
    constants: _SmearConstants


def shared_settings(smear):
    """The :class:`SharedSettings` of a prepared smear, measured on its overview (so any size
    of image costs the same)."""
    small, small_factor = overview(smear.rgb)
    factor = working_factor(smear.rbc_diameter, small_factor)
    measured = _smear_constants(
        PreparedSmear(small, smear.background, smear.rbc_diameter / small_factor)
    )
    return SharedSettings(factor, replace(measured, rbc_diameter=smear.rbc_diameter / factor))


def check_tile_size(tile_size):
    """Refuse a tile side that is not a whole number of at least 256 pixels."""
    if not is_whole_number(tile_size):
        raise ValueError(f"tile_size must be a whole number of pixels, got {tile_size!r}.")
    if tile_size < 256:
        raise ValueError(f"tile_size must be at least 256 pixels, got {tile_size}.")


def segment_smear(
    image,
    rbc_diameter=None,
    progress=None,
    tile_size=DEFAULT_TILE,
    workers=None,
    shared=None,
):
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
        Side of the square tiles, in working pixels, that large images are cut into, each
        with an overlap of three red-cell diameters (tiles are made at least three overlaps
        wide).
    workers : int, optional
        Tiles processed at once (threads); default: the CPU count, at most 4.
    shared : SharedSettings, optional
        The working resolution and stain thresholds of the larger smear this image is a
        piece of (see :func:`shared_settings`); measured on this image when not given.

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
    check_tile_size(tile_size)
    tracker = _ProgressTracker(progress)
    tracker.check()
    smear = prepare_smear(image, rbc_diameter, lambda *_: tracker.check())
    if shared is None:
        factor = working_factor(smear.rbc_diameter, overview_factor(smear.shape))
        work = _working_smear(smear, factor)
        constants = _smear_constants(work)
    else:
        factor, constants = shared.factor, shared.constants
        work = _working_smear(smear, factor)
    halo = int(np.ceil(HALO_RBC * constants.rbc_diameter))
    # Tiles larger than their halo, so that not too much work is done twice.
    tiles = _tiles(work.shape, max(tile_size, 3 * halo), halo)
    tracker.total = len(tiles) * _TileWork.STEPS + 2
    arrays = _paste_tiles(work.shape, _run_tiles(work.rgb, tiles, constants, tracker, workers))
    tracker.step()
    segmentation = _assemble(smear, work, arrays, factor, constants, tracker, workers)
    tracker.step()
    return segmentation


def working_factor(rbc_diameter, overview_factor=1):
    """The integer factor a smear is shrunk by to find its cells (see ``WORKING_RBC``).

    A multiple of ``overview_factor`` where that is fine enough, so that the working image
    is made from the overview the scale was measured on, without reading the image again.
    """
    factor = max(1, int(rbc_diameter // WORKING_RBC))
    if factor >= overview_factor > 1:
        return factor // overview_factor * overview_factor
    return factor


def _working_smear(smear, factor):
    """The smear at the working resolution (the smear itself when ``factor`` is 1)."""
    if factor == 1:
        return smear
    small, overview_factor = overview(smear.rgb)
    if factor % overview_factor == 0:
        rgb = _weighted_block_mean(small, factor // overview_factor, smear.shape, overview_factor)
    else:
        pixels = smear.rgb if isinstance(smear.rgb, SmearPixels) else SmearPixels(smear.rgb)
        rgb = pixels.block_means(factor)
    return PreparedSmear(rgb, smear.background, smear.rbc_diameter / factor)


def _weighted_block_mean(means, factor, shape, size):
    """Block means of block means, weighted by the pixels each holds (edge blocks are partial)."""
    if factor == 1:
        return means
    counts = _block_counts(shape, size).astype(np.float32)
    sums = block_mean(means * counts[..., None], factor)
    return sums / block_mean(counts, factor)[..., None]


def _block_counts(shape, factor):
    """Pixels of the image of ``shape`` in each factor x factor block."""
    rows = np.minimum(factor, shape[0] - np.arange(0, shape[0], factor))
    cols = np.minimum(factor, shape[1] - np.arange(0, shape[1], factor))
    return np.outer(rows, cols)


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
    cell_area = np.pi / 4 * (smear.rbc_diameter / _sample_step(smear.shape)) ** 2
    return _SmearConstants(
        rbc_diameter=smear.rbc_diameter,
        background=smear.background,
        stain_threshold=stain,
        nucleus_threshold=chromatin_threshold(score, total, stain, cell_area),
    )


def _sample(rgb):
    """A strided view of the image, for image-wide statistics."""
    step = _sample_step(rgb.shape)
    return rgb[::step, ::step]


def _sample_step(shape, pixels=250_000):
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
    detector = load_detector()
    return in_threads(
        lambda tile: _TileWork(rgb, tile, constants, tracker, detector).run(), tiles, workers
    )


@dataclass
class _TileResult:
    """One tile's own cells, at the working resolution."""

    origin: tuple
    wbc: np.ndarray
    nuclei: np.ndarray
    rbc: np.ndarray
    platelets: np.ndarray
    body: np.ndarray  # the detector's body probability over the tile window


class _TileWork:
    """Segment one tile window and keep the cells whose centroid lies in its core."""

    STEPS = 4

    def __init__(self, rgb, tile, constants, tracker, detector):
        self.core, self.window = tile
        self.image_shape = rgb.shape[:2]
        self.image = rgb
        self.constants = constants
        self.tracker = tracker
        self.detector = detector

    def run(self):
        constants = self.constants
        self.tracker.check()
        rgb = np.asarray(self.image[self.window])  # read (and converted) only now
        density = optical_density(rgb, constants.background)
        outside = _outside_field(density, constants.rbc_diameter)
        body, core = _detector_maps(self.detector, density, constants.rbc_diameter)
        self.tracker.step()
        score = nucleus_score(density)
        nuclei = _nuclei(score, constants) & ~outside
        cells = _white_cells(body, core, constants)
        fallback = cells.max() == 0 and self.window == _whole(self.image_shape)
        if fallback:
            cells = _chromatin_cells(nuclei, constants)
        wbc = _with_cytoplasm(cells, density, nuclei, constants, None if fallback else body)
        if fallback:
            wbc = _without_small(wbc, MIN_FALLBACK_CELL, constants.rbc_diameter)
        platelets = _platelets(nuclei, wbc, constants.rbc_diameter)
        self.tracker.step()
        rbc = _red_cells(density, wbc, nuclei, outside, constants, self.tracker)
        self.tracker.step()
        wbc = self._without_edge_slivers(wbc)
        wbc = _relabel(self._owned(wbc))
        nucleus = _cell_nuclei(score, wbc, constants)
        platelets, rbc = _relabel(self._owned(platelets)), _relabel(self._owned(rbc))
        self.tracker.step()
        origin = (self.window[0].start, self.window[1].start)
        return _TileResult(origin, wbc, nucleus, rbc, platelets, body)

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
        count = int(labels.max())
        if count == 0:
            return labels
        flat = labels.ravel()
        area = np.bincount(flat, minlength=count + 1)
        rows, cols = np.indices(labels.shape, np.float32).reshape(2, -1)
        with np.errstate(invalid="ignore", divide="ignore"):
            rows = np.bincount(flat, rows, count + 1) / area + self.window[0].start
            cols = np.bincount(flat, cols, count + 1) / area + self.window[1].start
        inside = (
            (rows >= self.core[0].start)
            & (rows < self.core[0].stop)
            & (cols >= self.core[1].start)
            & (cols < self.core[1].stop)
        )
        inside[0] = False
        return np.where(inside[labels], labels, 0)


def _outside_field(density, diameter):
    """The black vignette of a photo through the eyepiece, and a red cell around it.

    No cell is looked for there: its dark edge would pass for stained cells.
    """
    black = vignette(density)
    if not black.any():
        return black
    return ndi.distance_transform_edt(~black) <= diameter


# ----------------------------------------------------------------------------- white cells


def _detector_maps(detector, density, rbc_diameter):
    """The detector's body and core probabilities over ``density``, at its resolution."""
    small = rescale(density, DETECTOR_RBC / rbc_diameter)
    body, core = detector.maps(small)
    return resize(body, density.shape[:2]), resize(core, density.shape[:2])


def _white_cells(body, core, constants):
    """White-cell instance labels from the detector's maps: one cell per confident core.

    A core is a peak of the core map (two touching cells have two), kept if it reaches
    ``CELL_CONFIDENCE``; each cell is grown from its core over the body map.
    """
    from skimage.segmentation import watershed

    diameter = constants.rbc_diameter
    smooth = ndi.gaussian_filter(core, diameter / 10)
    markers = _local_maxima(smooth, reach=max(1, int(0.5 * diameter)), lowest=CORE_LEVEL)
    count = int(markers.max())
    if count == 0:
        return np.zeros(body.shape, np.uint32)
    index = np.arange(1, count + 1)
    confident = ndi.maximum(core, markers, index) >= CELL_CONFIDENCE
    markers = _relabel(np.where(np.isin(markers, index[confident]), markers, 0))
    cells = watershed(-core - body, markers, mask=(body > BODY_LEVEL) | (markers > 0))
    return _without_small(cells.astype(np.uint32), MIN_WBC_AREA, diameter)


def _without_small(labels, least, diameter):
    """``labels`` without those smaller than ``least`` red-cell areas, renumbered."""
    areas = np.bincount(labels.ravel(), minlength=int(labels.max()) + 1)
    small = areas < least * np.pi * diameter**2 / 4
    small[0] = False
    return _relabel(np.where(small[labels], 0, labels).astype(labels.dtype))


def _whole(shape):
    return (slice(0, shape[0]), slice(0, shape[1]))


def _chromatin_cells(nuclei, constants):
    """White cells from chromatin alone: each blob of at least a small nucleus's size.

    For an image in which the detector found no white cell, typically a tight crop around
    one cell (a single-cell image) that gives the network too little of a smear around it to
    judge by. Lobes closer than a quarter of a red cell are one nucleus.
    """
    diameter = constants.rbc_diameter
    joined = ndi.binary_closing(nuclei, iterations=max(1, int(diameter / 8)))
    blobs, _ = ndi.label(joined)
    return _without_small(blobs.astype(np.uint32), MIN_FALLBACK_NUCLEUS, diameter)


def _with_cytoplasm(cells, density, nuclei, constants, body=None):
    """Each detected cell, grown over the cytoplasm-coloured pixels around its nucleus.

    Very pale cytoplasm can fall outside the detector's body map. Each cell's own cytoplasm
    colour (read off a thin rim around its chromatin) tells it from the background and from
    the smear's red cells; the growth stops ``MAX_CYTOPLASM`` red cells from the chromatin,
    and each grown cell is kept round (``_star_shape``). Under a pale stain the cytoplasm and
    the red cells take nearly the same colour, so where the detector's ``body`` map is given,
    the growth stays where it reaches ``GROWTH_BODY_LEVEL``.
    """
    if cells.max() == 0:
        return cells
    diameter = constants.rbc_diameter
    reach = int(np.ceil(MAX_CYTOPLASM * diameter)) + 2
    colours = (np.zeros(3, np.float32), _red_cell_colour(density, cells, nuclei, constants))
    body_reaches = None if body is None else body > GROWTH_BODY_LEVEL
    out = cells.copy()
    for index, box in enumerate(ndi.find_objects(cells), 1):
        if box is None:
            continue
        window = tuple(
            slice(max(0, b.start - reach), min(n, b.stop + reach))
            for b, n in zip(box, cells.shape, strict=True)
        )
        own = cells[window] == index
        near = None if body_reaches is None else body_reaches[window]
        grown = _grown_cell(own, density[window], nuclei[window], colours, constants, near)
        if grown is not None:
            out[window][grown & ((out[window] == 0) | own)] = index
    return out


def _grown_cell(own, density, nuclei, colours, constants, near=None):
    """``own`` with the cytoplasm-coloured pixels around its chromatin (within ``near``, if
    given), kept round; None when the cell has too little chromatin or cytoplasm rim to read a
    colour off."""
    diameter = constants.rbc_diameter
    total = total_density(density)
    chromatin = own & nuclei
    if not chromatin.any():
        return None
    distance = ndi.distance_transform_edt(~chromatin)
    rim = (distance > 0.04 * diameter) & (distance < 0.2 * diameter) & ~nuclei
    rim &= total > 0.5 * constants.stain_threshold
    if rim.sum() < 20:
        return None
    background, red = colours
    means = [background, np.median(density[rim], axis=0)] + ([red] if red is not None else [])
    nearest = np.argmin([((density - m) ** 2).sum(axis=-1) for m in means], axis=0)
    grow = (nearest == 1) & (distance <= MAX_CYTOPLASM * diameter)
    if near is not None:
        grow &= near
    grow = ndi.binary_opening(grow, iterations=max(1, int(diameter / 20))) | own
    region = _component_at(grow, own)
    return _star_shape(region, ndi.center_of_mass(own)) | own


def _red_cell_colour(density, cells, nuclei, constants):
    """The median colour of the stained pixels well away from the white cells (a strided
    sample), or None where there are too few."""
    step = 2
    far = np.ones(cells.shape, bool)
    margin = int(1.5 * constants.rbc_diameter)
    for box in ndi.find_objects(cells):
        if box is not None:
            far[tuple(slice(max(0, b.start - margin), b.stop + margin) for b in box)] = False
    sample = density[::step, ::step]
    stained = total_density(sample) > constants.stain_threshold
    chosen = stained & far[::step, ::step] & ~nuclei[::step, ::step]
    if chosen.sum() < 50:
        return None
    return np.median(sample[chosen], axis=0)


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


def _nuclei(score, constants):
    """Chromatin pixels (nuclei and platelets), without specks smaller than a platelet."""
    from skimage.filters import apply_hysteresis_threshold
    from skimage.morphology import remove_small_objects

    diameter = constants.rbc_diameter
    threshold = constants.nucleus_threshold
    mask = apply_hysteresis_threshold(score, NUCLEUS_HYSTERESIS * threshold, threshold)
    return remove_small_objects(mask, max_size=int((MIN_PLATELET * diameter) ** 2 * np.pi / 4))


def _platelets(nuclei, wbc, diameter):
    """Platelet labels: chromatin blobs of platelet size away from every white cell."""
    blobs, count = ndi.label(nuclei & ~ndi.binary_dilation(wbc > 0, iterations=2))
    if count == 0:
        return blobs.astype(np.uint32)
    sizes = np.sqrt(4 / np.pi * np.bincount(blobs.ravel())) / diameter
    platelet = (sizes >= MIN_PLATELET) & (sizes < MAX_PLATELET)
    platelet[0] = False
    return _relabel(np.where(platelet[blobs], blobs, 0).astype(np.uint32))


def _cell_nuclei(score, wbc, constants):
    """The nucleus of each white cell: its pixels closer to the cell's chromatin level.

    A cell none of whose pixels reaches the smear's chromatin threshold (a pale stain whose
    red cells are purple too, which raises the threshold) is searched again at
    ``PALE_NUCLEUS_SHARE`` of it: inside a white cell, no red cell can pass for chromatin.
    """
    nuclei = np.zeros_like(wbc)
    for index, box in enumerate(ndi.find_objects(wbc), 1):
        if box is None:
            continue
        cell = wbc[box] == index
        values = score[box][cell]
        threshold = constants.nucleus_threshold
        if not (values > threshold).any():
            threshold = max(NUCLEUS_SCORE, PALE_NUCLEUS_SHARE * threshold)
        dark = values > threshold
        if dark.all() or not dark.any():
            nuclei[box][cell & (score[box] > threshold)] = index
            continue
        level = NUCLEUS_LEVEL * np.median(values[dark]) + (1 - NUCLEUS_LEVEL) * np.median(
            values[~dark]
        )
        level = min(level, threshold)
        inside = fill_holes(cell & (score[box] > level))
        nuclei[box][inside & cell] = index
    return nuclei


def _relabel(labels):
    """Renumber labels 1..n, in the order of their values."""
    present = np.bincount(labels.ravel()) > 0
    present[0] = False
    return np.cumsum(present).astype(labels.dtype)[labels]


# ----------------------------------------------------------------------------- red cells


def _red_cells(density, wbc, nuclei, outside, constants, tracker):
    """Split the stained pixels that are neither white cells nor chromatin (nor outside the
    field of view) into red cells."""
    from skimage.morphology import remove_small_holes, remove_small_objects
    from skimage.segmentation import watershed

    diameter = constants.rbc_diameter
    rbc_area = np.pi * diameter**2 / 4
    mask = total_density(density) > constants.stain_threshold
    mask &= ~ndi.binary_dilation((wbc > 0) | nuclei, iterations=2) & ~outside
    mask = remove_small_holes(mask, max_size=int(0.4 * rbc_area))
    mask = ndi.binary_opening(mask, iterations=max(1, int(diameter / 25)))
    mask = remove_small_objects(mask, max_size=int(MIN_RBC_AREA * rbc_area))
    tracker.check()
    distance = ndi.distance_transform_edt(mask)
    smoothed = ndi.gaussian_filter(distance, diameter / 20)
    markers = _local_maxima(smoothed, reach=max(2, int(0.3 * diameter)), lowest=0.15 * diameter)
    tracker.check()
    cells = watershed(-smoothed, markers, mask=mask)
    sizes = np.bincount(cells.ravel())
    small = sizes < MIN_RBC_AREA * rbc_area
    small[0] = False
    cells[small[cells]] = 0
    return _relabel(cells.astype(np.uint32))


def _local_maxima(values, reach, lowest):
    """Labels of the local maxima of ``values`` (the highest within ``reach`` pixels, at
    least ``lowest``); a plateau of equal maxima is one label."""
    peaks = (values == ndi.maximum_filter(values, size=2 * reach + 1)) & (values >= lowest)
    return ndi.label(peaks)[0]


# ----------------------------------------------------------------------------- assembly


def _paste_tiles(shape, results):
    """Every tile's own cells pasted into whole-image label arrays, numbered 1..n per type,
    and the detector's body map (each tile's core)."""
    totals = {
        "wbc": sum(int(r.wbc.max()) for r in results),
        "rbc": sum(int(r.rbc.max()) for r in results),
        "platelet": sum(int(r.platelets.max()) for r in results),
    }
    totals["nucleus"] = totals["wbc"]
    arrays = {name: np.zeros(shape, label_dtype(total)) for name, total in totals.items()}
    arrays["body"] = np.zeros(shape, np.float32)
    offsets = {"wbc": 0, "rbc": 0, "platelet": 0}
    for result in results:
        window = tuple(
            slice(o, o + n) for o, n in zip(result.origin, result.wbc.shape, strict=True)
        )
        start = offsets["wbc"]
        offsets["wbc"] = _paste(arrays["wbc"][window], result.wbc, start)
        _paste(arrays["nucleus"][window], result.nuclei, start)
        offsets["rbc"] = _paste(arrays["rbc"][window], result.rbc, offsets["rbc"])
        offsets["platelet"] = _paste(
            arrays["platelet"][window], result.platelets, offsets["platelet"]
        )
        np.maximum(arrays["body"][window], result.body, out=arrays["body"][window])
    return arrays


def label_dtype(count):
    """The smallest unsigned integer type that numbers ``count`` cells: uint16 up to 65,535
    (half the memory of uint32 on large images), uint32 beyond."""
    return np.uint16 if count <= np.iinfo(np.uint16).max else np.uint32


def _paste(target, labels, start):
    """Write ``labels`` (numbered 1..n) as ``start + 1..n`` where ``target`` is still empty."""
    count = int(labels.max())
    if count:
        where = (labels > 0) & (target == 0)
        target[where] = labels[where] + start
    return start + count


def _assemble(smear, work, arrays, factor, constants, tracker, workers):
    """Labels at the image's resolution and the features of every cell."""
    import pandas as pd

    if factor == 1:
        wbc, nuclei = arrays["wbc"], (arrays["nucleus"] > 0) & (arrays["nucleus"] == arrays["wbc"])
        white = _measure(wbc, smear.rgb, nuclei)
    else:
        wbc, nuclei, rows = _full_resolution_white_cells(
            arrays, smear, factor, constants, thread_count(workers)
        )
        white = _table(rows)
    tracker.check()
    tables = [
        white,
        _measure_blocks(arrays["rbc"], work.rgb, smear.shape, factor, "rbc"),
        _measure_blocks(arrays["platelet"], work.rgb, smear.shape, factor, "platelet"),
    ]
    return SmearSegmentation(
        wbc_labels=wbc,
        nucleus_bits=np.packbits(nuclei, axis=None),
        working_labels={"rbc": arrays["rbc"], "platelet": arrays["platelet"]},
        factor=factor,
        features=pd.concat(tables, ignore_index=True),
        smear=smear,
    )


def _full_resolution_white_cells(arrays, smear, factor, constants, workers):
    """White cells, their nucleus mask and their feature rows at the image's resolution.

    Each cell's outline is its working-resolution outline interpolated to full resolution,
    joined by the pixels where the detector's body probability, interpolated too, reaches
    ``BODY_LEVEL`` (among the pixels nearest to the cell); its nucleus is found again from
    the chromatin of its own full-resolution pixels. Outlines and nuclei are computed for
    ``workers`` cells at once; where two outlines meet, the pixels go to the lower label.
    """
    shape = smear.shape
    boxes = [(i, box) for i, box in enumerate(ndi.find_objects(arrays["wbc"]), 1) if box]
    outlines = in_threads(
        lambda item: _full_resolution_outline(arrays, shape, factor, *item), boxes, workers
    )
    wbc, nuclei, cells = np.zeros(shape, arrays["wbc"].dtype), np.zeros(shape, bool), []
    for (index, _), (window, outline) in zip(boxes, outlines, strict=True):
        cell = outline & (wbc[window] == 0)
        if cell.any():
            wbc[window][cell] = index
            cells.append((index, window, cell))
    described = in_threads(lambda item: _described_cell(smear, constants, *item), cells, workers)
    for (_, window, _), (nucleus, _) in zip(cells, described, strict=True):
        nuclei[window][nucleus] = True
    return wbc, nuclei, [row for _, row in described]


def _full_resolution_outline(arrays, shape, factor, index, box):
    """(full-resolution window, the cell's outline in it) of working-resolution cell
    ``index`` whose bounding box is ``box``."""
    work = tuple(slice(max(0, b.start - 1), b.stop + 1) for b in box)
    window = tuple(
        slice(w.start * factor, min(n, w.stop * factor)) for w, n in zip(work, shape, strict=True)
    )
    labels = arrays["wbc"][work]
    own = _upsample((labels == index).astype(np.float32), factor, work, window) > 0.5
    near = _enlarge(np.isin(labels, (0, index)), factor, own.shape)
    body = _upsample(arrays["body"][work], factor, work, window) > BODY_LEVEL
    return window, _component_at(own | (body & near), own)


def _described_cell(smear, constants, index, window, cell):
    """(nucleus mask, feature row) of the full-resolution ``cell`` mask in ``window``."""
    rgb = np.asarray(smear.rgb[window])
    score = nucleus_score(optical_density(rgb, smear.background))
    nucleus = _cell_nuclei(score, cell.astype(np.uint32), constants) == 1
    origin = (window[0].start, window[1].start)
    return nucleus, _feature_row(index, "wbc", cell, origin, rgb, nucleus[cell].mean())


def _upsample(values, factor, work, window):
    """Bilinear interpolation of working-resolution ``values`` (the ``work`` window) at the
    full-resolution pixels of ``window``."""
    rows = _interpolation(window[0], work[0], factor, values.shape[0])
    cols = _interpolation(window[1], work[1], factor, values.shape[1])
    along_rows = values[rows[0]] * (1 - rows[2])[:, None] + values[rows[1]] * rows[2][:, None]
    return along_rows[:, cols[0]] * (1 - cols[2]) + along_rows[:, cols[1]] * cols[2]


def _interpolation(full, work, factor, length):
    """(lower index, upper index, weight of the upper) for full-resolution pixels ``full``."""
    position = (np.arange(full.start, full.stop) + 0.5) / factor - 0.5 - work.start
    position = np.clip(position, 0, length - 1)
    lower = np.floor(position).astype(int)
    upper = np.minimum(lower + 1, length - 1)
    return lower, upper, (position - lower).astype(np.float32)


def _component_at(mask, seed):
    """The parts of ``mask`` connected to ``seed`` (which is part of it)."""
    labels, _ = ndi.label(mask)
    touching = np.unique(labels[seed])
    return np.isin(labels, touching[touching > 0])


def _enlarge(labels, factor, shape):
    """``labels`` enlarged ``factor`` times pixel for pixel, cut to ``shape``."""
    if factor == 1:
        return labels[: shape[0], : shape[1]]
    rows, cols = labels.shape
    out = np.empty((rows * factor, cols * factor), labels.dtype)
    out.reshape(rows, factor, cols, factor)[...] = labels[:, None, :, None]
    return out[: shape[0], : shape[1]]


def _measure_blocks(labels, rgb, shape, factor, cell_type):
    """Per-cell features of working-resolution ``labels`` enlarged ``factor`` times.

    Computed on the working image, exactly: each working pixel stands for a block of image
    pixels (``shape``), whose mean colour it holds.
    """
    import pandas as pd

    count = int(labels.max())
    flat = labels.ravel()
    weight = _block_counts(shape, factor).ravel().astype(np.float64)
    area = np.bincount(flat, weight, count + 1)[1:]
    index = np.flatnonzero(area > 0) + 1

    def mean_of(values):
        sums = np.bincount(flat, weight * np.ravel(values), count + 1)
        return sums[index] / area[index - 1]

    rows, cols = (_block_centres(n, factor) for n in shape)
    boxes = np.array(
        [[b[0].start, b[1].start, b[0].stop, b[1].stop] for b in ndi.find_objects(labels) if b]
    ).reshape(-1, 4)
    rgb = np.asarray(rgb)
    table = pd.DataFrame(
        {
            "index": index.astype(np.int64),
            "cell_type": cell_type,
            "area": np.rint(area[index - 1]).astype(np.int64),
            "equivalent_diameter": np.sqrt(4 * area[index - 1] / np.pi),
            "centroid_row": mean_of(np.broadcast_to(rows[:, None], labels.shape)),
            "centroid_col": mean_of(np.broadcast_to(cols[None, :], labels.shape)),
            "bbox_min_row": boxes[:, 0] * factor,
            "bbox_min_col": boxes[:, 1] * factor,
            "bbox_max_row": np.minimum(boxes[:, 2] * factor, shape[0]),
            "bbox_max_col": np.minimum(boxes[:, 3] * factor, shape[1]),
            "mean_r": mean_of(rgb[..., 0]),
            "mean_g": mean_of(rgb[..., 1]),
            "mean_b": mean_of(rgb[..., 2]),
            "nucleus_fraction": 1.0 if cell_type == "platelet" else 0.0,
        }
    )
    return table.astype({column: "int64" for column in FEATURE_COLUMNS if "bbox" in column})


def _block_centres(length, factor):
    """The mean image coordinate of each block of ``factor`` pixels along ``length`` pixels."""
    starts = np.arange(0, length, factor)
    return (starts + np.minimum(starts + factor, length) - 1) / 2.0


def _measure(wbc, rgb, nuclei):
    """Per-cell features of full-resolution white-cell labels, ``index`` being the label, and
    their nucleus mask ``nuclei``."""
    rows = []
    for index, box in enumerate(ndi.find_objects(wbc), 1):
        if box is None:
            continue
        cell = wbc[box] == index
        nucleus = float(nuclei[box][cell].mean())
        origin = (box[0].start, box[1].start)
        rows.append(_feature_row(index, "wbc", cell, origin, np.asarray(rgb[box]), nucleus))
    return _table(rows)


def _feature_row(index, cell_type, mask, origin, rgb, nucleus_fraction):
    """One row of ``FEATURE_COLUMNS`` for the cell ``mask`` of a window at ``origin``."""
    rr, cc = np.nonzero(mask)
    colour = rgb[mask].mean(axis=0)
    return (
        index,
        cell_type,
        int(rr.size),
        float(np.sqrt(4 * rr.size / np.pi)),
        float(rr.mean() + origin[0]),
        float(cc.mean() + origin[1]),
        origin[0] + int(rr.min()),
        origin[1] + int(cc.min()),
        origin[0] + int(rr.max()) + 1,
        origin[1] + int(cc.max()) + 1,
        float(colour[0]),
        float(colour[1]),
        float(colour[2]),
        float(nucleus_fraction),
    )


def _table(rows):
    import pandas as pd

    table = pd.DataFrame(rows, columns=list(FEATURE_COLUMNS))
    return table.astype({"index": "int64", "area": "int64"})
