"""Explain a cell: counterfactual heat maps and edits towards another class.

One cell (a labelled cell of a smear, a cell picked after segmenting, the central cell of a
single-cell image, or an image that is a model crop already) is cropped as the classifier
sees it; the heat maps say where the model would change it to call it another class, and the
edits show the cell changed that way. :func:`explain_grid` summarises many cells as a class x
class grid of mean maps.
"""

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from napari_cytodiffusion.core.model.counterfactual import (
    DEFAULT_EDIT_GUIDANCE,
    DEFAULT_EDIT_METHOD,
    DEFAULT_EDIT_STEPS,
    DEFAULT_STRENGTH,
    DEFAULT_TRIALS,
    EDIT_METHODS,
)
from napari_cytodiffusion.core.progress import phases

# Network evaluations of a typical adaptive call of one cell, to share the progress bar.
_CALL_COST = 48


@dataclass
class ExplainRequest:
    """What to explain and how.

    Attributes
    ----------
    target : str
        The class to explain towards and edit towards.
    cell_id : int, optional
        The cell's label value in ``labels`` (or in the segmentation with ``segment``).
    labels : ndarray, optional
        White-cell instance labels of the image's shape.
    segment : bool
        Segment the image first and take cell ``cell_id`` of its white cells.
    source : str, optional
        The cell's current class, as given; when not given, a person's label of it (from
        ``annotations``, then from ``row``), else the call ``row`` records, else the
        classifier's call (``classify_crops``).
    all_targets : bool
        Edit towards every class, not only ``target`` (for the all-classes figure).
    annotations : Annotations, optional
        A person's review of the smear (with ``labels`` or ``segment``), applied as classify
        applies it: deleted cells are gone, painted cells added, so ``cell_id`` numbers the
        cells as classify does; the person's label, where it is a class of the model, is the
        cell's current class unless ``source`` is given. A cell a person deleted is refused.
    row : dict, optional
        The cell's row of a table of cells as a face shows it: of a calls table
        (:meth:`~napari_cytodiffusion.core.tasks.classify.Classification.table`,
        :meth:`~napari_cytodiffusion.core.tasks.classify.CellImages.table`), whose person's
        call (``annotated``) or else classifier's call (``predicted``, ``p_<class>``,
        ``needs_review``, ``why``) is the current class without calling the cell again; or of
        another table, whose ``label`` is then the current class as given.
    """

    target: str
    cell_id: int | None = None
    labels: np.ndarray | None = None
    segment: bool = False
    source: str | None = None
    trials: int = DEFAULT_TRIALS
    strength: float = DEFAULT_STRENGTH
    steps: int = DEFAULT_EDIT_STEPS
    guidance: float = DEFAULT_EDIT_GUIDANCE
    method: str = DEFAULT_EDIT_METHOD
    seed: int = 0
    rbc_diameter: float | None = None
    all_targets: bool = False
    annotations: object = None
    row: dict | None = None


class _Located(NamedTuple):
    """The requested cell: its site, its crop, the image's shape, red cells across the image
    (when its central cell was taken), the smear's colour statistics (1, 9) (None for a model
    crop), and a person's label of it ("" where none)."""

    site: object
    crop: np.ndarray
    shape: tuple
    across: float | None
    colours: np.ndarray | None
    person: str


@dataclass
class Explanation:
    """Heat maps and edits of one cell, and where the cell lies in its image.

    Attributes
    ----------
    site : CellSite
    crop : ndarray (size, size, 3)
        The cell as the model sees it.
    maps : CellExplanation
        Heat maps towards every class, the paired errors, source and best fit.
    edits : dict
        Class name -> the crop edited towards that class.
    target : str
    image_shape : tuple
        (rows, cols) of the image the cell came from.
    cell_id : int or None
    call : CellCall or None
        The classifier's call that gave the current class: made here, or the one the
        request's ``row`` records (None when the class was given or is a person's label).
    central_across : float or None
        Red cells across the image, when its central cell was taken (no labels given).
    annotated : bool
        The current class is a person's label of the cell (from the annotations).
    """

    site: object
    crop: np.ndarray
    maps: object
    edits: dict
    target: str
    image_shape: tuple
    cell_id: int | None = None
    call: object = None
    central_across: float | None = None
    annotated: bool = False

    @property
    def heat_crop(self):
        """The heat map towards the target, at the crop's pixels."""
        return self.maps.map_for(self.target)

    @property
    def edited(self):
        """The crop edited towards the target."""
        return self.edits[self.target]

    def heat_on_image(self):
        """The heat map resampled onto the image's pixels (NaN outside the crop)."""
        return self.site.to_image(self.heat_crop, self.image_shape)

    def placement(self):
        """(origin (row, col), step) of the crop in the image: see ``crops.crop_placement``."""
        return self.site.placement(self.crop.shape[0])

    def title(self):
        what = "cell" if self.cell_id is None else f"cell {self.cell_id}"
        return f"{what} {self.maps.source} -> {self.target}"

    def source_note(self):
        """Where the current class came from, and whether the maps' quick best fit (the
        lowest paired error over these trials) disagrees with it."""
        source = self.maps.source
        if self.call is not None:
            p = self.call.probabilities[source]
            note = f"{source}: the classifier's call, p = {p:.2f}"
            if self.call.needs_review:  # flagged as classify flags it
                note += f", NEEDS REVIEW ({self.call.why})"
        else:
            note = f"{source}: a person's label" if self.annotated else f"{source}: as given"
        if self.maps.predicted != source:
            note += f"; the quick best fit of these trials, {self.maps.predicted}, disagrees"
        return note

    def summary(self):
        """One line: the change explained, and where its current class came from."""
        (row, col) = self.site.centre
        return (
            f"cell at ({row:.0f}, {col:.0f}): {self.maps.source} -> {self.target} "
            f"({self.source_note()})"
        )

    def field_warning(self):
        """One sentence when the central cell of an image as wide as a smear field was
        explained (no labels were given), saying how to pick a cell; "" otherwise."""
        from napari_cytodiffusion.core.tasks.classify import smear_field_note

        return smear_field_note(
            self.central_across,
            "the cell nearest its centre was explained",
            "to pick a cell, choose the image's white cells (or --segment --cell-id)",
        )

    def figure(self):
        """The cell's maps towards every class, with the edits made (matplotlib Figure)."""
        from napari_cytodiffusion.core.model.counterfactual import cell_maps_figure

        return cell_maps_figure(self.crop, self.maps, self.edits)


# What write_explanation writes into its folder, in this order.
EXPLANATION_FILES = (
    "heatmap_crop.npy",
    "heatmap.npy",
    "counterfactual.npy",
    "cell.png",
    "counterfactual.png",
    "heatmap.png",
    "maps_all_classes.png",
)


def write_explanation(explanation, image, out):
    """Write :data:`EXPLANATION_FILES` of ``explanation`` (made of ``image``) into the folder
    ``out``: the maps in crop and image pixels (NaN outside the crop), the cell and its edit
    as arrays and pictures, the map over the image, and the maps towards every class.

    Each file is written under a temporary name and renamed when complete, with the folder
    held against another run (:func:`~napari_cytodiffusion.core.io.exclusive_folder`).
    Returns the paths written.
    """
    from pathlib import Path

    from PIL import Image

    from napari_cytodiffusion.core.io import atomic_write, exclusive_folder
    from napari_cytodiffusion.core.model.counterfactual import heat_overlay
    from napari_cytodiffusion.core.model.generation import to_uint8
    from napari_cytodiffusion.core.smear.image import to_rgb_float

    heat = explanation.heat_on_image()
    overlay = heat_overlay(to_rgb_float(image), heat)
    writers = (  # in the order of EXPLANATION_FILES
        lambda path: np.save(path, explanation.heat_crop),
        lambda path: np.save(path, heat),
        lambda path: np.save(path, explanation.edited),
        lambda path: Image.fromarray(to_uint8(explanation.crop)).save(path),
        lambda path: Image.fromarray(to_uint8(explanation.edited)).save(path),
        lambda path: Image.fromarray(to_uint8(overlay)).save(path),
        lambda path: explanation.figure().savefig(path),
    )
    paths = [Path(out) / name for name in EXPLANATION_FILES]
    with exclusive_folder(out):
        for path, write in zip(paths, writers, strict=True):
            with atomic_write(path) as partial:
                write(partial)
    return paths


def explain(image, model, request, progress=None):
    """Heat maps of one cell towards every class, and its edit towards ``request.target``.

    Parameters
    ----------
    image : array-like
        The smear or single-cell image (RGB(A), any dtype); a ``model.image_size`` square
        image is taken as a model crop already.
    model : DiffusionModel
    request : ExplainRequest
    progress : callable, optional
        ``progress(done, total)`` over the whole task; raise ``Cancelled`` to stop.

    Returns
    -------
    Explanation
    """
    from napari_cytodiffusion.core.model import counterfactual
    from napari_cytodiffusion.core.model.classifier import classify_crops

    _validate_request(request, model)
    located = _locate(image, model, request)
    site, crop = located.site, located.crop
    source, call, annotated = _known_class(request, located.person, model)
    targets = model.classes if request.all_targets else (_canonical(request.target, model),)
    edit_cost = counterfactual.edit_evaluations(request.strength, request.steps, request.method)
    calling = _CALL_COST * (source is None)
    classifying, explaining, *editing = phases(
        progress,
        [calling, request.trials * (len(model.classes) + 1)] + [3 * edit_cost] * len(targets),
    )
    if source is None:
        # The smear's colours, as classify gives them: its domain-shift score (and so the
        # review flag and the call itself) then matches classify's for this cell.
        call = classify_crops(
            model,
            crop[None],
            seed=request.seed,
            progress=classifying,
            colour_statistics=located.colours,
        )[0]
        source = call.label
    maps = counterfactual.explain_cell(
        model, crop, source, request.trials, request.seed, explaining
    )
    edits = {}
    for target, step in zip(targets, editing, strict=True):
        edits[target] = counterfactual.counterfactual_image(
            model,
            crop,
            target,
            maps.source,
            request.strength,
            request.steps,
            request.guidance,
            request.method,
            request.seed,
            step,
        )
    target = _canonical(request.target, model)
    return Explanation(
        site,
        crop,
        maps,
        edits,
        target,
        located.shape,
        request.cell_id,
        call,
        located.across,
        annotated,
    )


@dataclass
class ExplanationGrid:
    """Class x class mean heat maps over a set of cells.

    Attributes
    ----------
    grid : ndarray (classes, classes, size, size)
        Row: the cells' current class; column: the target. NaN for rows with no cells.
    counts : ndarray (classes,)
        Cells per current class.
    mean_crops : ndarray (classes, size, size, 3)
    classes : tuple of str
    """

    grid: np.ndarray
    counts: np.ndarray
    mean_crops: np.ndarray
    classes: tuple = field(default_factory=tuple)

    @property
    def cells(self):
        return int(self.counts.sum())

    def figure(self):
        from napari_cytodiffusion.core.model.counterfactual import grid_figure

        return grid_figure(self.grid, self.counts, self.mean_crops, self.classes)


def explain_grid(
    image,
    model,
    labels=None,
    sources=None,
    trials=DEFAULT_TRIALS,
    seed=0,
    rbc_diameter=None,
    annotations=None,
    progress=None,
):
    """Mean heat maps over every labelled cell of a smear, or every image of a stack.

    Parameters
    ----------
    image : array-like
        A smear (with ``labels``) or a stack (n, rows, cols, 3) of single-cell images.
    model : DiffusionModel
    labels : ndarray, optional
        White-cell instance labels of the smear.
    sources : str or dict, optional
        The cells' current classes: one class for all, or {cell id or plane index: class}
        (missing or None: a person's label of it, else the best fit in these trials).
    trials, seed : int
    rbc_diameter : float, optional
    annotations : Annotations, optional
        A person's review of the smear (with ``labels``), applied as classify applies it:
        deleted cells are left out (their ``sources`` too), painted cells added, and a
        person's label of a cell the model knows is its current class where ``sources``
        gives none.
    progress : callable, optional

    Returns
    -------
    ExplanationGrid
    """
    from napari_cytodiffusion.core.model import counterfactual

    if not trials >= 1:
        raise ValueError(f"trials must be at least 1, got {trials}.")
    if annotations is not None and labels is not None:
        labels, sources = _annotated_set(labels, annotations, sources, model)
    crops, keys = _cell_set(image, model, labels, rbc_diameter)
    if isinstance(sources, dict) or sources is None:
        unknown = sorted(set(sources or {}) - set(keys), key=str)
        if unknown:
            raise ValueError(
                f"sources names cells that are not in the set: {unknown}; its keys are cell ids "
                "of the labels (or plane indices of the stack)."
            )
        chosen = [(sources or {}).get(key) for key in keys]
    else:
        chosen = [sources] * len(keys)
    chosen = [None if name is None else _canonical(name, model) for name in chosen]
    grid, counts, mean_crops = counterfactual.mean_map_grid(
        model, crops, chosen, trials, seed, progress
    )
    return ExplanationGrid(grid, counts, mean_crops, tuple(model.classes))


def _cell_set(image, model, labels, rbc_diameter):
    """Crops of every labelled cell of a smear, or of every plane of a stack, and their keys."""
    from napari_cytodiffusion.core.smear import crops as cropping
    from napari_cytodiffusion.core.smear.prepare import prepare_smear

    size = model.image_size
    image = np.asarray(image)
    if labels is not None:
        smear = prepare_smear(image, rbc_diameter, fallback_rbc_diameter=model.lab_rbc_diameter)
        sites = cropping.labelled_cell_sites(smear, labels)
        if not sites:
            raise ValueError("The labels layer holds no cells.")
        keys = [int(v) for v in np.unique(labels) if v != 0]
        return np.stack([site.crop(smear.rgb, size) for site in sites]), keys
    if image.ndim != 4:
        raise ValueError(
            "A grid needs a set of cells: a labels layer of the image's cells, or an image "
            "stack of single cells."
        )
    crops = [
        cropping.single_cell_crop(plane, size, rbc_diameter, f"plane {i}")
        for i, plane in enumerate(image)
    ]
    return np.stack(crops), list(range(len(crops)))


def _annotated_set(labels, annotations, sources, model):
    """``labels`` with a person's ``annotations`` applied, and the cells' ``sources``: those
    given, else a person's label of a class of the model; none for a cell they deleted."""
    from napari_cytodiffusion.core.annotations import annotate_labels

    annotated, human, _ = annotate_labels(labels, annotations)
    if isinstance(sources, str):
        return annotated, sources
    kept = set(np.unique(annotated).tolist()) - {0}
    # Painted again over a cell already painted (a classes layer), a label has no pixels.
    known = {cell: name for cell, name in human.items() if cell in kept and name in model.classes}
    deleted = set(np.unique(labels).tolist()) - kept
    given = {cell: name for cell, name in (sources or {}).items() if cell not in deleted}
    return annotated, {**known, **given}


def _locate(image, model, request):
    """The requested cell, as a :class:`_Located`."""
    from napari_cytodiffusion.core.smear import crops as cropping
    from napari_cytodiffusion.core.smear.image import to_rgb_float
    from napari_cytodiffusion.core.smear.prepare import prepare_smear

    size = model.image_size
    if request.labels is None and not request.segment and cropping.is_model_crop(image, size):
        crop = to_rgb_float(image)
        return _Located(cropping.model_crop_site(size), crop, (size, size), None, None, "")
    labels, person = request.labels, ""
    if labels is not None:  # before any work: a cell a person deleted is refused at once
        labels, person = _annotated_cell(labels, request)
    smear = prepare_smear(image, request.rbc_diameter, fallback_rbc_diameter=model.lab_rbc_diameter)
    if request.segment:
        from napari_cytodiffusion.core.smear.segmentation import segment_smear

        labels, person = _annotated_cell(segment_smear(smear).wbc_labels, request)
    across = None
    if labels is None:
        site = cropping.central_cell_site(smear)
        across = min(smear.shape) / smear.rbc_diameter
    else:
        site = cropping.labelled_cell_sites(smear, labels, [request.cell_id])[0]
    colours = smear.colour_map.statistics()[None]
    return _Located(site, site.crop(smear.rgb, size), smear.shape, across, colours, person)


def _annotated_cell(labels, request):
    """``labels`` with the request's annotations applied (unchanged without), and a person's
    label of the requested cell ("" where none); a cell a person deleted is refused, saying
    so."""
    annotations = request.annotations
    if annotations is None:
        return labels, ""
    from napari_cytodiffusion.core.annotations import SUFFIX, annotate_labels

    cell = int(request.cell_id)
    annotated, human, _ = annotate_labels(labels, annotations)
    # A painted cell takes a value above every label's: the cell's value is gone only if
    # the person deleted it.
    if not np.any(annotated == cell) and np.any(np.asarray(labels) == cell):
        raise ValueError(
            f"No cell with label {cell}: a person deleted it as not a white cell (in "
            f"{annotations.image}{SUFFIX}); choose another cell."
        )
    return annotated, human.get(cell, "")


def _known_class(request, person, model):
    """(class, call, whether a person's label) of the cell's current class as known before
    any call: the ``source`` given, a person's label of a class of the model (``person`` from
    the annotations, then the row's), the call the row records, or the row's ``label`` as
    given; (None, None, False) when the classifier is to call the cell."""
    if request.source is not None:
        return request.source, None, False
    row = request.row or {}
    for human in (person, row.get("annotated")):
        if human in model.classes:
            return human, None, True
    label = row.get("predicted", row.get("label"))
    if label not in model.classes:
        return None, None, False
    call = _recorded_call(row, label, model.classes) if "needs_review" in row else None
    return label, call, False


def _recorded_call(row, label, classes):
    """The classifier's call ``label`` that a calls table's ``row`` records."""
    from napari_cytodiffusion.core.model.classifier import CellCall

    values = {name: float(row.get(name, np.nan)) for name in _RECORDED_SCORES}
    return CellCall(
        label=label,
        probabilities={name: float(row.get(f"p_{name}", np.nan)) for name in classes},
        needs_review=bool(row["needs_review"]),
        unet_evals=int(row.get("unet_evals", 0)),
        why=str(row.get("why") or ""),
        **values,
    )


# The scores of a CellCall that a calls table keeps in columns of the same names.
_RECORDED_SCORES = ("uncertainty", "anomaly_score", "domain_shift", "softness", "size_ratio")


def _canonical(name, model):
    from napari_cytodiffusion.core.classes import canonical_class

    return canonical_class(name, model.classes)


def _validate_request(request, model):
    """Check every field before any work, with a message naming the field."""
    _canonical(request.target, model)
    if request.source is not None:
        _canonical(request.source, model)
    picks = request.labels is not None or request.segment
    if picks and (request.cell_id is None or int(request.cell_id) < 1):
        raise ValueError(
            f"cell id {request.cell_id} is not a cell: give the label value of a white cell "
            "(1 or more; 0 is the background)."
        )
    if request.labels is not None and request.segment:
        raise ValueError("Give labels or segment the image, not both.")
    if request.annotations is not None and not picks:
        raise ValueError(
            "Annotations number a smear's cells: give labels or segment the image with them."
        )
    checks = (
        ("trials", request.trials >= 1, "at least 1"),
        ("steps", request.steps >= 1, "at least 1"),
        ("strength", 0 < request.strength <= 1, "in (0, 1]"),
        ("guidance", np.isfinite(request.guidance) and request.guidance >= 0, "finite, >= 0"),
    )
    for name, ok, allowed in checks:
        if not ok:
            raise ValueError(f"{name} must be {allowed}, got {getattr(request, name)}.")
    if request.method not in EDIT_METHODS:
        raise ValueError(
            f"method must be one of {', '.join(EDIT_METHODS)}, got {request.method!r}."
        )
