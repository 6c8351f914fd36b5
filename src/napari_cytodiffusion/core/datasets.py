"""Labelled cell images: listing them, and packing them into normalised crops for training.

A dataset is either a folder of class subfolders (the layout labs keep their cells in) or a
CSV with ``file``, ``label`` and ``split`` columns (such as PBC's ``splits.csv``). Packing
centres each cell and normalises its scale and colour exactly as the classifier will, and
stores the crops as JPEG bytes in one ``.npz`` (no pickled objects) that is small enough to
move to a GPU machine.
"""

import csv
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from napari_cytodiffusion.core.classes import CLASSES, canonical_class

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
SPLITS = ("train", "val", "test")
# Crops are packed wider than the model's field of view so that rotations stay inside them.
PACK_MARGIN = 1.375


@dataclass(frozen=True)
class Record:
    path: Path
    label: str
    split: str


def list_labelled_images(data, val_fraction=0.1):
    """List the labelled images of a class-folder tree or a splits CSV.

    In a folder tree without split information, a fixed ``val_fraction`` of each class (chosen
    by a hash of the file name, so it never changes between runs) is held out as ``val``.

    Raises
    ------
    ValueError
        If ``data`` is neither, or holds no images of a known class.
    """
    data = Path(data)
    if data.is_file() and data.suffix.lower() == ".csv":
        records = _records_from_csv(data)
    elif data.is_dir():
        records = _records_from_folders(data, val_fraction)
    else:
        raise ValueError(f"{data} is neither a folder of class subfolders nor a CSV file.")
    if not records:
        raise ValueError(
            f"No labelled images found in {data}. Expected subfolders named after the classes "
            f"({', '.join(CLASSES)}) or a CSV with file, label and split columns."
        )
    return records


def _records_from_csv(path):
    records = []
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"file", "label"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path} lacks the column(s) {sorted(missing)}.")
        for row in reader:
            split = (row.get("split") or "train").strip()
            if split not in SPLITS:
                continue  # e.g. PBC's "exclude"
            records.append(Record(path.parent / row["file"], canonical_class(row["label"]), split))
    return records


def _records_from_folders(root, val_fraction):
    records = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        try:
            label = canonical_class(folder.name)
        except ValueError:
            continue
        for file in sorted(folder.iterdir()):
            if file.suffix.lower() in IMAGE_SUFFIXES:
                digest = hashlib.sha256(file.name.encode()).digest()
                split = "val" if digest[0] / 256 < val_fraction else "train"
                records.append(Record(file, label, split))
    return records


def normalised_cell(image, size, rbc_diameter=None, field_of_view=None):
    """Centre the cell of a single-cell image and normalise its scale and colour.

    Returns a float (size, size, 3) crop; see :mod:`napari_cytodiffusion.core.crops`.
    """
    from napari_cytodiffusion.core.crops import FIELD_OF_VIEW_RBC, crop_cell, locate_central_cell
    from napari_cytodiffusion.core.image import to_rgb_float
    from napari_cytodiffusion.core.scale import background_colour, estimate_rbc_diameter

    rgb = to_rgb_float(image)
    if rbc_diameter is None:
        rbc_diameter = estimate_rbc_diameter(rgb)
    background = background_colour(rgb)
    centre = locate_central_cell(rgb, rbc_diameter, background)
    return crop_cell(
        rgb,
        centre,
        rbc_diameter,
        size=size,
        field_of_view=field_of_view or FIELD_OF_VIEW_RBC,
        background=background,
    )


def pack_cells(records, out_path, image_size=64, rbc_diameter=None, quality=92, progress=None):
    """Normalise every record's cell and save the crops in one ``.npz`` file.

    Parameters
    ----------
    records : list of Record
    out_path : path
    image_size : int
        The model's input size; crops are stored ``PACK_MARGIN`` times wider.
    rbc_diameter : float, optional
        Red-cell diameter in pixels shared by all images (one scanner); estimated per image
        when not given.
    progress : callable, optional
        Called with (done, total).
    """
    from PIL import Image

    from napari_cytodiffusion.core.crops import FIELD_OF_VIEW_RBC
    from napari_cytodiffusion.core.io import read_image

    size = int(round(image_size * PACK_MARGIN))
    blobs, offsets = [], [0]
    for done, record in enumerate(records, 1):
        crop = normalised_cell(
            read_image(record.path), size, rbc_diameter, FIELD_OF_VIEW_RBC * PACK_MARGIN
        )
        buffer = io.BytesIO()
        Image.fromarray((crop * 255 + 0.5).astype(np.uint8)).save(buffer, "JPEG", quality=quality)
        blobs.append(np.frombuffer(buffer.getvalue(), np.uint8))
        offsets.append(offsets[-1] + len(blobs[-1]))
        if progress is not None:
            progress(done, len(records))
    np.savez(
        out_path,
        jpeg=np.concatenate(blobs),
        offsets=np.array(offsets, np.int64),
        labels=np.array([CLASSES.index(r.label) for r in records], np.int64),
        splits=np.array([SPLITS.index(r.split) for r in records], np.int64),
        files=np.array([str(r.path) for r in records]),
        classes=np.array(CLASSES),
        image_size=np.array(image_size),
    )


def load_pack(path, splits=("train", "val")):
    """Decode a packed dataset: returns (images uint8 (n, s, s, 3), labels, split names)."""
    from PIL import Image

    with np.load(path, allow_pickle=False) as pack:
        jpeg, offsets = pack["jpeg"], pack["offsets"]
        labels, split_ids = pack["labels"], pack["splits"]
        image_size = int(pack["image_size"])
    keep = np.flatnonzero(np.isin(split_ids, [SPLITS.index(s) for s in splits]))
    images = np.stack(
        [
            np.asarray(Image.open(io.BytesIO(jpeg[offsets[i] : offsets[i + 1]].tobytes())))
            for i in keep
        ]
    )
    names = np.array(SPLITS)[split_ids[keep]]
    return images, labels[keep], names, image_size
