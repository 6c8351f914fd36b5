"""Classify cells: every white cell of a smear, or the central cell of a single-cell image.

The image is prepared once, its white cells found (segmented, given as labels, or the central
cell), cropped as the model was trained, and classified by the diffusion classifier. The
result holds the per-cell table every face shows.
"""

from dataclasses import dataclass

import numpy as np

from napari_cytodiffusion.core.annotations import DELETED, NOT_CELL_CLASSES
from napari_cytodiffusion.core.classes import OUTSIDE_DIFFERENTIAL
from napari_cytodiffusion.core.progress import phases

# Shares of the progress bar: scale estimate, segmentation, classification.
_PROGRESS_WEIGHTS = (0.05, 0.10, 0.85)
# Red cells across the short side from which a "single-cell image" is a smear field: single-cell
# images (CellaVision, PBC, tight crops) span 3-6 (up to 8 where the scale is misread), phone
# fields about 30 (CBC's high-magnification fields only 5-6: they pass as single-cell images).
FIELD_RBC_ACROSS = 15


@dataclass
class Classification:
    """The white cells of one image and their calls.

    Attributes
    ----------
    calls : list of CellCall
    cell_ids : list of int or None
        Label value of each call's cell; None for the central cell of a single-cell image.
    centres : ndarray (n, 2)
        (row, col) centre of each classified cell in the image.
    crops : ndarray (n, size, size, 3)
        What the model saw.
    smear : PreparedSmear
        The image, its background and the red-cell scale the crops were made at.
    classes : tuple of str
        The model's classes.
    labels : ndarray or None
        The instance labels the cell ids refer to (given or segmented, with annotations
        applied); None for a single cell (see :meth:`cell_labels`).
    segmentation : SmearSegmentation or None
    annotated : list of str
        The person's label of each cell from the image's annotations ("" where none).
    added : list of bool
        Whether each cell was painted by a person (missed by the segmentation).
    """

    calls: list
    cell_ids: list
    centres: np.ndarray
    crops: np.ndarray
    smear: object
    classes: tuple
    labels: np.ndarray | None = None
    segmentation: object = None
    annotated: list | None = None
    added: list | None = None

    @property
    def rbc_diameter(self):
        return self.smear.rbc_diameter

    @property
    def single_cell(self):
        return self.cell_ids == [None]

    def table(self):
        """One row per cell (see :func:`calls_table`); ``index`` is its value in
        :meth:`cell_labels` (1 for the single cell of a single-cell image). ``predicted`` is
        the model's call, ``annotated`` the person's (or ""), and ``label`` the person's call
        where there is one, else the model's; a cell a person has called is not flagged for
        review. Without cells: these columns and no rows."""
        ids = [1] if self.single_cell else self.cell_ids
        table = calls_table(self.calls, ids, self.centres, self.classes)
        _with_person_calls(table, self.annotated or [""] * len(table))
        table.insert(4, "added", self.added or [False] * len(table))
        return table

    def domain_shift(self):
        """How unlike the training smears this smear is: the median of its cells' domain-shift
        scores, in units of the review threshold (above 1: unlike the training smears; NaN
        when the model has no domain reference)."""
        from napari_cytodiffusion.core.model.domain import smear_domain_shift

        return smear_domain_shift([call.domain_shift for call in self.calls])

    def softness(self):
        """How much softer than the training cells this smear's cells are: the median of
        their softness (:attr:`CellCall.softness`), NaN when unknown."""
        from napari_cytodiffusion.core.model.domain import smear_softness

        return smear_softness([call.softness for call in self.calls])

    def smear_warning(self):
        """One sentence for a smear unlike the training smears as a whole, saying what to
        do (and that its cells are soft, where that is part of it); "" for a familiar one."""
        from napari_cytodiffusion.core.model.domain import SOFT_ADVICE

        shift = self.domain_shift()
        if not shift > 1.0:
            return ""
        soft = f"; {SOFT_ADVICE}" if self.softness() > 1.0 else ""
        return (
            f"this smear is unlike the training smears (domain shift {shift:.1f}){soft}; "
            "calls may be wrong, review them or adapt the model"
        )

    def field_warning(self):
        """One sentence when a single-cell image spans as many red cells as a smear field
        (only its central cell was classified), saying what to do; "" otherwise."""
        if not self.single_cell:
            return ""
        return smear_field_note(
            min(self.smear.shape) / self.rbc_diameter,
            "only the cell nearest its centre was classified",
            "classify it as a smear (--segment, or untick 'single-cell image') for every "
            "white cell",
        )

    def warnings(self):
        """What a user is told about the image as a whole (:meth:`field_warning`,
        :meth:`smear_warning`), the empty ones left out."""
        return [w for w in (self.field_warning(), self.smear_warning()) if w]

    def final_labels(self):
        """Each cell's call: the person's where annotated, else the model's."""
        human = self.annotated or [""] * len(self.calls)
        return [h or call.label for h, call in zip(human, self.calls, strict=True)]

    def differential(self):
        """Number and percentage of cells per class (annotated artefacts and unknown cells
        left out): see :func:`differential_count`."""
        return differential_count(self.final_labels(), self.classes)

    def cell_labels(self):
        """Instance labels of the classified cells: given, segmented, or a disc of label 1
        around the central cell of a single-cell image."""
        if self.labels is not None:
            return self.labels
        rows, cols = self.smear.shape
        (r, c), radius = self.centres[0], 0.9 * self.rbc_diameter
        yy, xx = np.ogrid[:rows, :cols]
        return (((yy - r) ** 2 + (xx - c) ** 2) <= radius**2).astype(np.uint32)


def classify(
    image,
    model,
    segment=True,
    segmentation=None,
    labels=None,
    rbc_diameter=None,
    strategy="adaptive",
    seed=0,
    uncertainty_threshold=None,
    anomaly_threshold=None,
    annotations=None,
    progress=None,
):
    """Classify every white cell of a smear, or the central cell of a single-cell image.

    Parameters
    ----------
    image : array-like or PreparedSmear
        RGB(A) image of any dtype.
    model : DiffusionModel
    segment : bool
        True for a smear field (every white cell is found and classified), False for a
        single-cell image (PBC / CellaVision style: the cell nearest the centre).
    segmentation : Segmented or SmearSegmentation, optional
        Reuse an existing segmentation of ``image`` (what
        :func:`~napari_cytodiffusion.core.tasks.segment.segment` returns, or its
        ``segmentation``) instead of segmenting again; its cells are cropped at the red-cell
        scale it was made at.
    labels : ndarray, optional
        Instance labels of the white cells to classify (for example edited by the user);
        each label is cut out around its centroid. Overrides ``segment``.
    rbc_diameter : float, optional
        Red-cell diameter in pixels; estimated from the image when not given (an image with
        too few red cells to measure takes the scale of the lab an adapted model was
        adapted to, ``model.lab_rbc_diameter``, where it has one). With ``segmentation``,
        leave it out (or give the scale the segmentation was made at): segment with the
        scale wanted instead.
    strategy, seed, uncertainty_threshold, anomaly_threshold
        See :func:`~napari_cytodiffusion.core.model.classifier.classify_crops`.
    annotations : Annotations, optional
        A person's review of this image (:mod:`~napari_cytodiffusion.core.annotations`):
        deleted cells are dropped, painted cells added, and the person's labels kept over the
        model's. Not used for a single-cell image.
    progress : callable, optional
        ``progress(done, total)``; raise ``Cancelled`` from it to stop.

    Returns
    -------
    Classification

    Raises
    ------
    ValueError
        If ``segmentation`` or ``labels`` are not of ``image`` (another shape),
        ``rbc_diameter`` differs from the scale of ``segmentation``, or ``labels`` are not
        whole numbers of 0 and up.
    """
    from napari_cytodiffusion.core.model.classifier import classify_crops
    from napari_cytodiffusion.core.smear import crops as cropping
    from napari_cytodiffusion.core.smear.prepare import prepare_smear
    from napari_cytodiffusion.core.smear.segmentation import segment_smear

    scaling, segmenting, classifying = phases(progress, _PROGRESS_WEIGHTS)
    if segmentation is not None:
        segmentation = _segmentation_of(image, segmentation, rbc_diameter)
        smear = segmentation.smear
    else:
        smear = prepare_smear(
            image, rbc_diameter, scaling, fallback_rbc_diameter=model.lab_rbc_diameter
        )
    if labels is not None:
        labels = cropping.instance_labels(labels)
        sites = cropping.labelled_cell_sites(smear, labels)
        cell_ids = [int(v) for v in np.unique(labels) if v != 0]
    elif segment or segmentation is not None:
        if segmentation is None:
            segmentation = segment_smear(smear, progress=segmenting)
        labels, wbc = segmentation.wbc_labels, segmentation.table("wbc")
        cell_ids = wbc["index"].astype(int).tolist()
        centres = wbc[["centroid_row", "centroid_col"]].to_numpy(float)
        sites = [cropping.smear_cell_site(smear, c) for c in centres]
    else:
        sites, cell_ids = [cropping.central_cell_site(smear)], [None]
    human, added = {}, set()
    if annotations is not None and labels is not None:
        from napari_cytodiffusion.core.annotations import annotate_labels

        labels, human, added = annotate_labels(labels, annotations)
        cell_ids = [int(v) for v in np.unique(labels) if v != 0]
        sites = cropping.labelled_cell_sites(smear, labels, cell_ids)
    centres = np.array([site.centre for site in sites], float).reshape(-1, 2)
    size = model.image_size
    crops = np.zeros((len(sites), size, size, 3), np.float32)
    for i, site in enumerate(sites):
        crops[i] = site.crop(smear.rgb, size)
    calls = []
    if len(crops):
        calls = classify_crops(
            model,
            crops,
            strategy=strategy,
            seed=seed,
            uncertainty_threshold=uncertainty_threshold,
            anomaly_threshold=anomaly_threshold,
            progress=classifying,
            colour_statistics=np.tile(smear.colour_map.statistics(), (len(crops), 1)),
        )
    return Classification(
        calls,
        cell_ids,
        centres,
        crops,
        smear,
        tuple(model.classes),
        labels,
        segmentation,
        annotated=[human.get(cell, "") for cell in cell_ids],
        added=[cell in added for cell in cell_ids],
    )


def smear_field_note(across, done, advice):
    """One sentence when an image taken as a single cell is ``across`` red cells wide, as wide
    as a smear field (saying what was ``done`` and the ``advice``); "" when it is narrower."""
    if across is None or across < FIELD_RBC_ACROSS:
        return ""
    return (
        f"this image is about {across:.0f} red cells across, a smear field rather than a "
        f"single-cell image: {done}; {advice}"
    )


def _segmentation_of(image, segmentation, rbc_diameter):
    """The SmearSegmentation of ``segmentation`` (unwrapped from what ``segment`` returns),
    checked to be of ``image`` and, where ``rbc_diameter`` is given, at that scale."""
    from napari_cytodiffusion.core.tasks.segment import Segmented

    if isinstance(segmentation, Segmented):
        segmentation = segmentation.segmentation
    made_of = tuple(segmentation.smear.shape)
    shape = tuple(image.shape[:2] if hasattr(image, "shape") else np.shape(image)[:2])
    if shape != made_of:
        raise ValueError(
            f"The segmentation is of another image, of {made_of} pixels, not {shape}: "
            "segment this image (segment(image)), or classify the image it was made of."
        )
    scale = segmentation.smear.rbc_diameter
    if rbc_diameter and not np.isclose(rbc_diameter, scale):
        raise ValueError(
            f"The segmentation was made at a red-cell diameter of {scale:.1f} px, not "
            f"{rbc_diameter}: segment again with rbc_diameter={rbc_diameter}, or leave "
            "rbc_diameter out to classify at the segmentation's scale."
        )
    return segmentation


@dataclass
class CellImages:
    """The central cells of a set of single-cell images (a CellaVision export, a folder of
    crops) and their calls.

    Attributes
    ----------
    paths : list of Path
        The images classified, in order; ``calls``, ``crops`` and ``rbc_diameters`` follow it.
    calls : list of CellCall
    crops : ndarray (n, size, size, 3)
        What the model saw of each image.
    rbc_diameters : list of float
        The red-cell scale each crop was cut at.
    classes : tuple of str
        The model's classes.
    failed : list of (Path, str)
        The images that could not be classified, and why.
    warnings : list of str
        What a user is told about each image as a whole (:meth:`Classification.warnings`,
        joined by "; "), "" where nothing.
    annotated : list of str
        The person's call of each image from its folder's ``cell_labels.csv`` ("" where none).
    """

    paths: list
    calls: list
    crops: np.ndarray
    rbc_diameters: list
    classes: tuple
    failed: list
    warnings: list
    annotated: list

    def table(self):
        """One row per image: ``index`` (1 up), ``file``, then the columns of
        :func:`calls_table` with ``predicted`` (the model's call) and ``annotated`` (the
        person's, or "") after ``label`` (the person's call where there is one, else the
        model's; an image a person has called is not flagged for review), ``rbc_diameter``
        and ``warning``."""
        table = calls_table(self.calls, list(range(1, len(self.calls) + 1)), classes=self.classes)
        table.insert(1, "file", [str(path) for path in self.paths])
        _with_person_calls(table, self.annotated)
        table["rbc_diameter"] = self.rbc_diameters
        table["warning"] = self.warnings
        return table

    def folder_warning(self):
        """One sentence when images of the set are unlike the training smears (their cell's
        domain shift above 1, as the review flag has it), saying what to do; "" otherwise."""
        from napari_cytodiffusion.core.report import count_text

        unlike = sum(1 for call in self.calls if call.domain_shift > 1.0)
        if not unlike:
            return ""
        return (
            f"{unlike} of {count_text(len(self.calls), 'image')} are unlike the training "
            "smears: calls may be wrong. Review them, then adapt the model to this folder "
            "(adapting reads the calls saved in its cell_labels.csv)."
        )

    def differential(self):
        """Number and percentage of images per class (the person's call where given): see
        :func:`differential_count`."""
        labels = [
            human or call.label for human, call in zip(self.annotated, self.calls, strict=True)
        ]
        return differential_count(labels, self.classes)


def classify_cell_images(
    paths, model, rbc_diameter=None, strategy="adaptive", seed=0, progress=None
):
    """Classify the central cell of each single-cell image of ``paths``.

    Images of one scanner share a red-cell scale (:func:`batch_rbc_diameters`) unless
    ``rbc_diameter`` is given. Each image is classified as it would be alone (the same seed
    gives every image the same noise), so a file's call does not depend on its neighbours.

    Parameters
    ----------
    paths : sequence of path-like
        Image files (see :func:`~napari_cytodiffusion.core.io.folder_images` for a folder).
    model : DiffusionModel
    rbc_diameter, strategy, seed
        See :func:`classify`.
    progress : callable, optional
        ``progress(done, total)``; raise ``Cancelled`` from it to stop.

    Returns
    -------
    CellImages
        Unreadable images are listed in ``failed`` with the reason, not raised. A person's
        calls saved in the folder's ``cell_labels.csv`` are kept over the model's.

    Raises
    ------
    AnnotationError
        Before any work, if a folder's ``cell_labels.csv`` cannot be read (:func:`folder_calls`).
    """
    classified, failed, warnings = [], [], []
    for path, result, error in classify_files(
        paths, model, rbc_diameter=rbc_diameter, strategy=strategy, seed=seed, progress=progress
    ):
        if error:
            failed.append((path, error))
            continue
        classified.append((path, result))
        warnings.append("; ".join(result.warnings()))
    size = model.image_size
    crops = [result.crops for _, result in classified]
    return CellImages(
        [path for path, _ in classified],
        [result.calls[0] for _, result in classified],
        np.concatenate(crops) if crops else np.zeros((0, size, size, 3), np.float32),
        [float(result.rbc_diameter) for _, result in classified],
        tuple(model.classes),
        failed,
        warnings,
        [result.annotated[0] for _, result in classified],
    )


# Share of the progress bar for measuring the shared red-cell scales of single-cell images.
_SCALE_SHARE = 0.05


def classify_files(
    paths,
    model,
    segment=False,
    rbc_diameter=None,
    strategy="adaptive",
    seed=0,
    use_annotations=True,
    progress=None,
):
    """Classify image files one by one: ``(path, Classification, "")`` for each, or
    ``(path, None, reason)`` for one that cannot be classified.

    Single-cell images of one scanner share a red-cell scale (:func:`batch_rbc_diameters`);
    smear fields (``segment``) are measured one by one. With ``use_annotations`` a person's
    calls are kept over the model's: those saved beside each smear, or in a single-cell
    image's folder (``cell_labels.csv``, see
    :func:`folder_calls`). The progress bar covers all files.

    Raises
    ------
    AnnotationError
        Before any image is classified, if a folder's ``cell_labels.csv`` cannot be read.
    """
    from pathlib import Path

    from napari_cytodiffusion.core.annotations import load_annotations
    from napari_cytodiffusion.core.io import InputFileError, read_image
    from napari_cytodiffusion.core.progress import phase, report
    from napari_cytodiffusion.core.smear.image import ImageError

    paths = [Path(path) for path in paths]
    person_calls = folder_calls(paths) if use_annotations and not segment else None
    scales, start = [rbc_diameter] * len(paths), 0.0
    if rbc_diameter is None and not segment:
        start = _SCALE_SHARE
        scales = batch_rbc_diameters(paths, progress=phase(progress, 0.0, start))
    step = (1.0 - start) / max(len(paths), 1)
    for i, (path, scale) in enumerate(zip(paths, scales, strict=True)):
        file_progress = phase(progress, start + i * step, start + (i + 1) * step)
        try:
            annotations = load_annotations(path) if segment and use_annotations else None
            result = classify(
                read_image(path),
                model,
                segment=segment,
                rbc_diameter=scale,
                strategy=strategy,
                seed=seed,
                annotations=annotations,
                progress=file_progress,
            )
            if person_calls is not None:
                result.annotated = [person_calls[path.parent].get(path.name, "")]
        except (ImageError, InputFileError, ValueError) as error:
            report(file_progress, 1, 1)  # a file that failed is done with too
            yield path, None, str(error)
            continue
        yield path, result, ""


def folder_calls(paths):
    """{folder: {file name: a person's class}} from the ``cell_labels.csv`` of each folder of
    the single-cell images ``paths`` (see
    :func:`~napari_cytodiffusion.core.annotations.load_folder_labels`), read before any work:
    a damaged table is refused at once, not after every image was classified.

    Raises
    ------
    AnnotationError
        Naming the table that cannot be read and saying how to go on.
    """
    from pathlib import Path

    from napari_cytodiffusion.core.annotations import AnnotationError, load_folder_labels

    calls = {}
    for folder in dict.fromkeys(Path(path).parent for path in paths):
        try:
            calls[folder] = load_folder_labels(folder)
        except AnnotationError as error:
            reason = error.__cause__ or error  # what is wrong with it, without the advice
            raise AnnotationError(
                f"{reason} It holds a person's calls of the images in its folder (columns "
                "file and label): fix it, or move it aside to classify without them."
            ) from error
    return calls


def shared_rbc_diameter(paths, most=25, progress=None):
    """One red-cell scale for single-cell images from the same scanner.

    A single-cell field holds few red cells beside a large white one, so a per-image estimate
    sometimes lands on the white cell (about twice the red-cell size) or on a red cell's pale
    centre (about half). All images of one scanner share one scale, so the median over up to
    ``most`` of them is robust to those misses. Unreadable files are skipped here (they are
    reported when classified). ``progress(done, total)`` is called after each image measured
    (raise ``Cancelled`` from it to stop).

    Returns
    -------
    float or None
        None if no file could be measured.
    """
    from napari_cytodiffusion.core.io import InputFileError, read_image
    from napari_cytodiffusion.core.progress import report
    from napari_cytodiffusion.core.smear.image import ImageError
    from napari_cytodiffusion.core.smear.prepare import prepare_smear

    step = max(1, len(paths) // most)
    chosen = list(paths)[::step][:most]
    estimates = []
    for done, path in enumerate(chosen, 1):
        try:
            estimates.append(prepare_smear(read_image(path)).rbc_diameter)
        except (ImageError, InputFileError):
            pass
        report(progress, done, len(chosen))
    return float(np.median(estimates)) if estimates else None


# Crops of one scanner differ in size by a few pixels (a lab's tight crops: 104-120 px); images
# of different scanners (PBC's 160 px, CBC's 640 x 480 fields) differ by far more than this.
_ALIKE_SIZE = 1.5
# Fewer images than this keep their own estimates: a median of two is no safer than one.
_LEAST_SHARING = 3


def batch_rbc_diameters(paths, most=25, progress=None):
    """A red-cell scale for each single-cell image of a batch, shared by images of one scanner.

    Images of one scanner share one scale (:func:`shared_rbc_diameter`), but a batch may mix
    scanners, and one median would then crop the cells of all but one of them at a wrong
    scale. Images are grouped by size (both sides within a factor of 1.5 of the group's first
    image; a scanner's crops have one size, give or take a few pixels), and each group of three
    or more shares its median estimate. ``progress(done, total)`` follows the images measured.

    Returns
    -------
    list of float or None
        The scale of each path; None where the image is to be measured alone (a group of fewer
        than three, or a file whose size could not be read).

    Examples
    --------
    >>> batch_rbc_diameters([])
    []
    """
    from napari_cytodiffusion.core.progress import report

    scales = [None] * len(paths)
    shared = [members for _, members in size_groups(paths) if len(members) >= _LEAST_SHARING]
    for members, group_progress in zip(shared, phases(progress, [1] * len(shared)), strict=True):
        scale = shared_rbc_diameter([paths[i] for i in members], most, group_progress)
        for i in members:
            scales[i] = scale
    report(progress, 1, 1)
    return scales


def size_groups(paths):
    """Images grouped by size, as one scanner's: ``[((height, width), [indices]), ...]``.

    An image joins the first group whose first image's sides are both within a factor of 1.5
    of its own; files whose size cannot be read join no group.
    """
    from napari_cytodiffusion.core.io import image_size

    groups = []
    for index, path in enumerate(paths):
        size = image_size(path)
        if size is None:
            continue
        for first, members in groups:
            if all(max(a, b) <= _ALIKE_SIZE * min(a, b) for a, b in zip(first, size, strict=True)):
                members.append(index)
                break
        else:
            groups.append((size, [index]))
    return groups


def _with_person_calls(table, annotated):
    """``predicted`` (the model's call) and ``annotated`` (the person's, or "") right after
    ``label``, which becomes the person's call where there is one, in place; a cell a person
    has called needs no more review (``needs_review`` False, no ``why``), as every face says."""
    at = table.columns.get_loc("label") + 1
    table.insert(at, "predicted", table["label"])
    table.insert(at + 1, "annotated", list(annotated))
    called = table["annotated"] != ""
    table["label"] = table["annotated"].where(called, table["predicted"])
    table.loc[called, "needs_review"] = False
    table.loc[called, "why"] = ""


# The columns of calls_table after the probabilities: CellCall's attributes of these names.
_CALL_COLUMNS = (
    "uncertainty",
    "anomaly_score",
    "domain_shift",
    "softness",
    "size_ratio",
    "needs_review",
    "why",
    "unet_evals",
)


def calls_table(calls, cell_ids=None, centres=None, classes=()):
    """Per-cell results as a pandas DataFrame; without ``calls``, its columns and no rows
    (the probabilities' columns those of ``classes``).

    Columns: ``index`` (the cell's label value, 0 where not given), ``label``, ``p_<class>``
    for every class, ``uncertainty``, ``anomaly_score``, ``domain_shift``, ``softness``
    (above 1: softer than the training cells), ``size_ratio`` (above 1: too large for its
    class), ``needs_review``, ``why`` (the reasons for review: uncertain / unlike any known
    class / unlike the training smears / too large for its class), ``unet_evals``, and
    ``centroid_row`` / ``centroid_col`` when ``centres`` is given.
    """
    import pandas as pd

    rows = []
    for i, call in enumerate(calls):
        cell = cell_ids[i] if cell_ids is not None else None
        row = {"index": int(cell) if cell is not None else 0, "label": call.label}
        row.update({f"p_{name}": p for name, p in call.probabilities.items()})
        row.update({name: getattr(call, name) for name in _CALL_COLUMNS})
        if centres is not None:
            row.update(centroid_row=float(centres[i][0]), centroid_col=float(centres[i][1]))
        rows.append(row)
    if rows:
        return pd.DataFrame(rows)
    columns = ["index", "label", *(f"p_{name}" for name in classes), *_CALL_COLUMNS]
    if centres is not None:
        columns += ["centroid_row", "centroid_col"]
    return pd.DataFrame(columns=columns)


def with_new_classes(labels, classes):
    """``classes``, then the classes among ``labels`` that they lack (a person's call of a
    class the model does not have, such as blast); artefacts and unknown cells are none.

    Examples
    --------
    >>> with_new_classes(["lymphocyte", "blast", "artefact"], ("lymphocyte", "neutrophil"))
    ('lymphocyte', 'neutrophil', 'blast')
    """
    not_new = (*classes, *NOT_CELL_CLASSES, DELETED)
    new = {label for label in labels if label and label not in not_new}
    return tuple(classes) + tuple(sorted(new))


def differential_count(labels, classes):
    """Number of cells per class, and per 100 leukocytes, in ``classes`` order, then the
    classes a person added that ``classes`` lack (such as blast, :func:`with_new_classes`).

    The 100 are the leukocytes: erythroblasts, platelets and smudge cells
    (:data:`~napari_cytodiffusion.core.classes.OUTSIDE_DIFFERENTIAL`) are counted per 100 of
    them but are not part of them (``in_differential`` False), so the other classes' percents
    add up to 100. Without any leukocyte, the classes counted apart have no rate per 100
    (NaN) and the others 0.

    Examples
    --------
    >>> differential_count(["neutrophil", "neutrophil", "lymphocyte", "platelet"],
    ...                    ("lymphocyte", "neutrophil", "platelet"))
            class  count    percent  in_differential
    0  lymphocyte      1  33.333333             True
    1  neutrophil      2  66.666667             True
    2    platelet      1  33.333333            False
    """
    import pandas as pd

    labels = list(labels)
    classes = with_new_classes(labels, classes)
    counts = [labels.count(name) for name in classes]
    inside = [name not in OUTSIDE_DIFFERENTIAL for name in classes]
    leukocytes = sum(c for c, counted in zip(counts, inside, strict=True) if counted)
    if leukocytes:
        percent = [100 * c / leukocytes for c in counts]
    else:
        percent = [0.0 if counted else np.nan for counted in inside]
    return pd.DataFrame(
        {"class": list(classes), "count": counts, "percent": percent, "in_differential": inside}
    )
