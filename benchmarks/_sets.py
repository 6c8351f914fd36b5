"""The cell sets the issue-9 benchmarks share: stratified PBC subsets, WBC dataset 1 with its
labels, and white cells cut from CBC fields at their annotated boxes."""

import csv

import numpy as np
from _common import DATA, pbc_records

DATASET1 = DATA / "segmentation_wbc_dataset1"
# class_labels.csv codes of WBC dataset 1.
DATASET1_CLASSES = {1: "neutrophil", 2: "lymphocyte", 3: "monocyte", 4: "eosinophil", 5: "basophil"}


def pbc_stratified(split, per_class, seed=0, exclude=()):
    """Up to ``per_class`` records of every class of a PBC split, fixed by ``seed``, none of
    them at a path in ``exclude``."""
    records = [r for r in pbc_records(split) if r.path not in exclude]
    rng = np.random.default_rng(seed)
    chosen = []
    for label in sorted({r.label for r in records}):
        members = [r for r in records if r.label == label]
        picks = rng.choice(len(members), min(per_class, len(members)), replace=False)
        chosen += [members[i] for i in sorted(picks)]
    return chosen


def dataset1_records(limit=None):
    """[(image path, class name)] of WBC dataset 1, in file order; every ``k``-th file when
    ``limit`` is below the 300 images, so that a subset keeps the class mix."""
    with open(DATASET1 / "class_labels.csv") as handle:
        labels = {int(row["image ID"]): int(row["class label"]) for row in csv.DictReader(handle)}
    files = sorted(DATASET1.glob("*_image.png"))
    records = [(f, DATASET1_CLASSES[labels[int(f.name.split("_")[0])]]) for f in files]
    if limit and limit < len(records):
        records = [records[i] for i in np.linspace(0, len(records) - 1, limit).astype(int)]
    return records


def blurred(crops, sigma=1.0):
    """Float crops (n, s, s, 3) blurred by a Gaussian of ``sigma`` px, each channel alone:
    the softer optics of other labs, within a model's own domain."""
    from scipy import ndimage as ndi

    return np.stack([ndi.gaussian_filter(c, (sigma, sigma, 0), mode="reflect") for c in crops])


def central_cell_crops(images, rbc_diameter, size):
    """The central cell of each image, prepared and cut as a user's single-cell image is
    (``prepare_smear``, ``central_cell_site``). Returns (crops (n, size, size, 3), colour
    statistics (n, 9), red-cell diameters (n,))."""
    from napari_cytodiffusion.core.smear.crops import central_cell_site
    from napari_cytodiffusion.core.smear.prepare import prepare_smear

    crops, colours, scales = [], [], []
    for image in images:
        smear = prepare_smear(image, rbc_diameter)
        crops.append(central_cell_site(smear).crop(smear.rgb, size))
        colours.append(smear.colour_map.statistics())
        scales.append(smear.rbc_diameter)
    return np.stack(crops), np.stack(colours), np.array(scales)


def cbc_white_cells(split="train", limit=None, size=64):
    """White-cell crops of CBC fields at their annotated boxes, through the user's path: each
    field prepared by ``prepare_smear`` (its own scale and colour map), each cell cut by
    ``smear_cell_site``. Returns (crops (n, size, size, 3), colour statistics (n, 9))."""
    from napari_cytodiffusion.core.datasets import voc_boxes
    from napari_cytodiffusion.core.io import read_image
    from napari_cytodiffusion.core.smear.crops import smear_cell_site
    from napari_cytodiffusion.core.smear.prepare import prepare_smear

    crops, stats = [], []
    folder = DATA / "cbc" / split
    for xml in sorted((folder / "annotations").glob("*.xml")):
        boxes = voc_boxes(xml).get("WBC", [])
        if not boxes:
            continue
        smear = prepare_smear(read_image(folder / "images" / f"{xml.stem}.jpg"))
        for r0, c0, r1, c1 in boxes:
            centre = ((r0 + r1) / 2, (c0 + c1) / 2)
            crops.append(smear_cell_site(smear, centre).crop(smear.rgb, size))
            stats.append(smear.colour_map.statistics())
        if limit and len(crops) >= limit:
            break
    crops, stats = crops[:limit] if limit else crops, stats[:limit] if limit else stats
    return np.stack(crops), np.stack(stats)
