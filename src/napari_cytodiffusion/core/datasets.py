"""Labelled cell images: listing them, and packing them into normalised crops for training.

A dataset is either a folder of class subfolders (the layout labs keep their cells in), a
CSV with ``file``, ``label`` and ``split`` columns (such as PBC's ``splits.csv``), or a folder
of single-cell images with a person's calls in its ``cell_labels.csv`` (what *Classify cell
images* saves). Packing centres each cell and normalises its scale and colour exactly as the
classifier will, and stores the crops as JPEG bytes in one ``.npz`` (no pickled objects) that
is small enough to move to a GPU machine.
"""

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from napari_cytodiffusion.core.annotations import (
    FOLDER_LABELS,
    NOT_CELL_CLASSES,
    folder_labels_path,
    load_folder_labels,
)
from napari_cytodiffusion.core.classes import CLASSES, class_key
from napari_cytodiffusion.core.io import folder_images

SPLITS = ("train", "val", "test")
# Crops are packed wider than the model's field of view so that rotations stay inside them.
PACK_MARGIN = 1.375
# Changes whenever packing would give other crops for the same images, so caches go stale.
# 3: stain normalisation (core/smear/normalise.py) and unlabelled cells (label -1).
PACK_VERSION = 3
JPEG_QUALITY = 92  # of packed training crops: a third of PNG's size
# The label id of an unlabelled cell in a pack (it trains the null class only).
UNLABELLED = -1
# Two crops (float RGB at the model's resolution) are one cell imaged or exported twice when
# both the whole crop and its central disc, where the cell is, differ by less than these mean
# squares. WBC dataset 1 holds 12 such pairs: they differ by at most 0.0014 (whole) and 0.0008
# (centre); of distinct cells, those with alike centres (0.002) differ in their surroundings
# (0.0045), and those with alike surroundings (0.0023) in their centres (0.0046).
COPY_MSE = 0.002
COPY_CENTRE_MSE = 0.0012
_COPY_BLOCK = 1024  # crops compared with all others at a time (memory: block x n)


@dataclass(frozen=True)
class Record:
    """One labelled image; ``rbc_diameter`` is its known red-cell scale (from the manifest
    of exported cells), None when it is to be estimated.

    ``centre`` (row, col) names one cell of a smear field instead of the image's central
    cell; ``label`` "" is an unlabelled cell (packed with label id ``UNLABELLED``: it trains
    the null class only); ``source`` names the data set it came from."""

    path: Path
    label: str
    split: str
    rbc_diameter: float | None = None
    centre: tuple | None = None
    source: str = ""


@dataclass
class PackedCells:
    """The crops of a packed dataset, decoded.

    Attributes
    ----------
    images : ndarray uint8 (n, s, s, 3)
        Crops ``PACK_MARGIN`` times wider than the model's input.
    labels : ndarray int (n,)
        Index of each crop's class in ``classes``; ``UNLABELLED`` (-1) for a cell without a
        label (it trains the null class).
    splits : ndarray of str (n,)
    image_size : int
        The model input size the crops were packed for.
    classes : tuple of str
    """

    images: np.ndarray
    labels: np.ndarray
    splits: np.ndarray
    image_size: int
    classes: tuple


def voc_boxes(path):
    """``{object name: [[min_row, min_col, max_row, max_col], ...]}`` of a Pascal VOC
    annotation file, in (float) pixels."""
    import xml.etree.ElementTree as ElementTree

    boxes = {}
    for item in ElementTree.parse(path).getroot().iter("object"):
        box = item.find("bndbox")
        values = [float(box.find(k).text) for k in ("ymin", "xmin", "ymax", "xmax")]
        boxes.setdefault(item.find("name").text, []).append(values)
    return boxes


def yolo_boxes(path, shape):
    """``[[min_row, min_col, max_row, max_col], ...]`` of a YOLO label file (one
    ``class x y width height`` line per box, fractions of the image) for an image of
    ``shape``, in (float) pixels."""
    rows, cols = shape[:2]
    boxes = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            _, x, y, w, h = map(float, line.split())
            boxes.append(
                [(y - h / 2) * rows, (x - w / 2) * cols, (y + h / 2) * rows, (x + w / 2) * cols]
            )
    return boxes


def list_labelled_images(data, val_fraction=0.1, classes=CLASSES):
    """List the labelled images of a class-folder tree, a splits CSV, or a folder of images
    with its ``cell_labels.csv`` (used where the folder has no class subfolders).

    In a folder without split information, a fixed ``val_fraction`` of each class (chosen
    by a hash of the file name, so it never changes between runs) is held out as ``val``.
    Folders and labels that are not one of ``classes`` are skipped (see :func:`unknown_classes`).

    Raises
    ------
    ValueError
        If ``data`` is neither, or holds no images of a known class.
    """
    data = Path(data)
    if data.is_file() and data.suffix.lower() == ".csv":
        records = _records_from_csv(data, classes)
    elif data.is_dir():
        records = _records_from_folders(data, val_fraction, classes)
        if not records and folder_labels_path(data).is_file():
            records = _records_from_folder_labels(data, val_fraction, classes)
    else:
        raise ValueError(f"{data} is neither a folder of class subfolders nor a CSV file.")
    if not records:
        raise ValueError(
            f"No labelled images found in {data}. Expected subfolders named after the classes "
            f"({', '.join(classes)}), a CSV with file, label and split columns, or a folder "
            f"of images with its {FOLDER_LABELS} (Classify cell images saves it)."
        )
    return records


def copy_groups(crops):
    """A group id per crop; crops of one cell imaged or exported twice share one.

    A cell labelled twice must not be learned from and then tested on, nor carry two labels
    unnoticed. Copies are told by their crops (centred, scale- and colour-normalised),
    not by their files, so a re-saved or re-cropped image is found too.

    Parameters
    ----------
    crops : ndarray (n, s, s, 3)
        Normalised crops, float in [0, 1].

    Returns
    -------
    ndarray int (n,)

    Examples
    --------
    >>> import numpy as np
    >>> cells = np.random.default_rng(0).random((3, 8, 8, 3))
    >>> copy_groups(np.stack([cells[0], cells[1], cells[0]])).tolist()
    [0, 1, 0]
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    crops = np.asarray(crops, np.float32)
    n, size = len(crops), crops.shape[1]
    if n == 0:
        return np.zeros(0, int)
    rows, cols = np.mgrid[:size, :size]
    centre = np.hypot(rows - (size - 1) / 2, cols - (size - 1) / 2) < size / 4
    whole, centres = crops.reshape(n, -1), crops[:, centre].reshape(n, -1)
    pairs = []
    for start in range(0, n, _COPY_BLOCK):
        block = slice(start, start + _COPY_BLOCK)
        close = _mean_square_distances(whole[block], whole) < COPY_MSE
        close &= _mean_square_distances(centres[block], centres) < COPY_CENTRE_MSE
        found = np.nonzero(close)
        pairs.append((found[0] + start, found[1]))
    first, second = (np.concatenate(side) for side in zip(*pairs, strict=True))
    adjacency = coo_matrix((np.ones(len(first)), (first, second)), shape=(n, n))
    return connected_components(adjacency, directed=False)[1]


def has_a_copy(groups):
    """Whether each cell shares its ``copy_groups`` group with another."""
    groups = np.asarray(groups)
    return np.bincount(groups, minlength=1)[groups] > 1


def disagreeing_copies(labels, groups):
    """Whether each cell has a copy (the same ``copy_groups`` group) with another label."""
    _, codes = np.unique(np.asarray(labels), return_inverse=True)
    kinds = np.unique(np.stack([groups, codes.ravel()]), axis=1)[0]
    return np.bincount(kinds, minlength=int(np.max(groups, initial=-1)) + 1)[groups] > 1


def pick_whole_copies(ids, groups, wanted, rng):
    """Up to ``wanted`` of the cells ``ids``, drawn in random order a cell's copies at a time
    (a cell whose copies would overshoot is passed over), so no copy is left on the other
    side of a split."""
    picked = []
    for group in rng.permutation(np.unique(groups[ids])):
        copies = ids[groups[ids] == group]
        if len(picked) + len(copies) <= wanted:
            picked += copies.tolist()
    return picked


def _mean_square_distances(some, every):
    """(len(some), len(every)) mean squared differences between rows."""
    squares = np.sum(every**2, axis=1)
    own = np.sum(some**2, axis=1)
    return (own[:, None] + squares[None] - 2 * some @ every.T) / every.shape[1]


def unknown_classes(data, classes=CLASSES):
    """Names under which ``data`` holds cells of no class in ``classes`` (so left out): its
    subfolders, or the labels of its CSV or its ``cell_labels.csv``, as
    :func:`list_labelled_images` reads them. Artefacts and unknown cells are not named.

    Examples
    --------
    >>> import tempfile
    >>> root = Path(tempfile.mkdtemp())
    >>> for name in ("lymphocyte", "Blast"):
    ...     (root / name).mkdir()
    >>> unknown_classes(root)
    ['Blast']
    """
    data = Path(data)
    if data.is_file() and data.suffix.lower() == ".csv":
        from napari_cytodiffusion.core.io import read_table

        rows = read_table(data, ("file", "label"))
        names = [row["label"] or "" for row in rows if _split(row) in SPLITS]
    elif data.is_dir():
        names = [folder.name for folder in data.iterdir() if folder.is_dir()]
        if not any(_is_class(name, classes) for name in names):
            names += load_folder_labels(data).values()
    else:
        return []
    names = {name.strip() for name in names if name.strip()}
    return sorted(
        n for n in names if n.lower() not in NOT_CELL_CLASSES and not _is_class(n, classes)
    )


def _is_class(name, classes):
    return class_key(name) in classes


def _split(row):
    return (row.get("split") or "train").strip()


def class_counts(records, classes=CLASSES):
    """{class: number of records} in ``classes`` order, for every split together."""
    labels = [record.label for record in records]
    return {name: labels.count(name) for name in classes}


def _records_from_csv(path, classes):
    from napari_cytodiffusion.core.io import read_table

    records = []
    for row in read_table(path, ("file", "label")):
        label, split = row["label"] or "", _split(row)
        if split in SPLITS and _is_class(label, classes):  # not PBC's "exclude"
            records.append(Record(path.parent / row["file"], class_key(label), split))
    return records


def _records_from_folders(root, val_fraction, classes):
    scales = _manifest_scales(root)
    records = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        if not _is_class(folder.name, classes):
            continue
        for file in folder_images(folder):
            scale = scales.get(f"{folder.name}/{file.name}")
            split = _hashed_split(file, val_fraction)
            records.append(Record(file, class_key(folder.name), split, scale))
    return records


def _records_from_folder_labels(folder, val_fraction, classes):
    """The images of ``folder`` a person called one of ``classes`` (``cell_labels.csv``),
    split as class folders are."""
    records = []
    for name, label in sorted(load_folder_labels(folder).items()):
        if _is_class(label, classes):
            file = folder / name
            records.append(Record(file, class_key(label), _hashed_split(file, val_fraction)))
    return records


def _hashed_split(file, val_fraction):
    """``val`` for a fixed share of files (by a hash of the name, so it never changes)."""
    digest = hashlib.sha256(file.name.encode()).digest()
    return "val" if digest[0] / 256 < val_fraction else "train"


def _manifest_scales(root):
    """{"<class>/<file>": red-cell diameter} from the manifest of exported annotated cells."""
    from napari_cytodiffusion.core.annotations import MANIFEST
    from napari_cytodiffusion.core.io import read_table

    manifest = Path(root) / MANIFEST
    if not manifest.is_file():
        return {}
    return {
        row["file"]: float(row["rbc_diameter"])
        for row in read_table(manifest, ("file", "rbc_diameter"))
        if row.get("rbc_diameter")
    }


def pack_cache_path(
    out, records, image_size, rbc_diameter=None, quality=JPEG_QUALITY, classes=CLASSES
):
    """Where the packed crops of ``records`` for the model file ``out`` are cached.

    The name holds a digest of every image's path, class, split, size and modification time
    and of the packing settings (``quality`` and ``classes`` as :func:`pack_cells` takes
    them), so adding, removing or editing an image gives a new name: a cache can never be
    stale.
    """
    settings = f"{PACK_VERSION} {image_size} {rbc_diameter}"
    # The defaults keep the names of existing caches.
    if quality != JPEG_QUALITY:
        settings += f" {quality}"
    if tuple(classes) != CLASSES:
        settings += " " + ",".join(classes)
    digest = hashlib.sha256(settings.encode())
    for record in sorted(records, key=lambda r: str(r.path)):
        try:
            stat = Path(record.path).stat()
            stamp = f"{stat.st_size} {stat.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        digest.update(
            f"\n{record.path} {record.label} {record.split} {record.rbc_diameter} {stamp}".encode()
        )
    out = Path(out)
    return out.with_name(f"{out.stem}.cells-{digest.hexdigest()[:12]}.npz")


def remove_other_packs(pack):
    """Delete the caches of earlier contents beside ``pack`` (same output, other digest)."""
    pack = Path(pack)
    prefix = pack.name.split(".cells-")[0] + ".cells-"
    for other in pack.parent.glob(f"{prefix}*.npz"):
        if other != pack:
            other.unlink(missing_ok=True)


def pack_cells(
    records,
    out_path,
    image_size=64,
    rbc_diameter=None,
    quality=JPEG_QUALITY,
    progress=None,
    classes=CLASSES,
    margin=PACK_MARGIN,
):
    """Normalise every record's cell and save the crops in one ``.npz`` file.

    The file is written under a temporary name and renamed when complete, so an interrupted
    run never leaves a partial pack under the final name.

    Parameters
    ----------
    records : list of Record
    out_path : path
    image_size : int
        The model's input size; crops are stored ``PACK_MARGIN`` times wider.
    rbc_diameter : float, optional
        Red-cell diameter in pixels shared by all images (one scanner); estimated per image
        when not given.
    quality : int or None
        JPEG quality of the stored crops; None stores them losslessly (PNG, about three times
        larger), for a few cells whose fine detail must stay as the classifier sees it.
    progress : callable, optional
        Called with (done, total).
    classes : sequence of str
        The classes the labels index into (the model's classes).
    margin : float
        How much wider than the model's field of view the crops are (room for rotation and
        zoom); a smaller margin makes a smaller pack.

    Raises
    ------
    ValueError
        Naming the image, for an image that cannot be read or used.
    """
    from PIL import Image

    from napari_cytodiffusion.core.io import InputFileError, read_image
    from napari_cytodiffusion.core.smear.crops import (
        FIELD_OF_VIEW_RBC,
        central_cell_site,
        smear_cell_site,
    )
    from napari_cytodiffusion.core.smear.image import ImageError
    from napari_cytodiffusion.core.smear.prepare import prepare_smear

    classes = tuple(classes)
    size = int(round(image_size * margin))
    field_of_view = FIELD_OF_VIEW_RBC * size / image_size
    blobs, offsets = [], [0]
    prepared = (None, None, None)  # (path, scale, smear): the cells of one field share it
    for done, record in enumerate(records, 1):
        scale = record.rbc_diameter or rbc_diameter
        try:
            if prepared[:2] != (record.path, scale):
                prepared = (record.path, scale, prepare_smear(read_image(record.path), scale))
            smear = prepared[2]
            if record.centre is None:
                site = central_cell_site(smear, field_of_view)
            else:
                site = smear_cell_site(smear, record.centre, field_of_view)
            crop = site.crop(smear.rgb, size)
        except (ImageError, InputFileError) as error:
            raise ValueError(f"{record.path}: {error}") from error
        buffer = io.BytesIO()
        pixels = Image.fromarray((crop * 255 + 0.5).astype(np.uint8))
        if quality is None:
            pixels.save(buffer, "PNG")
        else:
            pixels.save(buffer, "JPEG", quality=quality)
        blobs.append(np.frombuffer(buffer.getvalue(), np.uint8))
        offsets.append(offsets[-1] + len(blobs[-1]))
        if progress is not None:
            progress(done, len(records))
    out_path = Path(out_path)
    partial = out_path.with_name(out_path.name + ".partial")
    with open(partial, "wb") as handle:
        np.savez(
            handle,
            jpeg=np.concatenate(blobs),
            offsets=np.array(offsets, np.int64),
            labels=np.array(
                [classes.index(r.label) if r.label else UNLABELLED for r in records], np.int64
            ),
            splits=np.array([SPLITS.index(r.split) for r in records], np.int64),
            # UTF-8 bytes: numpy's str arrays take 4 bytes a character (7 MiB of the
            # 18,000 paths of a full PBC pack, which travels to a GPU machine).
            files=_utf8([str(r.path) for r in records]),
            sources=_utf8([r.source for r in records]),
            classes=np.array(classes),
            image_size=np.array(image_size),
            version=np.array(PACK_VERSION),
        )
    partial.replace(out_path)


def _utf8(texts):
    return np.array([text.encode("utf-8") for text in texts], dtype=bytes)


def load_pack(path, splits=("train", "val")):
    """Decode the crops of the given splits of a packed dataset.

    Returns
    -------
    PackedCells
    """
    from PIL import Image

    try:
        with np.load(path, allow_pickle=False) as pack:
            jpeg, offsets = pack["jpeg"], pack["offsets"]
            labels, split_ids = pack["labels"], pack["splits"]
            image_size = int(pack["image_size"])
            classes = tuple(str(c) for c in pack["classes"])
    except Exception as error:  # a damaged or foreign file means the same to the user
        raise ValueError(
            f"{path} is not a dataset packed by napari-cytodiffusion ({error}); give the "
            "folder of labelled cells instead."
        ) from error
    keep = np.flatnonzero(np.isin(split_ids, [SPLITS.index(s) for s in splits]))
    images = np.stack(
        [
            np.asarray(Image.open(io.BytesIO(jpeg[offsets[i] : offsets[i + 1]].tobytes())))
            for i in keep
        ]
    )
    names = np.array(SPLITS)[split_ids[keep]]
    return PackedCells(images, labels[keep], names, image_size, classes)
