"""A person's corrections of the cells of one image, kept beside it and reused.

An annotation sidecar (``<image file>.annotations.json``) lists the cells a person reviewed:
where each is (its centroid in image pixels), the class they gave it (a class of the model,
``artefact`` or ``unknown``), what the model had called it, and cells they deleted (false
detections) or painted (missed cells; their mask is stored run-length encoded). It is written
atomically, so a crash mid-save leaves the previous file intact, and a classes layer's review
is merged into it (:func:`merge_annotations`): saving keeps every entry the layer does not
stand for, such as cells deleted in an earlier session, which a person may restore
(:func:`restore_deletions`). ``classify`` and ``analyze``
read it beside the image they are given and keep the human label over the model's; the
viewer loads it again when the image is reopened.

Cells are matched to annotations by position, not by label number: segmenting the same image
again gives the same cells, but label numbers may change when cells are added or deleted.

A folder of single-cell images keeps a person's calls in one table instead,
``<folder>/cell_labels.csv`` (``file``, ``label``): written atomically as well, read by
``classify`` and *Classify cell images*, and itself a labelled dataset that ``train``,
``adapt`` and ``calibrate`` take as it is.
"""

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from napari_cytodiffusion.core.classes import class_key

SUFFIX = ".annotations.json"
FOLDER_LABELS = "cell_labels.csv"
FORMAT = "napari-cytodiffusion annotations"
ARTEFACT, UNKNOWN, DELETED = "artefact", "unknown", "deleted"
NOT_CELL_CLASSES = (ARTEFACT, UNKNOWN)  # human labels that are not a white-cell class
MANIFEST = "manifest.csv"
MANIFEST_COLUMNS = (
    "file",
    "label",
    "source_image",
    "cell",
    "centroid_row",
    "centroid_col",
    "rbc_diameter",
)


class AnnotationError(ValueError):
    """An annotation file that cannot be used; the message says which and why."""


@dataclass
class CellAnnotation:
    """One reviewed cell.

    Attributes
    ----------
    centroid : tuple of float
        (row, col) in image pixels.
    label : str
        The person's call: a class, ``artefact``, ``unknown``, or ``deleted`` (not a cell),
        read as :func:`~napari_cytodiffusion.core.classes.class_key` writes it ("IG" is
        ``immature_granulocyte``) wherever annotations are loaded or applied.
    predicted : str
        The model's call when the person reviewed it ("" for a painted cell).
    added : bool
        Painted by the person (a cell the segmentation missed).
    mask : dict or None
        For a painted cell: ``{"bbox": [r0, c0, r1, c1], "runs": [...]}``, the run lengths of
        the mask in its box, row by row, starting with a run of background. For a deleted
        segmented cell, its outline the same way where it was kept (deleted since
        2026-12-07): a restore draws it again; the deletion itself applies at the centroid.
    """

    centroid: tuple
    label: str
    predicted: str = ""
    added: bool = False
    mask: dict | None = None


@dataclass
class Annotations:
    """The reviewed cells of one image."""

    image: str
    shape: tuple
    cells: list = field(default_factory=list)


def sidecar_path(image_path):
    """Where the annotations of ``image_path`` are kept."""
    image_path = Path(image_path)
    return image_path.with_name(image_path.name + SUFFIX)


def save_annotations(annotations, image_path):
    """Write ``annotations`` beside ``image_path`` atomically; returns the sidecar's path."""
    from napari_cytodiffusion.core.io import atomic_write

    path = sidecar_path(image_path)
    contents = {"format": FORMAT, "version": 1, **asdict(annotations)}
    with atomic_write(path) as partial:
        Path(partial).write_text(json.dumps(contents, indent=1))
    return path


def folder_labels_path(folder):
    """Where a person's calls of the single-cell images of ``folder`` are kept."""
    return Path(folder) / FOLDER_LABELS


def load_folder_labels(folder):
    """{file name: the person's class} for the single-cell images of ``folder`` ({} if none),
    the classes written as :func:`~napari_cytodiffusion.core.classes.class_key` writes them.

    Raises
    ------
    AnnotationError
        If the table exists but cannot be read or lacks its ``file`` / ``label`` columns.
    """
    from napari_cytodiffusion.core.io import read_table

    path = folder_labels_path(folder)
    if not path.is_file():
        return {}
    try:
        rows = read_table(path, ("file", "label"))
    except ValueError as error:
        raise AnnotationError(f"{error} Move it aside to classify without it.") from error
    # Written as class names are ("Lymphocyte", "smudge cell"), so a table typed by hand
    # matches the model's classes.
    calls = {(row["file"] or "").strip(): class_key(row["label"] or "") for row in rows}
    return {name: label for name, label in calls.items() if name and label}


def save_folder_labels(folder, labels):
    """Write ``labels`` ({file name: class}) as the folder's ``cell_labels.csv``, atomically
    (a crash mid-write leaves the previous table intact); returns its path."""
    import csv

    from napari_cytodiffusion.core.io import atomic_write

    path = folder_labels_path(folder)
    with atomic_write(path) as partial, open(partial, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(("file", "label"))
        writer.writerows(sorted(labels.items()))
    return path


def load_annotations(image_path):
    """The annotations kept beside ``image_path``, or None when there are none.

    Raises
    ------
    AnnotationError
        If the sidecar exists but is damaged or not an annotation file.
    """
    path = sidecar_path(image_path)
    if not path.is_file():
        return None
    try:
        contents = json.loads(path.read_text())
        if contents.get("format") != FORMAT:
            raise ValueError("not an annotation file")
        cells = [
            CellAnnotation(
                centroid=tuple(float(v) for v in item["centroid"]),
                label=class_key(item["label"]),
                predicted=str(item.get("predicted", "")),
                added=bool(item.get("added", False)),
                mask=item.get("mask"),
            )
            for item in contents["cells"]
        ]
        return Annotations(str(contents["image"]), tuple(contents["shape"]), cells)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise AnnotationError(
            f"{path} cannot be read as annotations ({error}); move it away to start afresh "
            "(the image itself is untouched)."
        ) from error


def encode_mask(mask):
    """A boolean cell mask as ``{"bbox", "runs"}`` (see :class:`CellAnnotation`)."""
    rows, cols = np.nonzero(mask)
    r0, c0, r1, c1 = rows.min(), cols.min(), rows.max() + 1, cols.max() + 1
    flat = np.asarray(mask[r0:r1, c0:c1], bool).ravel()
    edges = np.flatnonzero(np.diff(np.r_[False, flat, False].astype(np.int8)))
    runs = np.diff(np.r_[0, edges, flat.size]).tolist()
    return {"bbox": [int(r0), int(c0), int(r1), int(c1)], "runs": [int(n) for n in runs]}


def decode_mask(encoded, shape):
    """The boolean mask of :func:`encode_mask` in an image of ``shape``."""
    r0, c0, r1, c1 = encoded["bbox"]
    flat = np.zeros((r1 - r0) * (c1 - c0), bool)
    position, value = 0, False
    for run in encoded["runs"]:
        flat[position : position + run] = value
        position, value = position + run, not value
    mask = np.zeros(shape, bool)
    mask[r0:r1, c0:c1] = flat.reshape(r1 - r0, c1 - c0)
    return mask


def annotate_labels(labels, annotations):
    """Apply ``annotations`` to instance ``labels`` of the same image.

    Deleted cells are removed and painted cells added (with new label values, in a wider
    integer type where ``labels``' own cannot hold them).

    Returns
    -------
    labels : ndarray
        A new label image.
    human : dict
        {label value: the person's label} of every annotated cell left in ``labels``.
    added : set
        The label values of painted cells.
    """
    _check_shape(np.shape(labels), annotations)
    painted = sum(1 for cell in annotations.cells if cell.added and cell.mask is not None)
    labels = _widened(labels, painted)
    human, added = {}, set()
    new_value = int(labels.max()) + 1  # painted cells never reuse a deleted cell's value
    for cell in annotations.cells:
        label = class_key(cell.label)
        if cell.added and cell.mask is not None:
            value, new_value = new_value, new_value + 1
            labels[decode_mask(cell.mask, labels.shape) & (labels == 0)] = value
            added.add(value)
        else:
            value = _label_at(labels, cell.centroid)
            if value and label == DELETED:
                labels[labels == value] = 0
                continue
        if value and label != DELETED:
            human[value] = label
    return labels, human, added


def _widened(labels, count):
    """A copy of ``labels`` in a type that holds ``count`` new values above its largest
    (uint16 labels already at 65,535 become uint32)."""
    labels = np.asarray(labels)
    last = int(labels.max()) + count
    return labels.astype(np.promote_types(labels.dtype, np.min_scalar_type(last)))


def match_centres(centres, annotations, radius, shape=None):
    """For cells at ``centres`` (n, 2), the nearest annotation within ``radius`` pixels.

    For results without label images (the tiles of ``analyze``). Painted cells are not
    matched: they are cells of their own (see :func:`painted_cells`).

    Parameters
    ----------
    shape : tuple, optional
        The image's (rows, cols): annotations made on an image of another shape are refused
        (:class:`AnnotationError`), as :func:`annotate_labels` refuses them.

    Returns
    -------
    list of str or None
        The person's label of each cell (``deleted`` included, written as
        :func:`~napari_cytodiffusion.core.classes.class_key` writes it), or None.
    """
    _check_shape(shape, annotations)
    kept = [cell for cell in annotations.cells if not cell.added]
    if not kept or not len(centres):
        return [None] * len(centres)
    points = np.array([cell.centroid for cell in kept], float)
    distance = np.linalg.norm(np.asarray(centres, float)[:, None] - points[None], axis=2)
    nearest = distance.argmin(axis=1)
    return [
        class_key(kept[j].label) if distance[i, j] <= radius else None
        for i, j in enumerate(nearest)
    ]


def painted_cells(annotations, shape):
    """The cells a person painted on an image of ``shape`` (each with its mask), for results
    without label images (the tiles of ``analyze``), which add them as
    :func:`annotate_labels` does.

    Raises
    ------
    AnnotationError
        If the annotations were made on an image of another shape.
    """
    _check_shape(shape, annotations)
    return [cell for cell in annotations.cells if cell.added and cell.mask is not None]


def _label_at(labels, centroid):
    """The label value at ``centroid``, or the commonest one within 3 px of it (0 if none)."""
    r, c = (int(round(v)) for v in centroid)
    if not (0 <= r < labels.shape[0] and 0 <= c < labels.shape[1]):
        return 0
    if labels[r, c]:
        return int(labels[r, c])
    window = labels[max(r - 3, 0) : r + 4, max(c - 3, 0) : c + 4]
    values, counts = np.unique(window[window > 0], return_counts=True)  # any integer dtype
    return int(values[counts.argmax()]) if values.size else 0


def _check_shape(shape, annotations):
    if shape is not None and tuple(shape) != tuple(annotations.shape[:2]):
        raise AnnotationError(
            f"The annotations of {annotations.image} were made on an image of shape "
            f"{tuple(annotations.shape[:2])}, not {tuple(shape)}; they belong to another image."
        )


def annotations_from_table(table, labels, image_name, outlines=None):
    """Annotations from a classes layer: its features ``table`` (columns ``index``, ``label``
    or ``predicted``, ``annotated``, ``added``) and its ``labels``; rows with an empty
    ``annotated`` are not reviewed and are left out. Deleted cells keep their row with
    ``annotated`` = ``deleted`` and their centroid, and a deleted segmented cell its outline
    from ``outlines`` ({cell: :func:`encode_mask` of its pixels}, taken before they were
    cleared) where it is there. Empty cells of a table read back from a file (NaN) are empty
    text, or False in ``added``."""
    outlines = outlines or {}
    cells = []
    for row in table.itertuples(index=False):
        human = class_key(_text(getattr(row, "annotated", "")))
        if not human:
            continue
        added = _flag(getattr(row, "added", False))
        mask = None
        if human == DELETED:
            # A painted cell's deletion keeps no mask: an added entry with one is painted.
            mask = None if added else outlines.get(int(row.index))
        elif added:
            pixels = labels == int(row.index)
            if not pixels.any():
                continue
            mask = encode_mask(pixels)
        cells.append(
            CellAnnotation(
                centroid=(float(row.centroid_row), float(row.centroid_col)),
                label=human,
                predicted="" if added else _text(getattr(row, "predicted", row.label)),
                added=added,
                mask=mask,
            )
        )
    return Annotations(image_name, tuple(int(v) for v in labels.shape[:2]), cells)


@dataclass
class LayerReview:
    """What one classes layer holds of its image's sidecar, carried from save to save (see
    :func:`merge_annotations`).

    Attributes
    ----------
    others : list of (CellAnnotation, int)
        The sidecar's entries that are not the layer's own, each with the layer cell it lies
        on (0: none), found before the layer's cells were changed; a deletion lies on the
        cell a person restored it as (:func:`restore_deletions`).
    written : list of CellAnnotation
        The layer's own entries at its last save.
    held : list of CellAnnotation
        Entries of ``others`` left out of the last save: they lie on a cell the layer has
        reviewed, or restored, since.
    outlines : dict
        {cell: :func:`encode_mask` of its pixels} of the layer's cells deleted in this
        session (their pixels are gone from the layer): saved with their deletion, so that a
        later session can restore them as they were.
    """

    others: list = field(default_factory=list)
    written: list = field(default_factory=list)
    held: list = field(default_factory=list)
    outlines: dict = field(default_factory=dict)


def begin_review(stored, table, labels):
    """The :class:`LayerReview` of a classes layer (``table``, ``labels``, as
    :func:`annotations_from_table` takes them) of an image whose sidecar holds ``stored``
    (None: nothing yet). Take it before the layer's first change: a cell deleted since is no
    longer in ``labels`` to find its entries on.

    Raises
    ------
    AnnotationError
        If ``stored`` was made on an image of another shape.
    """
    return LayerReview(others=_entries_under(stored, [], table, labels))


def merge_annotations(stored, table, labels, image_name, review):
    """The annotations to save for a classes layer's review: the layer's own rows (see
    :func:`annotations_from_table`) and every entry of the sidecar (``stored``) the layer
    does not stand for, so that saving one layer loses nothing a person did elsewhere.

    The layer stands for the entries it wrote itself and for those on a cell it has reviewed
    (deleted included). Every other entry is kept: cells deleted in an earlier session (the
    layer, classified with them applied, lacks them), cells painted or reviewed that the layer
    does not show (a single-cell classification shows only its central cell, none of the
    smear's deletions or painted cells), and entries another layer of the image wrote. An
    entry on a cell the layer has reviewed comes back when that review is undone. A deleted
    cell's entry is on no cell (the cell is gone; a cell there now is another one) until a
    person restores it (:func:`restore_deletions`): the layer then stands for it while it has
    the restored cell, reviewed or not, and it comes back when the restore is undone. A painted
    cell's is on the painted cell of the layer that covers most of its mask, any other's on
    the segmented cell at its centroid, as :func:`annotate_labels` applies them.

    Returns
    -------
    annotations : Annotations
    review : LayerReview
        ``review`` (from :func:`begin_review` or the last save) for the next save, once
        these annotations are saved.

    Raises
    ------
    AnnotationError
        If ``stored`` was made on an image of another shape.
    """
    labels = np.asarray(labels)
    stored_cells = stored.cells if stored is not None else []
    # An entry gone from the file though the layer kept it there was removed by someone else.
    others = [
        (cell, on) for cell, on in review.others if cell in stored_cells or cell in review.held
    ]
    known = review.written + [cell for cell, _ in others]
    others += _entries_under(stored, known, table, labels)
    own = annotations_from_table(table, labels, image_name, review.outlines).cells
    annotated = _column(table, "annotated", lambda value: class_key(_text(value)))
    reviewed = set(table.loc[annotated != "", "index"].astype(int))
    segmented = _segmented_cells(table)
    stands = [_stands_for(cell, on, reviewed, segmented) for cell, on in others]
    kept = [cell for (cell, _), out in zip(others, stands, strict=True) if not out]
    held = [cell for (cell, _), out in zip(others, stands, strict=True) if out]
    # Deletions and calls before painted cells, as a layer's own rows are: a cell painted
    # over a deleted one is then added whole (annotate_labels paints only empty pixels).
    cells = sorted(kept + own, key=_painted)
    shape = tuple(int(v) for v in labels.shape[:2])
    return Annotations(image_name, shape, cells), LayerReview(others, own, held, review.outlines)


def save_review(image_path, table, labels, review):
    """Save a classes layer's review of ``image_path`` beside it, merged with what its
    sidecar holds (:func:`merge_annotations`), atomically.

    Returns
    -------
    path : Path
        The sidecar's.
    review : LayerReview
        The review to merge the next save with.

    Raises
    ------
    AnnotationError
        If the sidecar is damaged or of another image: it is left as it is.
    """
    stored = load_annotations(image_path)
    merged, review = merge_annotations(stored, table, labels, Path(image_path).name, review)
    return save_annotations(merged, image_path), review


def restorable_deletions(review, table):
    """The deletions a classes layer does not show that a person may restore: entries of its
    sidecar (``review.others``) deleting a segmented cell (cells deleted in an earlier
    session, or by another layer of the image), less those restored as a cell the layer
    has (``table``'s ``index``, ``added``). A painted cell deleted is painted again instead."""
    segmented = _segmented_cells(table)
    return [
        cell
        for cell, on in review.others
        if _deleted(cell) and not cell.added and on not in segmented
    ]


def restore_deletions(review, deletions, cell):
    """``review`` with ``deletions`` (of :func:`restorable_deletions`) restored as the
    layer's segmented ``cell``: saves leave them out while the layer has that cell (so the
    cell stays in ``classify`` and ``analyze``), and keep them again once it is gone (a
    restore that added the cell, undone). ``cell`` is the layer's own deleted cell brought
    back, or a new value: none of the layer's cells, nor one an earlier restore used
    (:func:`restored_values`)."""
    others = [(entry, cell if entry in deletions else on) for entry, on in review.others]
    return replace(review, others=others)


def restored_values(review):
    """The cell values deletions were restored as (taken, even where the restore was
    undone since)."""
    return {on for entry, on in review.others if _deleted(entry) and on}


def earlier_call(review, cell):
    """The person's call of the layer's ``cell`` in the sidecar, "" where none: what a cell
    reviewed in an earlier session and deleted in this one comes back as."""
    calls = [entry.label for entry, on in review.others if on == cell and not _deleted(entry)]
    return class_key(calls[0]) if calls else ""


def _stands_for(entry, on, reviewed, segmented):
    """Whether a save leaves out ``entry``, which lies on the layer cell ``on`` (see
    :func:`merge_annotations`): a deletion while the cell restored from it is there, any
    other entry while that cell is reviewed."""
    return on in (segmented if _deleted(entry) else reviewed)


def _segmented_cells(table):
    """The values of a classes layer's cells that a segmentation found (not painted)."""
    added = _column(table, "added", _flag).astype(bool)
    return set(table.loc[~added, "index"].astype(int))


def _deleted(entry):
    return class_key(entry.label) == DELETED


def _entries_under(stored, known, table, labels):
    """(entry, the layer cell it lies on) for the entries of ``stored`` not in ``known``."""
    if stored is None:
        return []
    labels = np.asarray(labels)
    _check_shape(labels.shape[:2], stored)
    added = _column(table, "added", _flag).astype(bool)
    index = table["index"].astype(int)
    painted, segmented = set(index[added]), set(index[~added])
    return [
        (cell, _cell_under(cell, labels, painted, segmented))
        for cell in stored.cells
        if cell not in known
    ]


def _cell_under(cell, labels, painted, segmented):
    """The layer cell an entry lies on (0: none); see :func:`merge_annotations`."""
    if _deleted(cell):
        return 0
    if _painted(cell):
        values = labels[decode_mask(cell.mask, labels.shape[:2])]
        values = values[np.isin(values, list(painted))]
        found, counts = np.unique(values, return_counts=True)
        return int(found[counts.argmax()]) if found.size else 0
    value = _label_at(labels, cell.centroid)
    return value if value in segmented else 0


def _painted(cell):
    return bool(cell.added and cell.mask is not None)


def _column(table, name, read):
    """A column of a classes layer's table read with ``read`` (empty where it is missing)."""
    import pandas as pd

    if name not in table:
        return pd.Series(read(None), index=table.index)
    return table[name].map(read)


def _text(value):
    """A table cell as text: "" where empty (None, or the NaN pandas reads an empty cell as)."""
    import pandas as pd

    return "" if pd.isna(value) else str(value)


def _flag(value):
    """A table cell as a flag: False where empty (None or NaN)."""
    import pandas as pd

    return False if pd.isna(value) else bool(value)


def export_cells(
    image, labels, table, out, size, image_name="image", rbc_diameter=None, progress=None
):
    """Write the annotated cells as a class-folder dataset (the layout ``train`` and
    ``adapt`` read), normalised in colour and scale as the classifier sees them.

    Each crop is ``2 * size`` pixels wide and shows ``2 * FIELD_OF_VIEW_RBC`` red-cell
    diameters, so a red cell is ``size / FIELD_OF_VIEW_RBC`` pixels across in every crop and
    training can rotate cells without running out of image; ``manifest.csv`` records that
    scale (which packing uses instead of estimating it) and where each crop came from.

    Parameters
    ----------
    image : array-like
        The smear.
    labels : ndarray
        Its instance labels.
    table : DataFrame
        ``index``, ``annotated``, ``centroid_row``, ``centroid_col`` per cell; rows with an
        empty ``annotated`` and deleted cells are left out.
    out : path
        The dataset folder: ``out/<class>/<image stem>_<cell>.png`` and ``out/manifest.csv``
        (other smears' rows kept). The smear's own earlier rows are replaced, and the crops
        they list removed unless written again, so a cell relabelled or deleted since its last
        export keeps no crop under its old class. Where the crops of another smear with the
        same stem are there already, the stem gets a short hash of ``image_name``:
        ``<image stem>-<hash>_<cell>.png``.
    size : int
        The model's ``image_size``.
    image_name : str
        The smear's file path (its name where it has no file), recorded as ``source_image``.
    progress : callable, optional
        ``progress(done, total)`` per cell cropped; raising ``Cancelled`` from it stops before
        anything is written.

    Returns
    -------
    dict
        {class: crops written}.
    """
    from PIL import Image

    from napari_cytodiffusion.core.io import atomic_write, read_table
    from napari_cytodiffusion.core.smear.crops import FIELD_OF_VIEW_RBC

    # Every crop is cut before the first is written: a cancel leaves the dataset as it was.
    crops = _cut_crops(image, labels, table, size, rbc_diameter, progress)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / MANIFEST
    earlier = read_table(manifest, MANIFEST_COLUMNS) if manifest.is_file() else []
    stem = _crop_stem(str(image_name), earlier)
    written, rows = {}, {}
    for row, centre, crop in crops:
        name = f"{row.annotated}/{stem}_{int(row.index)}.png"
        (out / str(row.annotated)).mkdir(exist_ok=True)
        with atomic_write(out / name) as partial:
            Image.fromarray(crop).save(partial)
        written[str(row.annotated)] = written.get(str(row.annotated), 0) + 1
        rows[name] = [
            name,
            str(row.annotated),
            str(image_name),
            str(int(row.index)),
            f"{centre[0]:.1f}",
            f"{centre[1]:.1f}",
            f"{size / FIELD_OF_VIEW_RBC:.3f}",
        ]
    for row in earlier:
        if row["file"] in rows:
            continue
        if _of_smear(row, str(image_name), stem):
            # Removed before the manifest no longer lists it: a crash in between leaves a
            # row without a file (harmless), never a crop under a class the cell lost.
            _remove_crop(out, row["file"])
        else:
            rows[row["file"]] = [row[c] for c in MANIFEST_COLUMNS]
    _write_manifest(manifest, rows)
    return written


def _of_smear(row, source, stem):
    """Whether an earlier manifest ``row`` is a crop of the smear ``source`` exported under
    ``stem``: recorded with its path, or (exports before 2026-12-07) its name and stem, as
    :func:`_crop_stem` takes them."""
    if row["source_image"] == source:
        return True
    return row["source_image"] == Path(source).name and _stem_of(row["file"]) == stem


def _remove_crop(out, crop_file):
    """Delete the crop ``crop_file`` listed in ``out``'s manifest (nothing outside ``out``),
    and its class folder if that leaves it empty: an empty folder would still name a class
    (a new class to adapt to, with no cell)."""
    path = (out / crop_file).resolve()
    if not (path.is_relative_to(out.resolve()) and path.is_file()):
        return
    path.unlink()
    if path.parent != out.resolve() and not any(path.parent.iterdir()):
        path.parent.rmdir()


def _cut_crops(image, labels, table, size, rbc_diameter, progress):
    """(table row, centre, uint8 crop) of each reviewed cell still in ``labels``."""
    from napari_cytodiffusion.core.progress import report
    from napari_cytodiffusion.core.smear.crops import FIELD_OF_VIEW_RBC, smear_cell_site
    from napari_cytodiffusion.core.smear.prepare import prepare_smear

    annotated = table["annotated"].fillna("").astype(str)
    present = set(np.unique(labels).tolist())
    reviewed = [
        row
        for row in table[~annotated.isin(["", DELETED])].itertuples(index=False)
        if int(row.index) in present
    ]
    smear = prepare_smear(image, rbc_diameter)
    crops = []
    for done, row in enumerate(reviewed, start=1):
        centre = (float(row.centroid_row), float(row.centroid_col))
        # The site classify crops the cell at (stain normalisation included), twice as wide.
        site = smear_cell_site(smear, centre, 2 * FIELD_OF_VIEW_RBC)
        crops.append((row, centre, (site.crop(smear.rgb, 2 * size) * 255 + 0.5).astype(np.uint8)))
        report(progress, done, len(reviewed))
    return crops


def _crop_stem(source, earlier):
    """The file-name stem of the crops of the smear ``source``, given the ``earlier``
    manifest rows: the smear's own stem, unless crops of another smear hold it already (two
    smears named ``a.jpg`` in different folders); then the stem and a short hash of
    ``source``, the same at every export, so a smear exported again replaces its crops."""
    import hashlib

    stem = Path(source).stem
    owners = {row["source_image"] for row in earlier if _stem_of(row["file"]) == stem}
    # Exports before 2026-12-07 recorded the smear's file name alone: taken as this smear's.
    if not owners or source in owners or Path(source).name in owners:
        return stem
    return f"{stem}-{hashlib.sha256(source.encode()).hexdigest()[:8]}"


def _stem_of(crop_file):
    """The smear stem of an exported crop's file, ``<class>/<stem>_<cell>.png``."""
    return Path(crop_file).stem.rsplit("_", 1)[0]


def _write_manifest(path, rows):
    """Write the manifest's ``rows`` ({file: values}) sorted by file, atomically."""
    import csv

    from napari_cytodiffusion.core.io import atomic_write

    with atomic_write(path) as partial, open(partial, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(MANIFEST_COLUMNS)
        writer.writerows(rows[name] for name in sorted(rows))
