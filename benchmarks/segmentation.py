"""Segmentation benchmark on the shared data sets (run by hand; not a test).

    python benchmarks/segmentation.py                  # everything, results in benchmarks/results/
    python benchmarks/segmentation.py --split train    # the tuning split of CBC, nothing saved
    python benchmarks/segmentation.py --only cbc       # redo one part (see --only)

Measures
- WBC detection on CBC (VOC boxes): precision, recall, F1 at IoU >= 0.5 (greedy matching).
- Red-cell count per CBC field: mean absolute percentage error against the RBC boxes.
- segmentation_wbc_dataset1: Dice of the whole white cell and of its nucleus (the predicted
  white cell overlapping the annotated one most; a miss counts as Dice 0).
- wbc_smartphone_pig: WBC detection (YOLO boxes) at IoU >= 0.5 on phone photos through a
  microscope (low magnification, purple red cells, black vignette).
- PBC (CellaVision DM96, a scanner the white-cell detector never saw; 160 px single-cell
  fields): the share of images of nucleated classes whose central cell is found as a white
  cell, the white cells found besides it, and the share of platelet images in which a white
  cell is reported at the centre (a platelet clump taken for a white cell).
- Red-cell scale: the estimated diameter against the median annotated RBC box of each CBC
  field, and against PBC's known 29 px (the unit the classifier was trained in).
- Other magnifications: CBC and phone test fields resampled (white cells about 57-342 px and
  17-90 px across): WBC detection F1, and whether the scale estimate follows the factor.
- One difference between labs at a time: the same fields blurred, noisy, JPEG-compressed,
  paler or darker stained, or in another lab's colours.
- Throughput in megapixels per second and peak memory on a mosaic of real CBC fields of at
  least 4000 x 4000 pixels, in a fresh process.
- Peak memory of ``segment --out`` on a 12,000 x 12,000 JPEG mosaic, in a fresh process.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import DATA, RESULTS, pbc_records  # noqa: E402


def read_rgb(path):
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def voc_boxes(path):
    """{name: [[min_row, min_col, max_row, max_col], ...]} of a Pascal VOC file, whole pixels."""
    from napari_cytodiffusion.core.datasets import voc_boxes as read_voc

    return {name: _whole_pixels(boxes) for name, boxes in read_voc(path).items()}


def box_iou(a, b):
    rows = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    cols = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    overlap = rows * cols
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - overlap
    return overlap / union if union else 0.0


def match_boxes(predicted, truth, threshold=0.5):
    """Greedy one-to-one matching by IoU; returns the number of true positives."""
    pairs = sorted(
        ((box_iou(p, t), i, j) for i, p in enumerate(predicted) for j, t in enumerate(truth)),
        reverse=True,
    )
    used_p, used_t = set(), set()
    for iou, i, j in pairs:
        if iou < threshold:
            break
        if i not in used_p and j not in used_t:
            used_p.add(i)
            used_t.add(j)
    return len(used_p)


def cbc_benchmark(split, limit=None):
    from napari_cytodiffusion.core.smear.segmentation import segment_smear

    images = sorted((DATA / "cbc" / split / "images").glob("*.jpg"))[:limit]
    tp = n_pred = n_true = 0
    errors, diameters, per_field = [], [], []
    rbc_boxes = rbc_boxes_found = rbc_found = rbc_outside = 0
    start = time.perf_counter()
    for path in images:
        truth = voc_boxes(DATA / "cbc" / split / "annotations" / f"{path.stem}.xml")
        result = segment_smear(read_rgb(path))
        predicted = result.boxes("wbc")
        true_wbc = truth.get("WBC", [])
        matched = match_boxes(predicted, true_wbc)
        tp, n_pred, n_true = tp + matched, n_pred + len(predicted), n_true + len(true_wbc)
        n_rbc_true = len(truth.get("RBC", []))
        n_rbc = result.count("rbc")
        if n_rbc_true:
            errors.append(abs(n_rbc - n_rbc_true) / n_rbc_true)
            inside = centroids_in_boxes(result.table("rbc"), truth["RBC"])
            rbc_boxes += len(truth["RBC"])
            rbc_boxes_found += int((inside.sum(axis=0) > 0).sum())
            rbc_found += n_rbc
            rbc_outside += int((inside.sum(axis=1) == 0).sum())
        diameters.append(result.rbc_diameter)
        per_field.append(
            {
                "file": path.name,
                "wbc_true": len(true_wbc),
                "wbc_found": len(predicted),
                "wbc_matched": matched,
                "rbc_true": n_rbc_true,
                "rbc_found": n_rbc,
                "platelets_true": len(truth.get("Platelets", [])),
                "platelets_found": result.count("platelet"),
                "rbc_diameter": round(result.rbc_diameter, 1),
            }
        )
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_true if n_true else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "split": split,
        "fields": len(images),
        "wbc_true": n_true,
        "wbc_found": n_pred,
        "wbc_precision": round(precision, 4),
        "wbc_recall": round(recall, 4),
        "wbc_f1": round(f1, 4),
        "rbc_count_mape": round(float(np.mean(errors)), 4),
        "rbc_count_median_ape": round(float(np.median(errors)), 4),
        "rbc_boxes_holding_a_found_cell": round(rbc_boxes_found / rbc_boxes, 4),
        "rbc_found_outside_every_box": round(rbc_outside / rbc_found, 4),
        "rbc_diameter_median_px": round(float(np.median(diameters)), 1),
        "seconds_per_field": round((time.perf_counter() - start) / max(1, len(images)), 3),
        "per_field": per_field,
    }


def centroids_in_boxes(table, boxes):
    """(cells, boxes) bool: whether each cell's centroid lies in each box."""
    rows = table["centroid_row"].to_numpy()[:, None]
    cols = table["centroid_col"].to_numpy()[:, None]
    boxes = np.asarray(boxes).reshape(-1, 4)
    return (
        (rows >= boxes[:, 0]) & (rows < boxes[:, 2]) & (cols >= boxes[:, 1]) & (cols < boxes[:, 3])
    )


def dice(a, b):
    total = a.sum() + b.sum()
    return 2.0 * np.logical_and(a, b).sum() / total if total else 1.0


def wbc1_benchmark(limit=None, rbc_diameter=None):
    from napari_cytodiffusion.core.smear.segmentation import segment_smear

    folder = DATA / "segmentation_wbc_dataset1"
    images = sorted(folder.glob("*_image.png"))[:limit]
    cell_dice, nucleus_dice, diameters = [], [], []
    for path in images:
        mask = read_rgb(path.with_name(path.name.replace("_image", "_mask")))[..., 0]
        result = segment_smear(read_rgb(path), rbc_diameter=rbc_diameter)
        diameters.append(result.rbc_diameter)
        cell, nucleus = mask > 0, mask == 255
        overlap = np.bincount(result.wbc_labels[cell].ravel(), minlength=2)
        overlap[0] = 0
        if overlap.max() == 0:
            cell_dice.append(0.0)
            nucleus_dice.append(0.0)
            continue
        best = int(np.argmax(overlap))
        cell_dice.append(dice(result.wbc_labels == best, cell))
        nucleus_dice.append(dice(result.nucleus_labels == best, nucleus))
    return {
        "images": len(images),
        "rbc_diameter": "estimated per image" if rbc_diameter is None else rbc_diameter,
        "rbc_diameter_median_px": round(float(np.median(diameters)), 1),
        "cell_dice_mean": round(float(np.mean(cell_dice)), 4),
        "cell_dice_median": round(float(np.median(cell_dice)), 4),
        "nucleus_dice_mean": round(float(np.mean(nucleus_dice)), 4),
        "nucleus_dice_median": round(float(np.median(nucleus_dice)), 4),
        "missed": int(sum(d == 0 for d in cell_dice)),
    }


def pbc_benchmark(split, limit=None):
    """Central white cells of PBC's single-cell fields found, and platelets taken for them."""
    from napari_cytodiffusion.core.smear.segmentation import segment_smear

    records = pbc_records(split)[:limit]
    found, others, platelet_as_wbc = {}, [], []
    for record in records:
        result = segment_smear(read_rgb(record.path))
        labels = np.asarray(result.wbc_labels)
        rows, cols = labels.shape
        centre = labels[rows // 2 - 4 : rows // 2 + 5, cols // 2 - 4 : cols // 2 + 5]
        at_centre = set(np.unique(centre)) - {0}
        if record.label == "platelet":
            platelet_as_wbc.append(bool(at_centre))
            continue
        found.setdefault(record.label, []).append(bool(at_centre))
        others.append(result.count("wbc") - len(at_centre))
    recall = {label: round(float(np.mean(hits)), 4) for label, hits in sorted(found.items())}
    return {
        "split": split,
        "images": len(records),
        "central_cell_found": round(float(np.mean(sum(found.values(), []))), 4),
        "central_cell_found_by_class": recall,
        "other_white_cells_per_image": round(float(np.mean(others)), 4),
        "platelet_images": len(platelet_as_wbc),
        "platelet_images_with_a_white_cell_at_the_centre": round(
            float(np.mean(platelet_as_wbc)), 4
        ),
    }


def yolo_boxes(path, shape):
    """[min_row, min_col, max_row, max_col] boxes of a YOLO label file for an image shape."""
    from napari_cytodiffusion.core.datasets import yolo_boxes as read_yolo

    return _whole_pixels(read_yolo(path, shape))


def _whole_pixels(boxes):
    return [[int(v) for v in box] for box in boxes]


def phone_benchmark(split, limit=None):
    """White-cell detection on the phone-camera fields of wbc_smartphone_pig."""
    from napari_cytodiffusion.core.smear.segmentation import segment_smear

    folder = DATA / "wbc_smartphone_pig" / split
    tp = n_pred = n_true = without_nucleus = 0
    diameters = []
    start = time.perf_counter()
    images = sorted((folder / "images").glob("*.jpg"))[:limit]
    for path in images:
        rgb = read_rgb(path)
        truth = yolo_boxes(folder / "labels" / f"{path.stem}.txt", rgb.shape)
        result = segment_smear(rgb)
        predicted = result.boxes("wbc")
        tp += match_boxes(predicted, truth)
        n_pred, n_true = n_pred + len(predicted), n_true + len(truth)
        without_nucleus += int((result.table("wbc")["nucleus_fraction"] == 0).sum())
        diameters.append(result.rbc_diameter)
    precision, recall = tp / max(n_pred, 1), tp / max(n_true, 1)
    return {
        "split": split,
        "fields": len(images),
        "wbc_true": n_true,
        "wbc_found": n_pred,
        "wbc_precision": round(precision, 4),
        "wbc_recall": round(recall, 4),
        "wbc_f1": round(2 * precision * recall / max(precision + recall, 1e-9), 4),
        "wbc_without_nucleus": without_nucleus,
        "rbc_diameter_median_px": round(float(np.median(diameters)), 1),
        "seconds_per_field": round((time.perf_counter() - start) / max(1, len(images)), 3),
    }


# The phone set has no red-cell boxes. Its truth comes from the microscope: an Olympus CX23
# (10x eyepiece, field number 20) at 100x shows a field of view 200 um across, the black-edged
# circle of every photo, and a pig red cell is about 6.0 um across.
PHONE_FIELD_UM = 200.0
PIG_RBC_UM = 6.0


def field_of_view_diameter(rgb):
    """Diameter in pixels of the circular field of view of a photo through the eyepiece
    (least-squares circle through the edge of the black vignette), or None."""
    from scipy import ndimage as ndi

    from napari_cytodiffusion.core.smear.scale import background_colour
    from napari_cytodiffusion.core.smear.stain import optical_density, vignette

    rgb = rgb.astype(np.float32) / 255
    field = ndi.binary_fill_holes(~vignette(optical_density(rgb, background_colour(rgb))))
    edge = field & ~ndi.binary_erosion(field)
    edge[[0, -1]], edge[:, [0, -1]] = False, False
    rows, cols = np.nonzero(edge)
    if len(rows) < 50:
        return None
    design = np.c_[2 * rows, 2 * cols, np.ones(len(rows))]
    (r0, c0, k), *_ = np.linalg.lstsq(design, rows**2 + cols**2, rcond=None)
    return 2 * float(np.sqrt(k + r0**2 + c0**2))


def scale_benchmark(split, limit=None, pbc_images=100):
    """Estimated red-cell diameter against the annotations' (CBC), the microscope's (phone)
    and the known (PBC) scale, and against a fixed 35 px on WBC dataset 1 (truth unknown).

    Also the white-cell fallback alone (what a tight crop gets) on PBC and WBC dataset 1.
    """
    from napari_cytodiffusion.core.smear.scale import estimate_scale, white_cell_diameter

    sets = {}
    for path in sorted((DATA / "cbc" / split / "images").glob("*.jpg"))[:limit]:
        boxes = voc_boxes(DATA / "cbc" / split / "annotations" / f"{path.stem}.xml").get("RBC")
        if boxes:
            truth = np.median([((b[2] - b[0]) + (b[3] - b[1])) / 2 for b in boxes])
            sets.setdefault("cbc_vs_median_rbc_box", []).append((path, truth))
    phone_split = {"test": "test", "train": "train"}[split]
    for path in sorted((DATA / "wbc_smartphone_pig" / phone_split / "images").glob("*.jpg"))[
        :limit
    ]:
        circle = field_of_view_diameter(read_rgb(path))
        if circle:
            truth = PIG_RBC_UM / PHONE_FIELD_UM * circle
            sets.setdefault(f"phone_{phone_split}_vs_field_of_view", []).append((path, truth))
    pbc_split = {"test": "test", "train": "val"}[split]
    records = pbc_records(pbc_split)
    chosen = np.random.default_rng(0).choice(len(records), pbc_images, replace=False)
    sets[f"pbc_{pbc_split}_vs_29px"] = [(records[i].path, 29.0) for i in sorted(chosen)]
    wbc1 = sorted((DATA / "segmentation_wbc_dataset1").glob("*_image.png"))[:limit]
    sets["wbc1_vs_35px"] = [(path, 35.0) for path in wbc1]
    results = {}
    for name, items in sets.items():
        estimates = [estimate_scale(read_rgb(path).astype(np.float32) / 255) for path, _ in items]
        ratios = [e.diameter / truth for e, (_, truth) in zip(estimates, items, strict=True)]
        results[name] = summary(ratios)
        results[name]["white_cell_source"] = round(
            float(np.mean([e.source == "white cell" for e in estimates])), 3
        )
        if name.startswith(("pbc", "wbc1")):
            fallback = [
                white_cell_diameter(read_rgb(path).astype(np.float32) / 255) / truth
                for path, truth in items
            ]
            results[f"{name}_white_cell_only"] = summary(fallback)
    return results


def test_fields(split, limit=None):
    """{"cbc": [(path, read_truth)], "phone": [...]}: ``read_truth(shape)`` gives the white-cell
    boxes of the image as imaged, or resampled to ``shape``."""
    from PIL import Image

    cbc = DATA / "cbc" / split
    phone = DATA / "wbc_smartphone_pig" / ("test" if split == "test" else "valid")

    def cbc_truth(path):
        boxes = voc_boxes(cbc / "annotations" / f"{path.stem}.xml").get("WBC", [])
        with Image.open(path) as image:  # the size only: nothing decoded
            height = image.height
        return lambda shape: [[round(v * shape[0] / height) for v in box] for box in boxes]

    def phone_truth(path):  # YOLO boxes are fractions of the image
        return lambda shape: yolo_boxes(phone / "labels" / f"{path.stem}.txt", shape)

    return {
        "cbc": [(p, cbc_truth(p)) for p in sorted((cbc / "images").glob("*.jpg"))[:limit]],
        "phone": [(p, phone_truth(p)) for p in sorted((phone / "images").glob("*.jpg"))[:limit]],
    }


def detection_sweep(fields, conditions):
    """White-cell detection and the red-cell scale of the same fields under each condition.

    ``conditions[set]`` is ``[(label, change)]``, the first the fields as imaged;
    ``change(rgb, seed)`` returns the changed image and its magnification factor. The scale
    ratio is the diameter estimated after the change over the factor times the diameter
    estimated as imaged: 1.0 when the estimate follows the image.
    """
    from napari_cytodiffusion.core.smear.segmentation import segment_smear

    results = {}
    for name, items in fields.items():
        native = {}
        for label, change in conditions[name]:
            tp = n_pred = n_true = 0
            sizes, ratios = [], []
            for seed, (path, read_truth) in enumerate(items):
                rgb, factor = change(read_rgb(path), seed)
                truth = read_truth(rgb.shape)
                result = segment_smear(rgb)
                predicted = result.boxes("wbc")
                tp += match_boxes(predicted, truth)
                n_pred, n_true = n_pred + len(predicted), n_true + len(truth)
                sizes += [max(b[2] - b[0], b[3] - b[1]) for b in truth]
                native.setdefault(path, result.rbc_diameter)
                ratios.append(result.rbc_diameter / (factor * native[path]))
            precision, recall = tp / max(n_pred, 1), tp / max(n_true, 1)
            results.setdefault(name, {})[label] = part = {
                "fields": len(items),
                "white_cell_px_median": round(float(np.median(sizes)), 1),
                "wbc_precision": round(precision, 4),
                "wbc_recall": round(recall, 4),
                "wbc_f1": round(2 * precision * recall / max(precision + recall, 1e-9), 4),
                "scale_ratio_median": round(float(np.median(ratios)), 3),
                "scale_within_10_percent": round(
                    float(np.mean(np.abs(np.log(ratios)) < np.log(1.1))), 3
                ),
            }
            print(name, label, part, flush=True)
    return results


def resampled(factor):
    """Another magnification: area averaging down, Lanczos up."""
    from PIL import Image

    def change(rgb, seed):
        if factor == 1:
            return rgb, 1.0
        image = Image.fromarray(rgb)
        size = (round(image.width * factor), round(image.height * factor))
        kind = Image.Resampling.BOX if factor < 1 else Image.Resampling.LANCZOS
        return np.asarray(image.resize(size, kind)), factor

    return change


# CBC's white cells are about 230 px across, the phone set's about 23 px, so the two sets
# together span the 15-300 px the issue asks for.
MAGNIFICATIONS = {"cbc": (1.0, 0.25, 0.5, 1.5), "phone": (1.0, 0.75, 2.0, 4.0)}


def magnification_benchmark(split, limit=None):
    """Detection and scale on fields resampled to other magnifications."""
    conditions = {
        name: [(str(factor), resampled(factor)) for factor in factors]
        for name, factors in MAGNIFICATIONS.items()
    }
    return detection_sweep(test_fields(split, limit), conditions)


# About a red cell's diameter in each set as imaged: the perturbations' sizes are fractions
# of it, so that the two sets are changed alike.
RED_CELL_PX = {"cbc": 90.0, "phone": 12.0}


def perturbed(kind, amount, rbc_px):
    """One difference between labs at a time (the kinds the detector trained with, and more)."""
    from perturbations import jpeg
    from scipy import ndimage as ndi

    def change(rgb, seed):
        rng = np.random.default_rng(seed)
        x = rgb.astype(np.float32)
        if kind == "blur":  # defocus, sigma in red-cell diameters
            x = ndi.gaussian_filter(x, (amount * rbc_px, amount * rbc_px, 0))
        elif kind == "noise":  # sensor noise, SD in units of the full range
            x = x + rng.normal(0, 255 * amount, x.shape)
        elif kind == "stain":  # weaker or stronger stain: optical density scaled
            x = 256 * ((x + 1) / 256) ** amount - 1
        elif kind == "jpeg":
            x = jpeg(rgb, int(amount)).astype(np.float32)
        elif kind == "other lab":  # stain, lamp and camera colours of another lab
            x = other_lab(rgb, seed)
        return np.clip(x + 0.5, 0, 255).astype(np.uint8), 1.0

    return change


def other_lab(rgb, seed):
    """``normalisation.simulate_other_lab`` on the field's own light.

    Its stain model reads optical density against PBC's background; a field lit otherwise
    (the phone photos' grey) would get cell rims brighter than the glass, which no stain
    does. So the field is brought to that background, changed and brought back; and the
    vignette (the lamp's light cut off, not stain) keeps its colour, with its soft edge.
    """
    from normalisation import simulate_other_lab
    from scipy import ndimage as ndi

    from napari_cytodiffusion.core.smear.normalise import REFERENCE_BACKGROUND
    from napari_cytodiffusion.core.smear.scale import background_colour
    from napari_cytodiffusion.core.smear.stain import optical_density, vignette

    light = rgb.astype(np.float32) / 255
    background = background_colour(light)
    gain = np.asarray(REFERENCE_BACKGROUND, np.float32) / background
    field = np.clip(light * gain * 255 + 0.5, 0, 255).astype(np.uint8)
    changed = simulate_other_lab(field, seed).astype(np.float32) / gain
    black = ndi.binary_dilation(vignette(optical_density(light, background)), iterations=3)
    return np.where(black[..., None], rgb.astype(np.float32), changed)


PERTURBATIONS = (
    ("blur", 0.03),
    ("blur", 0.06),
    ("noise", 0.03),
    ("noise", 0.06),
    ("jpeg", 30),
    ("jpeg", 15),
    ("stain", 0.6),
    ("stain", 1.5),
    ("other lab", 1),
)


def perturbation_benchmark(split, limit=None):
    """Detection and scale on the fields as imaged and changed in one way at a time."""
    conditions = {
        name: [("as imaged", resampled(1.0))]
        + [
            (f"{kind} {amount}" if kind != "other lab" else kind, perturbed(kind, amount, px))
            for kind, amount in PERTURBATIONS
        ]
        for name, px in RED_CELL_PX.items()
    }
    return detection_sweep(test_fields(split, limit), conditions)


def summary(ratios):
    """Median, share within 10 % and 10th-90th percentiles of estimate / truth ratios."""
    values = np.asarray([r for r in ratios if np.isfinite(r)])
    return {
        "images": int(len(values)),
        "median_ratio": round(float(np.median(values)), 3),
        "within_10_percent": round(float(np.mean(np.abs(values - 1) <= 0.1)), 3),
        "ratio_p10_p90": [round(float(v), 3) for v in np.percentile(values, [10, 90])],
    }


# The peak is read from /proc (VmHWM), which starts afresh in a new program; getrusage's
# maximum would carry over the memory of the process that started this one.
SPEED_SCRIPT = """
import json, sys, time
import numpy as np
from napari_cytodiffusion.core.smear.segmentation import segment_smear
mosaic = np.load(sys.argv[1])
segment_smear(mosaic[:1024, :1024], workers=int(sys.argv[2]))  # imports and the model, once
times = []
for _ in range(int(sys.argv[3])):
    start = time.perf_counter()
    result = segment_smear(mosaic, workers=int(sys.argv[2]))
    times.append(time.perf_counter() - start)
peak = [int(l.split()[1]) / 1024 for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
print(json.dumps({"times": times, "peak_rss_mib": peak, "n_wbc": result.count("wbc"),
                  "n_rbc": result.count("rbc"), "rbc_diameter": result.rbc_diameter}))
"""


def cbc_mosaic(side):
    """A side x side RGB mosaic of the real CBC test fields."""
    fields = sorted((DATA / "cbc" / "test" / "images").glob("*.jpg"))
    tiles = [read_rgb(p) for p in fields]
    rows = []
    index = 0
    while sum(r.shape[0] for r in rows) < side:
        row = []
        while sum(t.shape[1] for t in row) < side:
            row.append(tiles[index % len(tiles)])
            index += 1
        rows.append(np.concatenate(row, axis=1)[:, :side])
    return np.ascontiguousarray(np.concatenate(rows, axis=0)[:side])


def speed_benchmark(side=4096, workers=2, repeats=5):
    """Time whole-field segmentations of a mosaic of real CBC test fields (the median of
    ``repeats``: this shared machine's speed varies from moment to moment)."""
    import tempfile

    mosaic = cbc_mosaic(side)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "mosaic.npy"
        np.save(path, mosaic)
        output = subprocess.run(
            [sys.executable, "-c", SPEED_SCRIPT, str(path), str(workers), str(repeats)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    measured = json.loads(output.strip().splitlines()[-1])
    megapixels = mosaic.shape[0] * mosaic.shape[1] / 1e6
    load = os.getloadavg()[0]
    return {
        "image": f"{mosaic.shape[0]} x {mosaic.shape[1]} RGB uint8 mosaic of CBC test fields",
        "megapixels": round(megapixels, 2),
        "workers": workers,
        "seconds": round(float(np.median(measured["times"])), 2),
        "all_seconds": [round(t, 2) for t in measured["times"]],
        "megapixels_per_second": round(megapixels / float(np.median(measured["times"])), 3),
        "peak_rss_mib": round(measured["peak_rss_mib"]),
        "n_wbc": measured["n_wbc"],
        "n_rbc": measured["n_rbc"],
        "cpu": f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs "
        f"shared with other jobs while measured (load average {load:.1f} just after)",
    }


LARGE_SCRIPT = """
import sys
from napari_cytodiffusion.cli import main
code = main(["segment", sys.argv[1], "--out", sys.argv[2]])
peak = [int(l.split()[1]) / 1024 for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
print(code, peak)
"""


def large_benchmark(side=12_000):
    """Peak memory and time of ``segment --out`` on a side x side JPEG, as a user runs it."""
    import tempfile

    from PIL import Image

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"mosaic{side}.jpg"
        Image.fromarray(cbc_mosaic(side)).save(path, quality=90)
        start = time.perf_counter()
        output = subprocess.run(
            [sys.executable, "-c", LARGE_SCRIPT, str(path), folder],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        seconds = time.perf_counter() - start
        written = sorted(p.name for p in Path(folder).iterdir() if p != path)
    code, peak = output.split()[-2:]
    return {
        "image": f"{side} x {side} RGB JPEG mosaic of CBC test fields",
        "command": "napari-cytodiffusion segment IMAGE --out DIR",
        "exit_code": int(code),
        "seconds_with_start_up": round(seconds, 1),
        "peak_rss_mib": round(float(peak)),
        "files_written": written,
    }


def write_markdown(results, path):
    cbc, speed = results.get("cbc"), results.get("speed")
    lines = [
        "# Segmentation benchmark",
        "",
        "Runs: " + "; ".join(f"`{run}`" for run in results["runs"]) + ".",
        "",
    ]
    if cbc:
        lines += [
            f"## CBC {cbc['split']} ({cbc['fields']} fields, 640 x 480, VOC boxes)",
            "",
            "| metric | value | target |",
            "|---|---|---|",
            f"| WBC precision (IoU >= 0.5) | {cbc['wbc_precision']:.3f} | |",
            f"| WBC recall (IoU >= 0.5) | {cbc['wbc_recall']:.3f} | |",
            f"| WBC F1 (IoU >= 0.5) | {cbc['wbc_f1']:.3f} | >= 0.98 |",
            f"| RBC count MAPE per field | {100 * cbc['rbc_count_mape']:.1f} % | <= 10 % |",
            f"| RBC count median APE | {100 * cbc['rbc_count_median_ape']:.1f} % | |",
            "| annotated RBC boxes holding a found red cell's centroid | "
            f"{100 * cbc['rbc_boxes_holding_a_found_cell']:.1f} % | |",
            "| found red cells whose centroid is in no RBC box | "
            f"{100 * cbc['rbc_found_outside_every_box']:.1f} % | |",
            f"| estimated RBC diameter (median) | {cbc['rbc_diameter_median_px']} px | |",
            f"| time per field | {cbc['seconds_per_field']} s | |",
            "",
        ]
    for key, title in (("wbc1", "estimated diameter"), ("wbc1_fixed", "fixed diameter")):
        part = results.get(key)
        if not part:
            continue
        lines += [
            f"## segmentation_wbc_dataset1 ({part['images']} images, {title})",
            "",
            f"RBC diameter: {part['rbc_diameter']} (median {part['rbc_diameter_median_px']} px).",
            "",
            "| metric | mean | median | target |",
            "|---|---|---|---|",
            f"| Dice whole cell | {part['cell_dice_mean']:.3f} | {part['cell_dice_median']:.3f} "
            "| >= 0.90 |",
            f"| Dice nucleus | {part['nucleus_dice_mean']:.3f} | {part['nucleus_dice_median']:.3f} "
            "| >= 0.92 |",
            "",
            f"White cells missed: {part['missed']}.",
            "",
        ]
    phone = results.get("phone")
    if phone:
        lines += [
            f"## wbc_smartphone_pig {phone['split']} ({phone['fields']} phone-camera fields)",
            "",
            "| metric | value | target |",
            "|---|---|---|",
            f"| WBC precision (IoU >= 0.5) | {phone['wbc_precision']:.3f} | |",
            f"| WBC recall (IoU >= 0.5) | {phone['wbc_recall']:.3f} | |",
            f"| WBC F1 (IoU >= 0.5) | {phone['wbc_f1']:.3f} | >= 0.95 |",
            f"| white cells found with no nucleus | {phone.get('wbc_without_nucleus', '-')} "
            f"of {phone['wbc_found']} | |",
            f"| estimated RBC diameter (median) | {phone['rbc_diameter_median_px']} px | |",
            f"| time per field | {phone['seconds_per_field']} s | |",
            "",
        ]
    pbc = results.get("pbc")
    if pbc:
        by_class = ", ".join(f"{k} {v:.3f}" for k, v in pbc["central_cell_found_by_class"].items())
        lines += [
            f"## PBC {pbc['split']} ({pbc['images']} single-cell fields of a scanner the "
            "detector never saw)",
            "",
            f"Central cell found as a white cell: **{pbc['central_cell_found']:.3f}** "
            f"({by_class}); other white cells found per image: "
            f"{pbc['other_white_cells_per_image']:.3f}; platelet images with a white cell "
            f"reported at the centre: {pbc['platelet_images_with_a_white_cell_at_the_centre']:.3f}"
            f" of {pbc['platelet_images']}.",
            "",
        ]
    scale = results.get("scale")
    if scale:
        lines += [
            "## Red-cell scale",
            "",
            "Estimated diameter / truth (CBC: median annotated RBC box of the field; phone: "
            "6.0 um pig red cells in the 200 um field of view of the microscope, whose circle is "
            "measured in each photo; PBC: the 29 px the classifier was trained with; WBC "
            "dataset 1: a fixed 35 px, its truth unknown). `_white_cell_only`: the fallback "
            "for images without red cells, used on every image. Target: within 10 % on every "
            "set.",
            "",
            "| set | images | median ratio | within 10 % | 10th-90th percentile | scale from "
            "the white cell |",
            "|---|---|---|---|---|---|",
        ]
        for name, part in scale.items():
            low, high = part["ratio_p10_p90"]
            fallback = part.get("white_cell_source")
            fallback = "" if fallback is None else f"{100 * fallback:.0f} %"
            lines.append(
                f"| {name} | {part['images']} | {part['median_ratio']:.3f} | "
                f"{100 * part['within_10_percent']:.0f} % | {low:.2f}-{high:.2f} | {fallback} |"
            )
        lines.append("")
    sweeps = (
        (
            "magnification",
            "Other magnifications",
            "The test fields resampled by a factor (area averaging down, Lanczos up), their "
            "boxes with them.",
        ),
        (
            "perturbations",
            "One difference between labs at a time",
            "The test fields changed in one way each: Gaussian blur (sigma in red-cell "
            "diameters), sensor noise (SD of the full range), JPEG quality, stain strength "
            "(optical density to a power: 0.6 paler, 1.5 darker) and another lab's colours "
            "(`other_lab`: `benchmarks/normalisation.py simulate_other_lab` on the field's "
            "own light, its vignette kept: stain amounts and hues in optical density, lamp "
            "and vignetting, hue, saturation, contrast and gamma; one draw per field).",
        ),
    )
    for key, title, what in sweeps:
        if not results.get(key):
            continue
        lines += [
            f"## {title}",
            "",
            what + " Scale ratio: the red-cell diameter estimated after the change over the "
            "factor times the diameter estimated as imaged (1.0: the estimate follows the image).",
            "",
            "| set | condition | white cell (median box, px) | precision | recall | F1 | scale "
            "ratio (median) | scale within 10 % |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, conditions in results[key].items():
            for condition, part in conditions.items():
                lines.append(
                    f"| {name} | {condition} | {part['white_cell_px_median']:.0f} | "
                    f"{part['wbc_precision']:.3f} | {part['wbc_recall']:.3f} | "
                    f"{part['wbc_f1']:.3f} | {part['scale_ratio_median']:.3f} | "
                    f"{100 * part['scale_within_10_percent']:.0f} % |"
                )
        lines.append("")
    if speed:
        lines += [
            "## Throughput",
            "",
            f"{speed['image']}: {speed['seconds']} s (median of "
            f"{', '.join(map(str, speed.get('all_seconds', [speed['seconds']])))} s), "
            f"**{speed['megapixels_per_second']} MP/s** (target >= 10), "
            f"peak memory {speed['peak_rss_mib']} MiB (whole process), {speed['workers']} worker "
            f"threads, {speed['n_wbc']} WBCs and {speed['n_rbc']} RBCs found. CPU: {speed['cpu']}.",
            "",
        ]
    large = results.get("large")
    if large:
        lines += [
            "## Memory on a large image",
            "",
            f"`{large['command']}` on a {large['image']}: exit code {large['exit_code']}, "
            f"{large['seconds_with_start_up']} s with start-up, **peak memory "
            f"{large['peak_rss_mib']} MiB** (whole process; target <= 2048 MiB).",
            "",
        ]
    path.write_text("\n".join(lines))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", default="test", choices=("train", "test"))
    parts = ("cbc", "wbc1", "phone", "pbc", "scale", "magnification", "perturbations")
    parts += ("speed", "large")
    parser.add_argument("--only", choices=parts)
    parser.add_argument("--limit", type=int, help="first N images of each data set")
    parser.add_argument("--wbc1-diameter", type=float, default=35.0)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    if not DATA.exists():
        sys.exit(f"needs the shared data at {DATA}")
    command = "python benchmarks/segmentation.py " + " ".join(argv or sys.argv[1:])
    results = {"runs": [f"{time.strftime('%Y-%m-%d')}: {command.strip()}"]}
    if args.only in (None, "cbc"):
        results["cbc"] = cbc_benchmark(args.split, args.limit)
        print(json.dumps({k: v for k, v in results["cbc"].items() if k != "per_field"}))
    if args.only in (None, "wbc1"):
        results["wbc1"] = wbc1_benchmark(args.limit)
        print(json.dumps(results["wbc1"]))
        results["wbc1_fixed"] = wbc1_benchmark(args.limit, args.wbc1_diameter)
        print(json.dumps(results["wbc1_fixed"]))
    if args.only in (None, "phone"):
        phone_split = {"test": "test", "train": "valid"}[args.split]
        results["phone"] = phone_benchmark(phone_split, args.limit)
        print(json.dumps(results["phone"]))
    if args.only in (None, "pbc"):
        results["pbc"] = pbc_benchmark({"test": "test", "train": "val"}[args.split], args.limit)
        print(json.dumps(results["pbc"]))
    if args.only in (None, "scale"):
        results["scale"] = scale_benchmark(args.split, args.limit)
        print(json.dumps(results["scale"]))
    if args.only in (None, "magnification"):
        results["magnification"] = magnification_benchmark(args.split, args.limit)
    if args.only in (None, "perturbations"):
        results["perturbations"] = perturbation_benchmark(args.split, args.limit)
    if args.only in (None, "speed"):
        results["speed"] = speed_benchmark(workers=args.workers)
        print(json.dumps(results["speed"]))
    if args.only in (None, "large"):
        results["large"] = large_benchmark()
        print(json.dumps(results["large"]))
    if args.split == "test" and args.limit is None:
        # A partial run (--only) updates its part of the saved results.
        saved = RESULTS / "segmentation.json"
        merged = json.loads(saved.read_text()) if saved.exists() and args.only else {}
        runs = merged.get("runs", []) + results["runs"]
        merged.update(results, runs=runs)
        RESULTS.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(merged, indent=1))
        write_markdown(merged, RESULTS / "segmentation.md")


if __name__ == "__main__":
    main()
