"""Analyze smears: find, classify and flag every white cell, and decide what needs a person.

One pipeline serves a single field, a whole-slide scan and a batch of smears. A smear is read
lazily (:class:`~napari_cytodiffusion.core.smear.image.SmearPixels`), its background and scale
are measured once on an overview, and it is cut into large overlapping tiles. Each tile is
segmented and its white cells classified on their own; a cell belongs to the tile holding its
centroid, so it is counted once. Only the per-cell table and the crops of flagged cells are
kept, so memory depends on the tile size, not on the image size. Tiles run in threads, or on a
dask.distributed cluster (see :func:`analyze_files`).
"""

import functools
import hashlib
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np

from napari_cytodiffusion.core.annotations import NOT_CELL_CLASSES
from napari_cytodiffusion.core.classes import OUTSIDE_DIFFERENTIAL
from napari_cytodiffusion.core.model.classifier import TOO_LARGE, UNKNOWN_KIND
from napari_cytodiffusion.core.model.domain import SOFT_ADVICE, smear_softness
from napari_cytodiffusion.core.progress import phase, phases, report

# Tiles of the full-resolution image each analysed on their own (pixels per side).
ANALYSIS_TILE = 4096
# A differential needs at least this many white cells (the usual manual count).
MIN_CELLS = 100
# A smear goes to review when more than this share of its calls is flagged.
REVIEW_SHARE = 0.10
# The median anomaly score of a smear's cells above which its stain or scanner is unlike the
# training smears (PBC test cells: 0.17; other hospitals' CBC cells: 1.4; another microscope
# and stain: 2.3). A smear-level stand-in until a dedicated domain-shift score exists.
SHIFT_MEDIAN_ANOMALY = 1.0
# The median domain-shift score (core/model/domain.py, in units of its review threshold)
# above which a smear is unlike the training smears.
SHIFT_MEDIAN_DOMAIN = 1.0


@dataclass
class SmearAnalysis:
    """Everything the report and the viewer show of one smear.

    Attributes
    ----------
    cells : pandas.DataFrame
        One row per white cell: ``id``, centroid, bounding box, ``label``, ``p_<class>``,
        ``uncertainty``, ``anomaly_score``, ``needs_review`` and ``why``.
    counts : dict
        Cells found of each type: ``wbc``, ``rbc``, ``platelet``.
    flagged_crops : dict
        Cell id -> uint8 crop (what the model saw) of every flagged cell.
    overview : ndarray uint8
        The smear shrunk to at most a megapixel, and ``overview_factor`` its shrinking factor.
    decision, reasons
        The triage: ``"release"`` or ``"review"``, and why (a list of sentences).
    source : str or None
        The file the smear was read from (a batch's: its resolved path), None when not known.
    """

    name: str
    shape: tuple
    rbc_diameter: float
    classes: tuple
    cells: object
    counts: dict
    flagged_crops: dict
    overview: np.ndarray
    overview_factor: int
    decision: str = "release"
    reasons: list = field(default_factory=list)
    source: str | None = None

    def differential(self):
        """Number of white cells per class and per 100 leukocytes (see ``differential_count``)."""
        from napari_cytodiffusion.core.tasks.classify import differential_count

        return differential_count(self.cells["label"], self.classes)

    def leukocytes(self, differential=None):
        """The differential's 100 %: the white cells called a leukocyte class, not the calls it
        counts apart (erythroblast, platelet, smudge cell) nor a person's artefacts; from
        ``differential`` where it is already made."""
        if differential is None:
            differential = self.differential()
        return int(differential["count"][differential["in_differential"]].sum())

    def summary(self):
        """One row for the summary table across smears (``triage.json``); its reasons a list,
        as one reason may hold a semicolon."""
        differential = self.differential()
        row = {
            "smear": self.name,
            "source": self.source,
            "decision": self.decision,
            "reasons": list(self.reasons),
            "white_cells": len(self.cells),
            "leukocytes": self.leukocytes(differential),
            "flagged": int(self.cells["needs_review"].sum()) if len(self.cells) else 0,
            "red_cells": self.counts["rbc"],
            "platelets": self.counts["platelet"],
            "rbc_diameter_px": round(self.rbc_diameter, 2),
        }
        for name, percent in zip(differential["class"], differential["percent"], strict=True):
            row[f"percent_{name}"] = round(float(percent), 2)
        return row


def analyze_smear(
    image,
    model,
    name="smear",
    rbc_diameter=None,
    tile_size=ANALYSIS_TILE,
    strategy="adaptive",
    seed=0,
    annotations=None,
    progress=None,
    source=None,
):
    """Segment, classify and triage one smear of any size, in this process.

    Parameters
    ----------
    image : array-like
        RGB(A) image of any dtype and size; a lazily sliced array (zarr, dask, memory-mapped
        TIFF) is read tile by tile (see :func:`~napari_cytodiffusion.core.io.open_image`).
    model : DiffusionModel
    name : str
        The smear's name in the report.
    rbc_diameter : float, optional
        Red-cell diameter in pixels; estimated from the image when not given.
    tile_size : int
        Side of the tiles analysed one at a time, in pixels.
    annotations : Annotations, optional
        A person's review of this smear: their labels are kept over the model's, cells they
        deleted are dropped and cells they painted are added (see :func:`apply_annotations`).
    progress : callable, optional
        ``progress(done, total)``; raise ``Cancelled`` from it to stop.
    source : path, optional
        The file the image was read from, named in the report and the summary.

    Returns
    -------
    SmearAnalysis

    Raises
    ------
    AnnotationError
        If ``annotations`` were made on an image of another shape.
    """
    from napari_cytodiffusion.core.smear.segmentation import check_tile_size

    check_tile_size(tile_size)
    measuring, analysing = phases(progress, [1, 9])
    prepared = prepare(image, rbc_diameter, measuring)
    painted = _painted(annotations, prepared.shape)
    info = describe(prepared, tile_size)
    parts, count = [], len(info.tiles)
    for i, tile in enumerate(info.tiles):
        # Each tile reports as it goes, so a Cancel stops the work within a tile.
        share = phase(analysing, i / count, (i + 1) / count)
        own = _painted_in(tile, painted)
        parts.append(
            analyze_tile(prepared, tile, model, strategy, seed, info.segmentation, share, own)
        )
    return assemble(name, info, parts, model, annotations, source)


def _painted(annotations, shape):
    """The cells a person painted on the smear (none without annotations); annotations of
    another image are refused before any tile is analysed."""
    from napari_cytodiffusion.core.annotations import painted_cells

    return [] if annotations is None else painted_cells(annotations, shape)


def _painted_in(tile, painted):
    """The painted cells whose centroid lies in ``tile``'s core: like a segmented cell, each is
    counted by one tile."""
    if not painted:
        return []
    inside = _inside(np.array([cell.centroid for cell in painted], float), tile[0])
    return [cell for cell, own in zip(painted, inside, strict=True) if own]


def prepare(image, rbc_diameter=None, progress=None):
    """The smear with its background and scale, read lazily (see ``prepare_smear``)."""
    from napari_cytodiffusion.core.smear.image import SmearPixels
    from napari_cytodiffusion.core.smear.prepare import prepare_smear

    pixels = image if isinstance(image, SmearPixels) else SmearPixels(image)
    return prepare_smear(pixels, rbc_diameter, progress)


@dataclass
class SmearInfo:
    """What the tiles of a smear share, measured once: scale, colours, tiles, overview."""

    shape: tuple
    background: np.ndarray
    rbc_diameter: float
    top: float
    tiles: list
    overview: np.ndarray
    overview_factor: int
    segmentation: object = None  # the tiles' SharedSettings (core.smear.segmentation)
    colour_map: object = None  # the smear's ColourMap (core.smear.normalise)


def describe(smear, tile_size=ANALYSIS_TILE):
    """The :class:`SmearInfo` of a prepared smear: its tiles reach three red cells further."""
    from napari_cytodiffusion.core.smear.segmentation import HALO_RBC, _tiles, shared_settings

    halo = int(np.ceil(HALO_RBC * smear.rbc_diameter))
    overview, factor = smear.rgb.overview()
    settings = shared_settings(smear)
    # Windows start on the working resolution's block grid, so a cell's pixels are averaged
    # the same way in every tile that sees it.
    tiles = [
        (core, (_on_grid(rows, settings.factor), _on_grid(cols, settings.factor)))
        for core, (rows, cols) in _tiles(smear.shape, max(tile_size, 3 * halo), halo)
    ]
    return SmearInfo(
        shape=tuple(smear.shape),
        background=smear.background,
        rbc_diameter=float(smear.rbc_diameter),
        top=smear.rgb.top,
        tiles=tiles,
        overview=(np.clip(overview, 0, 1) * 255 + 0.5).astype(np.uint8),
        overview_factor=int(factor),
        segmentation=settings,
        colour_map=smear.colour_map,
    )


def _on_grid(window, factor):
    return slice(window.start // factor * factor, window.stop)


@dataclass
class TilePart:
    """What one tile contributes: its own white cells (table, calls), crops, counts, and the
    person's label of each cell they painted ("" for a segmented cell)."""

    cells: object
    calls: list
    crops: np.ndarray
    counts: dict
    painted: list


def analyze_tile(
    smear, tile, model, strategy="adaptive", seed=0, shared=None, progress=None, painted=()
):
    """Segment one tile and classify the white cells whose centroid lies in its core.

    ``shared``: the smear's segmentation settings (:attr:`SmearInfo.segmentation`);
    ``progress(done, total)`` as in :func:`analyze_smear`; ``painted``: the cells a person
    painted whose centroid lies in the core (:func:`_painted_in`), added after the segmented
    ones."""
    import pandas as pd

    from napari_cytodiffusion.core.model.classifier import classify_crops
    from napari_cytodiffusion.core.smear.crops import smear_cell_site
    from napari_cytodiffusion.core.smear.prepare import PreparedSmear
    from napari_cytodiffusion.core.smear.segmentation import segment_smear

    core, window = tile
    part = PreparedSmear(smear.rgb.region(*window), smear.background, smear.rbc_diameter)
    # Classifying a tile's cells costs a few times segmenting it.
    segmenting, classifying = phases(progress, [1, 3])
    found = segment_smear(part, progress=segmenting, shared=shared)
    origin = np.array([window[0].start, window[1].start], float)
    counts, tables = {}, {}
    for kind in ("wbc", "rbc", "platelet"):
        table = found.table(kind)
        centre = table[["centroid_row", "centroid_col"]].to_numpy(float) + origin
        own = _inside(centre, core)
        tables[kind], counts[kind] = table[own].reset_index(drop=True), int(own.sum())
    added, labels = _painted_rows(painted, found.wbc_labels, window)
    if labels:
        tables["wbc"] = pd.concat([tables["wbc"], added], ignore_index=True)
    cells = _global_coordinates(tables["wbc"], origin)
    size = model.image_size
    crops = np.zeros((len(cells), size, size, 3), np.float32)
    for i, row in enumerate(tables["wbc"].itertuples()):
        site = smear_cell_site(smear, (row.centroid_row, row.centroid_col))
        crops[i] = site.crop(part.rgb, size)
    colours = np.tile(smear.colour_map.statistics(), (len(crops), 1))
    calls = (
        classify_crops(
            model,
            crops,
            strategy=strategy,
            seed=seed,
            progress=classifying,
            colour_statistics=colours,
        )
        if len(crops)
        else []
    )
    crops = (crops * 255 + 0.5).astype(np.uint8)
    return TilePart(cells, calls, crops, counts, [""] * counts["wbc"] + labels)


def _painted_rows(painted, wbc_labels, window):
    """(feature rows in the tile's pixels, the person's labels) of the painted cells: each on
    the pixels of the tile no segmented or earlier painted cell holds, as ``classify`` paints
    them (marked in ``wbc_labels``; a cell left without any is dropped, as there); the nucleus
    is not measured."""
    import pandas as pd

    rows, labels = [], []
    for cell in painted:
        box, mask = _painted_mask(cell, window)
        free = mask & (wbc_labels[box] == 0)
        if not free.any():
            continue
        wbc_labels[box][free] = wbc_labels.max() + 1
        rr, cc = np.nonzero(free)
        rr, cc = rr + box[0].start, cc + box[1].start
        rows.append(
            {
                "area": rr.size,
                "equivalent_diameter": np.sqrt(4 * rr.size / np.pi),
                "centroid_row": rr.mean(),
                "centroid_col": cc.mean(),
                "bbox_min_row": rr.min(),
                "bbox_min_col": cc.min(),
                "bbox_max_row": rr.max() + 1,
                "bbox_max_col": cc.max() + 1,
                "nucleus_fraction": np.nan,
            }
        )
        labels.append(cell.label)
    return pd.DataFrame(rows, columns=list(CELL_COLUMNS[1:])), labels


def _painted_mask(cell, window):
    """(box, mask): a painted cell's mask within ``window``, ``box`` in the window's pixels;
    decoded in the mask's own box, never at the size of the image."""
    from napari_cytodiffusion.core.annotations import decode_mask

    r0, c0, r1, c1 = cell.mask["bbox"]
    size = (r1 - r0, c1 - c0)
    own = decode_mask({"bbox": [0, 0, *size], "runs": cell.mask["runs"]}, size)
    rows, own_rows = _overlap(r0, r1, window[0])
    cols, own_cols = _overlap(c0, c1, window[1])
    return (rows, cols), own[own_rows, own_cols]


def _overlap(start, stop, window):
    """The part of [start, stop) inside the slice ``window``: (in the window's pixels, in
    those of [start, stop))."""
    low, high = (min(max(v, window.start), window.stop) for v in (start, stop))
    return slice(low - window.start, high - window.start), slice(low - start, high - start)


def _inside(centres, core):
    rows, cols = centres[:, 0], centres[:, 1]
    return (
        (rows >= core[0].start)
        & (rows < core[0].stop)
        & (cols >= core[1].start)
        & (cols < core[1].stop)
    )


def _global_coordinates(table, origin):
    """A white-cell feature table moved from tile to image coordinates."""
    table = table.copy()
    for column in ("centroid_row", "bbox_min_row", "bbox_max_row"):
        table[column] = table[column] + origin[0]
    for column in ("centroid_col", "bbox_min_col", "bbox_max_col"):
        table[column] = table[column] + origin[1]
    return table


def assemble(name, info, parts, model, annotations=None, source=None):
    """One :class:`SmearAnalysis` from the tiles' parts (in tile order), with its triage;
    ``annotations`` and ``source`` as in :func:`analyze_smear`."""
    import pandas as pd

    from napari_cytodiffusion.core.tasks.classify import calls_table

    calibration = model.calibration or {}
    limits = (
        float(calibration.get("uncertainty_threshold", 0.3)),
        float(calibration.get("anomaly_threshold", 3.0)),
        1.0,  # the domain-shift score is in units of its threshold
    )
    tables, calls, crops, painted = [], [], [], []
    for part in parts:
        tables.append(part.cells)
        calls += part.calls
        crops += list(part.crops)
        painted += part.painted
    features = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
    # The model's classes give a smear without white cells the columns of one with them.
    cells = _cell_rows(features, calls_table(calls, classes=model.classes), limits)
    if annotations is not None:
        cells, crops = apply_annotations(
            cells, crops, annotations, info.rbc_diameter, info.shape, painted
        )
    flagged = {
        int(cell_id): crop
        for cell_id, crop, review in zip(cells["id"], crops, cells["needs_review"], strict=True)
        if review
    }
    counts = {kind: sum(part.counts[kind] for part in parts) for kind in ("wbc", "rbc", "platelet")}
    analysis = SmearAnalysis(
        name=name,
        shape=info.shape,
        rbc_diameter=info.rbc_diameter,
        classes=tuple(model.classes),
        cells=cells,
        counts=counts,
        flagged_crops=flagged,
        overview=info.overview,
        overview_factor=info.overview_factor,
        source=None if source is None else str(source),
    )
    analysis.decision, analysis.reasons = triage(cells)
    return analysis


CELL_COLUMNS = (
    "id",
    "centroid_row",
    "centroid_col",
    "bbox_min_row",
    "bbox_min_col",
    "bbox_max_row",
    "bbox_max_col",
    "area",
    "equivalent_diameter",
    "nucleus_fraction",
)


def _cell_rows(features, calls, limits):
    """The per-cell table: position, size, call, probabilities, flags and why; without calls,
    its columns and no rows."""
    import pandas as pd

    calls = calls.drop(columns=["index", "unet_evals"])
    if not len(calls):
        return pd.DataFrame(columns=[*CELL_COLUMNS, *calls.columns])
    cells = features[list(CELL_COLUMNS[1:])].reset_index(drop=True)
    cells.insert(0, "id", np.arange(1, len(cells) + 1))
    cells = pd.concat([cells, calls.reset_index(drop=True)], axis=1)
    unknown = [np.nan] * len(cells)
    shift = cells["domain_shift"] if "domain_shift" in cells else unknown
    size = cells["size_ratio"] if "size_ratio" in cells else unknown
    cells["why"] = [
        _why(u, a, limits, d, r)
        for u, a, d, r in zip(
            cells["uncertainty"], cells["anomaly_score"], shift, size, strict=True
        )
    ]
    return cells


def apply_annotations(cells, crops, annotations, rbc_diameter, shape, painted):
    """The per-cell table with a person's review applied: ``predicted`` (the model's call),
    ``annotated`` (the person's, or ""), ``added`` (painted by the person), ``label`` the
    person's where given; reviewed cells no longer need review; deleted cells are dropped
    (with their crops) and ids renumbered.

    Segmented cells are matched to annotations within half a red-cell diameter; ``painted``
    gives the person's label of each painted cell ("" for a segmented one). Annotations of an
    image of another ``shape`` are refused (``AnnotationError``)."""
    from napari_cytodiffusion.core.annotations import DELETED, match_centres
    from napari_cytodiffusion.core.classes import class_key

    added = np.array([bool(label) for label in painted], bool)
    centres = cells[["centroid_row", "centroid_col"]].to_numpy(float)[~added]
    matched = iter(match_centres(centres, annotations, 0.5 * rbc_diameter, shape))
    human = [class_key(label) if label else next(matched) or "" for label in painted]
    keep = np.array([h != DELETED for h in human], bool)
    cells = cells[keep].reset_index(drop=True)
    human = [h for h, k in zip(human, keep, strict=True) if k]
    crops = [c for c, k in zip(crops, keep, strict=True) if k]
    cells["id"] = np.arange(1, len(cells) + 1)
    position = list(cells.columns).index("label")
    cells.insert(position, "predicted", cells["label"])
    cells.insert(position + 1, "annotated", human)
    cells.insert(position + 2, "added", added[keep])
    reviewed = cells["annotated"] != ""
    cells.loc[reviewed, "label"] = cells.loc[reviewed, "annotated"]
    cells.loc[reviewed, "needs_review"] = False
    cells.loc[reviewed, "why"] = ""
    return cells, crops


def _why(uncertainty, anomaly, limits, domain_shift=np.nan, size_ratio=np.nan):
    from napari_cytodiffusion.core.model.classifier import review_reasons

    reasons = review_reasons(
        uncertainty, anomaly, domain_shift, limits, with_scores=True, size_ratio=size_ratio
    )
    return "; ".join(reasons)


def triage(cells):
    """("release" or "review", reasons) for a smear's per-cell table.

    A smear needs a person when too few white cells were counted for a differential, when any
    cell is unlike every known class (a blast, say), when any call cannot be right for the
    cell's size, when more than ``REVIEW_SHARE`` of the calls are flagged, or when its cells
    as a whole look unlike the training smears.
    """
    reasons = []
    count = len(cells)
    # The differential counts leukocytes: not the calls it leaves out of its 100, nor cells a
    # person marked artefact or unknown.
    outside = OUTSIDE_DIFFERENTIAL + NOT_CELL_CLASSES
    leukocytes = int((~cells["label"].isin(outside)).sum()) if count else 0
    if leukocytes < MIN_CELLS:
        reasons.append(
            f"too few white cells counted: {leukocytes} (a differential needs {MIN_CELLS})"
        )
    if count:
        unusual = int(cells["why"].str.contains(UNKNOWN_KIND).sum())
        if unusual:
            reasons.append(
                f"{unusual} cell(s) unlike any known class: possible blasts or other abnormal cells"
            )
        too_large = int(cells["why"].str.contains(TOO_LARGE).sum())
        if too_large:  # a wrong call in the differential, whatever the rest
            reasons.append(
                f"{too_large} cell(s) too large for the class they were called: those calls "
                "are likely wrong (defocus, compression or another stain?)"
            )
        flagged = int(cells["needs_review"].sum())
        if flagged > REVIEW_SHARE * count:
            reasons.append(f"{flagged} of {count} calls flagged ({100 * flagged / count:.0f} %)")
        shift = cells["domain_shift"].dropna() if "domain_shift" in cells else []
        if len(shift):
            median = float(np.median(shift))
            if median > SHIFT_MEDIAN_DOMAIN:
                soft = smear_softness(cells["softness"]) if "softness" in cells else np.nan
                reasons.append(
                    f"unfamiliar stain or scanner: domain shift {median:.1f} (median; above 1 "
                    "is unlike the training smears)"
                    + (f"; {SOFT_ADVICE}" if soft > 1.0 else "")
                    + "; review, or adapt the model"
                )
        elif (median := float(np.median(cells["anomaly_score"]))) > SHIFT_MEDIAN_ANOMALY:
            reasons.append(
                f"unfamiliar stain or scanner: the cells score {median:.1f} on the anomaly "
                "scale (median), unlike the training smears; review, or adapt the model"
            )
    return ("review" if reasons else "release"), reasons


# ----------------------------------------------------------------------------- many smears


@dataclass
class BatchRequest:
    """A batch analysis: the smears, where the results go, and where the work runs.

    Attributes
    ----------
    paths : list of path
        Image files, OME-Zarr folders, or folders of images (their images, not recursively).
    out : path
        Results folder: ``OUT/<smear>/`` per smear (see :func:`result_names`) and
        ``OUT/summary.csv``.
    scheduler : str, optional
        Address of a running dask scheduler; a local cluster of ``workers`` processes when
        not given.
    ignore_annotations : bool
        Do not apply the annotations saved beside a smear (by default a person's labels are
        kept over the model's).
    overwrite : bool
        Replace results made with other settings (or not by a batch): a person may have
        corrected them, so they are refused otherwise. Results of these settings are made
        again without it where their smear or its annotations changed, and an unfinished run
        continues.
    """

    paths: list
    out: object
    model: str = "default"
    device: str = "auto"
    scheduler: str | None = None
    workers: int | None = None
    rbc_diameter: float | None = None
    tile_size: int = ANALYSIS_TILE
    strategy: str = "adaptive"
    seed: int = 0
    ignore_annotations: bool = False
    overwrite: bool = False


@dataclass
class BatchResult:
    """Which smears were analysed now, skipped as finished, or failed (with the reason), by
    results folder name; ``sources``: {folder name: the smear's full path}."""

    analysed: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    failed: dict = field(default_factory=dict)
    sources: dict = field(default_factory=dict)
    summary: object = None


def image_sources(paths):
    """Image files and OME-Zarr folders of ``paths`` (a plain folder stands for its images).

    Raises
    ------
    ValueError
        If a path does not exist or nothing analysable is found.
    """
    from pathlib import Path

    from napari_cytodiffusion.core.io import folder_images

    sources = []
    for path in map(Path, paths):
        if not path.exists():
            raise ValueError(f"No such file or folder: {path}")
        if path.is_dir() and not _is_zarr(path):
            inside = folder_images(path)
            sources += inside + sorted(p for p in path.iterdir() if p.is_dir() and _is_zarr(p))
        else:
            sources.append(path)
    if not sources:
        raise ValueError(f"No images found in {', '.join(map(str, paths))}.")
    # A smear given twice (itself and its folder, say) is analysed once.
    unique = {}
    for source in sources:
        unique.setdefault(source.resolve(), source)
    return list(unique.values())


def _is_zarr(path):
    return any((path / name).exists() for name in (".zattrs", "zarr.json", ".zarray"))


def result_names(sources, out):
    """Results folder names in ``out``, the same for a source whatever the run.

    A source keeps the folder that holds a batch's results of it already. Otherwise the
    folder takes its file name, kept whole (a.png and a.jpg do not collide), unless another of
    ``sources`` shares that name, or ``out`` holds a file of that name (the smear itself, when
    ``out`` is its folder) or another source's results (a batch's or the *Analyze smear*
    widget's): then the name and a short hash of the source's path (``x.jpg-1a2b3c4d``).
    """
    from collections import Counter
    from pathlib import Path

    from napari_cytodiffusion.core import report as files

    out = Path(out)
    held = {}  # {source: the folder of a batch's results of it}
    for path in sorted(out.glob(f"*/{files.FINISHED}")):
        source = files.marker_source(files.read_marker(path.parent))
        if source:
            held[source] = path.parent.name
    paths = [str(Path(source).resolve()) for source in sources]
    sharing = Counter(source.name for source in sources)
    names = []
    for source, path in zip(sources, paths, strict=True):
        if path in held:
            names.append(held[path])
        elif sharing[source.name] == 1 and _free(out / source.name, path):
            names.append(source.name)
        else:
            names.append(hashed_name(source.name, path))
    return names


def result_name(name, source, out):
    """The results folder in ``out`` of one smear analysed on its own (the *Analyze smear*
    widget): ``name``, unless that folder holds another source's results (a batch's or an
    earlier such run's), then ``name`` and a short hash of ``source``'s path as in
    :func:`result_names`.

    Raises
    ------
    ValueError
        If ``source`` is not known (None) and the folder holds a known source's results.
    """
    from pathlib import Path

    from napari_cytodiffusion.core import report as files

    folder = Path(out) / name
    owner = files.folder_source(folder)
    if owner is None or owner == source:
        return name
    if source is None:
        raise ValueError(
            f"{folder} holds the results of {owner}: choose another results folder or name."
        )
    return hashed_name(name, source)


def hashed_name(name, source):
    """``name`` and a short hash of the full path ``source``: the same for it in every run."""
    return f"{name}-{hashlib.sha256(str(source).encode()).hexdigest()[:8]}"


def _free(folder, source):
    """Whether ``folder`` can take the results of ``source`` (a full path): it is not a file
    and holds no other source's results."""
    from napari_cytodiffusion.core import report as files

    return (folder.is_dir() or not folder.exists()) and files.folder_source(folder) in (
        None,
        source,
    )


def model_identity(name_or_path):
    """What identifies a model's calls: a named model's sha256 (checked whenever it is
    loaded), or a model file's path, size and modification time.

    Raises
    ------
    WeightsError
        If ``name_or_path`` is neither a model name nor a model file.
    """
    from napari_cytodiffusion.core.model.weights import find_model, model_path
    from napari_cytodiffusion.core.report import file_identity

    entry = find_model(str(name_or_path))
    if entry is not None:
        return {"sha256": entry.sha256}
    return file_identity(model_path(name_or_path))


def analysis_settings(request):
    """What a batch's results depend on besides each smear's files: the model and the settings
    of the analysis, not where or on how many workers it runs."""
    return {
        "model": model_identity(request.model),
        "rbc_diameter": request.rbc_diameter,
        "tile_size": request.tile_size,
        "strategy": request.strategy,
        "seed": request.seed,
        "ignore_annotations": request.ignore_annotations,
    }


def _fingerprint(request, settings, source):
    """The :func:`~napari_cytodiffusion.core.report.fingerprint` of a smear's results as
    ``request`` would make them now."""
    from napari_cytodiffusion.core import report as files
    from napari_cytodiffusion.core.annotations import sidecar_path

    # A person's annotations are part of the results unless they are ignored.
    inputs = [] if request.ignore_annotations else [sidecar_path(source)]
    return files.fingerprint(source, settings, inputs)


@dataclass
class WorkerProblem:
    """Why a worker could not do its task, returned rather than raised: dask logs every raised
    error with its traceback, and a person's unreadable file, or a device the worker lacks,
    is not a bug."""

    error: Exception


def _returning_problems(function):
    """``function`` (a worker task) with the errors a person's files cause returned as a
    :class:`WorkerProblem`; a bug still raises."""

    @functools.wraps(function)
    def run(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except (OSError, ValueError) as error:
            return WorkerProblem(error)

    return run


@_returning_problems
def measure_file(path, rbc_diameter=None, tile_size=ANALYSIS_TILE):
    """Open a smear file lazily and measure what its tiles share (runs on a worker)."""
    from napari_cytodiffusion.core.io import open_image

    return describe(prepare(open_image(path), rbc_diameter), tile_size)


@_returning_problems
def analyze_file_tile(path, info, tile, model, device, strategy, seed, threads=None, painted=()):
    """Analyse one tile of a smear file (runs on a worker, which keeps the model loaded);
    ``painted`` as in :func:`analyze_tile`."""
    from napari_cytodiffusion.core.io import open_image
    from napari_cytodiffusion.core.model.weights import shared_model
    from napari_cytodiffusion.core.smear.image import SmearPixels
    from napari_cytodiffusion.core.smear.prepare import PreparedSmear

    if threads:
        import torch

        torch.set_num_threads(threads)
    try:
        model = shared_model(model, device)
    except RuntimeError as error:  # a device this worker lacks (resolve_device): not a bug
        return WorkerProblem(error)
    pixels = SmearPixels.trusted(open_image(path), info.top)
    smear = PreparedSmear(pixels, info.background, info.rbc_diameter)
    smear.colour_map = info.colour_map  # measured once on the whole smear, not per tile
    return analyze_tile(smear, tile, model, strategy, seed, info.segmentation, None, painted)


def analyze_files(request, progress=None, on_smear=None):
    """Analyse many smears on a dask.distributed cluster; finished smears are skipped.

    Every smear is measured on a worker, then its tiles are spread over the workers (each
    loads the model once); when all tiles of a smear are back they are put together in tile
    order and the smear's files are written (see :mod:`napari_cytodiffusion.core.report`).
    A smear that fails is reported and the others go on.

    Parameters
    ----------
    request : BatchRequest
    progress : callable, optional
        ``progress(done, total)`` in tiles (the total grows as smears are measured).
    on_smear : callable, optional
        ``on_smear(name, analysis_or_None, error_or_None)`` as each smear ends.

    Returns
    -------
    BatchResult

    Raises
    ------
    ValueError
        For input it cannot use, before any work: no images, an unknown model, results of
        other settings in the way (see ``BatchRequest.overwrite``).
    RuntimeError
        If a local cluster is asked for a device this machine lacks.
    """
    from pathlib import Path

    from napari_cytodiffusion.core.devices import resolve_device
    from napari_cytodiffusion.core.io import exclusive_folder
    from napari_cytodiffusion.core.model.weights import model_path
    from napari_cytodiffusion.core.smear.segmentation import check_tile_size

    check_tile_size(request.tile_size)
    sources = image_sources(request.paths)
    model_path(request.model)  # an unknown model is refused before the folder is made
    if not request.scheduler:  # the workers are this machine's: its devices are theirs
        resolve_device(request.device)
    out = Path(request.out)
    made = not out.exists()
    try:
        with exclusive_folder(out):
            return _analyze_sources(request, sources, out, progress, on_smear)
    finally:
        if made and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # nothing was written (no scheduler, say): leave no empty folder


def _analyze_sources(request, sources, out, progress, on_smear):
    from napari_cytodiffusion.core import report as files
    from napari_cytodiffusion.core.model.weights import shared_model

    result = BatchResult()
    todo = _plan(request, sources, out, result)
    if todo:
        request = replace(request, model=_for_workers(request.model))
        model = shared_model(request.model, "cpu")  # classes and calibration, for assembling
        with _client(request) as (client, threads):
            from napari_cytodiffusion.core.tasks._workers import LoadModelEarly

            client.register_plugin(LoadModelEarly(request.model, request.device))
            _run_batch(client, threads, request, model, todo, out, result, progress, on_smear)
    result.summary = files.write_summary_rows(out, files.summary_rows(out))
    return result


def _for_workers(model):
    """A model as a worker finds it: a model file by its full path (a worker may run in
    another folder), a model name as it is."""
    from napari_cytodiffusion.core.model.weights import find_model, model_path

    return model if find_model(str(model)) else str(model_path(model).resolve())


def _plan(request, sources, out, result):
    """The (source, folder name, fingerprint) of every smear to analyse; the finished ones go
    to ``result.skipped``.

    The fingerprint is taken before the smear is read, so a file changed meanwhile is analysed
    again next time. Results of other settings in the way are refused unless
    ``request.overwrite``; then the stale results of the others are marked unfinished, as
    being made again with these settings, so they leave the summary whether or not the smear
    can be analysed again, and a stopped run continues without asking.
    """
    from napari_cytodiffusion.core import report as files

    settings = analysis_settings(request)
    todo = []
    for source, name in zip(sources, result_names(sources, out), strict=True):
        result.sources[name] = str(source.resolve())
        marker = _fingerprint(request, settings, source)
        if files.finished(out / name, marker):
            result.skipped.append(name)
        else:
            todo.append((source, name, marker))
    if not request.overwrite:
        _refuse_replacing([out / name for _, name, _ in todo], settings)
    for _, name, marker in todo:
        files.mark_unfinished(out / name, marker)
    return todo


def _refuse_replacing(folders, settings):
    """Refuse, before any work, to replace results that a batch of these ``settings`` did not
    make: a person may have corrected them since."""
    for folder in folders:
        earlier = earlier_results(folder, settings)
        if earlier is not None:
            raise ValueError(
                f"{earlier.path} exists, from an earlier run with other settings, and may have "
                "been corrected since: choose another --out folder, or replace the earlier "
                "results (--overwrite)."
            )


@dataclass(frozen=True)
class EarlierResults:
    """Results in a smear's folder that a batch of the settings at hand did not make.

    Attributes
    ----------
    path : Path
        The first of their files.
    finished : bool
        Whether a batch's marker calls them its finished results: not the *Analyze smear*
        widget's (no marker, or one it turned unfinished), a person's, or a stopped run's.
    differences : str
        The settings the marker records otherwise, in words ("another model, seed 1 instead
        of seed 0"); empty where it records none (no marker, or an earlier version's).
    """

    path: object
    finished: bool
    differences: str


def earlier_results(folder, settings):
    """The results in ``folder`` that a batch of ``settings`` (:func:`analysis_settings`) would
    replace although it did not make them; None where there are none, or where its marker
    records these settings.

    Returns
    -------
    EarlierResults or None
    """
    from napari_cytodiffusion.core import report as files

    present = [folder / name for name in files.RESULT_FILES if (folder / name).exists()]
    marker = files.read_marker(folder)
    if not present or (marker is not None and marker.get("settings") == settings):
        return None
    recorded = (marker or {}).get("settings") or {}
    return EarlierResults(
        present[0],
        bool(marker and marker.get("finished")),
        _differences(recorded, settings) if isinstance(recorded, dict) else "",
    )


def _differences(recorded, settings):
    """How ``recorded`` settings differ from ``settings``, in words; a model only as another
    one: its sha256, or its file's size and time, mean nothing to a person."""

    def shown(key, value):
        if key == "ignore_annotations":
            return "annotations ignored" if value else "annotations applied"
        if key == "rbc_diameter":
            return "red-cell diameter measured" if value is None else f"red-cell diameter {value}"
        return f"{key.replace('_', ' ')} {value}"

    if not recorded:
        return ""
    return ", ".join(
        "another model"
        if key == "model"
        else f"{shown(key, recorded.get(key))} instead of {shown(key, value)}"
        for key, value in settings.items()
        if recorded.get(key) != value
    )


def _client(request):
    """A context manager giving (dask client, torch threads per worker task)."""
    import contextlib
    import os

    import dask
    from distributed import Client, LocalCluster

    @contextlib.contextmanager
    def connect():
        if request.scheduler:
            with Client(request.scheduler) as client:
                yield client, None
            return
        workers = request.workers or max(1, min(4, os.cpu_count() or 1))
        threads = max(1, (os.cpu_count() or 1) // workers)
        # Dask starts its workers with one thread for the maths libraries and a fixed
        # malloc trim threshold; a fixed threshold also freezes glibc's mmap threshold, so
        # every tensor of the classifier's batches is mapped and faulted in afresh, which
        # made a worker more than twice as slow as the same tile run in-process. Each worker
        # here owns its share of the cores and keeps the default allocator.
        # Dask lets this process's own variables win over that setting, and its nannies
        # leave theirs behind in it: they are set here for the start and put back after, so
        # neither a shell's OMP_NUM_THREADS nor an earlier cluster oversubscribes the cores.
        maths_threads = {
            name: str(threads)
            for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
        }
        with (
            dask.config.set({"distributed.nanny.pre-spawn-environ": maths_threads}),
            _environment(maths_threads),
            LocalCluster(
                n_workers=workers,
                threads_per_worker=1,
                processes=True,
                host="127.0.0.1",
                dashboard_address=None,
            ) as cluster,
            Client(cluster) as client,
        ):
            yield client, threads

    return connect()


@contextmanager
def _environment(values):
    """Environment variables set to ``values`` for the block, then as they were."""
    import os

    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@dataclass
class _Smear:
    """One smear of a batch as its results come back from the workers."""

    source: object  # its path as given
    marker: dict
    info: object = None
    annotations: object = None
    painted: list = field(default_factory=list)
    parts: dict = field(default_factory=dict)

    @property
    def path(self):
        """The full path, for the workers: one may run in another folder."""
        return str(self.source.resolve())

    def measured(self, info, request):
        """Take the smear's measurements and, unless ignored, the annotations beside it,
        checked to be of this image before any tile is analysed."""
        from napari_cytodiffusion.core.annotations import load_annotations

        self.info = info
        if not request.ignore_annotations:
            self.annotations = load_annotations(self.source)
        self.painted = _painted(self.annotations, info.shape)


def _run_batch(client, threads, request, model, todo, out, result, progress, on_smear):
    from distributed import as_completed

    pending, jobs, smears = as_completed(), {}, {}
    total = [0, 0]  # tiles done, tiles known
    for source, name, marker in todo:
        smears[name] = smear = _Smear(source, marker)
        future = client.submit(
            measure_file, smear.path, request.rbc_diameter, request.tile_size, pure=False
        )
        jobs[future.key] = (name, None)
        pending.add(future)
    for future in pending:
        name, index = jobs.pop(future.key)
        smear = smears[name]
        if name in result.failed:
            continue
        try:
            value = _outcome(future)
            if index is None:
                smear.measured(value, request)
        except Exception as error:  # the smear fails alone
            _fail(name, error, result, on_smear)
            continue
        if index is None:
            total[1] += len(smear.info.tiles)
            for number, tile in enumerate(smear.info.tiles):
                task = client.submit(
                    analyze_file_tile,
                    smear.path,
                    smear.info,
                    tile,
                    request.model,
                    request.device,
                    request.strategy,
                    request.seed,
                    threads,
                    _painted_in(tile, smear.painted),
                    pure=False,
                )
                jobs[task.key] = (name, number)
                pending.add(task)
            continue
        smear.parts[index] = value
        total[0] += 1
        report(progress, total[0], total[1])
        if len(smear.parts) == len(smear.info.tiles):
            _finish(name, smear, model, out, result, on_smear)
            smears[name] = None  # its tiles are no longer needed


def _outcome(future):
    """A finished worker task's value; raises what went wrong on the worker: a bug, or the
    problem it returned (:class:`WorkerProblem`)."""
    if future.status == "error":
        raise future.exception()
    value = future.result()
    if isinstance(value, WorkerProblem):
        raise value.error
    return value


def _finish(name, smear, model, out, result, on_smear):
    """Put a smear's tiles together and write its files; a smear that cannot be written
    fails alone."""
    from napari_cytodiffusion.core import report as files

    parts = [smear.parts[i] for i in range(len(smear.parts))]
    try:
        # The full path: names may repeat.
        analysis = assemble(name, smear.info, parts, model, smear.annotations, smear.path)
        files.write_smear(analysis, out / name, marker=smear.marker)
    except Exception as error:
        _fail(name, error, result, on_smear)
        return
    result.analysed.append(name)
    if on_smear is not None:
        on_smear(name, analysis, None)


def _fail(name, error, result, on_smear):
    result.failed[name] = str(error)
    if on_smear is not None:
        on_smear(name, None, error)
