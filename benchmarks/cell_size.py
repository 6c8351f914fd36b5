"""The size check of the review flag: fitting each class's largest chromatin area, and what
it catches.

``fit [--per-class 300] [--write]``
    The chromatin area of the central cell (``core/model/cell_size.central_chromatin_area``)
    of PBC **train** cells (up to 300 per class, at PBC's 29-px red-cell scale, cut as a
    user's single-cell image is), and the largest area each class may have
    (``fit_size_reference``); ``--write`` stores it in the shipped model's calibration
    (``calibration["size"]``) and its sha256 in ``models/registry.json``.
``report``
    On the cells of ``benchmarks/shift_trust.py cells`` (their calls, flags and scores were
    computed without this check; the check needs only each call and its crop): PBC val
    cells under each change of ``perturbations.py`` and the combinations, and, held out,
    300 PBC test cells and WBC dataset 1. Per set: the share flagged and the wrong calls
    left unflagged, without and with the check, and the areas by true class.

Results: ``benchmarks/results/cell_size.json``.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS  # noqa: E402
from _sets import central_cell_crops, pbc_stratified  # noqa: E402
from perturbations import CONDITIONS, PBC_RBC_DIAMETER  # noqa: E402
from review import SHIPPED, write_shipped  # noqa: E402
from shift_trust import CELLS, COMBINATIONS, _load, held_out_cells  # noqa: E402

from napari_cytodiffusion.core.model import cell_size  # noqa: E402

OUT = RESULTS / "cell_size.json"


def _areas(images, scale):
    crops, _, _ = central_cell_crops(images, scale, 64)
    return cell_size.central_chromatin_area(crops)


def fit(args):
    from napari_cytodiffusion.core.io import read_image
    from napari_cytodiffusion.core.model.checkpoint import load_model_file

    model = load_model_file(SHIPPED, "cpu")
    records = pbc_stratified("train", args.per_class)
    areas = _areas([read_image(r.path) for r in records], PBC_RBC_DIAMETER)
    labels = np.array([r.label for r in records])
    reference = cell_size.fit_size_reference(areas, labels, model.classes)
    report = {
        "size": reference,
        "train_cells": int(len(records)),
        "train_area_quartiles": {
            c: np.percentile(areas[labels == c], [25, 50, 75]).round(2).tolist()
            for c in model.classes
        },
    }
    if args.write:
        report["registry"] = write_shipped(model, size=reference)
    return report


def _check(data, areas, classes, reference, limits):
    predicted = data["probabilities"].argmax(axis=1)
    called = [classes[i] for i in predicted]
    ratio = cell_size.size_ratios(reference, areas, called)
    flagged = (
        (data["uncertainty"] > limits[0]) | (data["anomaly"] > limits[1]) | (data["shift"] > 1)
    )
    wrong = predicted != data["truth"]
    too_large = ratio > 1
    with_size = flagged | too_large
    return {
        "cells": int(len(wrong)),
        "flagged_without": round(float(flagged.mean()), 4),
        "flagged_with": round(float(with_size.mean()), 4),
        "too_large": int(too_large.sum()),
        "too_large_and_right": int((too_large & ~wrong).sum()),
        "confidently_wrong_without": int((wrong & ~flagged).sum()),
        "confidently_wrong_with": int((wrong & ~with_size).sum()),
        "newly_flagged_right_calls": int((too_large & ~flagged & ~wrong).sum()),
        "caught": sorted(
            f"{classes[t]} -> {classes[p]}"
            for t, p in zip(
                data["truth"][wrong & ~flagged & too_large],
                predicted[wrong & ~flagged & too_large],
                strict=True,
            )
        ),
    }


def report(args):
    from napari_cytodiffusion.core.io import read_image
    from napari_cytodiffusion.core.model.checkpoint import load_model_file
    from napari_cytodiffusion.core.tasks.classify import shared_rbc_diameter

    model = load_model_file(SHIPPED, "cpu")
    reference = model.calibration.get("size")
    if reference is None:
        raise SystemExit("the shipped model has no size reference yet: run `fit --write` first")
    limits = (model.calibration["uncertainty_threshold"], model.calibration["anomaly_threshold"])
    records = pbc_stratified("val", 20)
    images = [read_image(r.path) for r in records]
    out = {"size": reference, "sets": {}}
    for name, (change, scale) in {**CONDITIONS, **COMBINATIONS}.items():
        areas = _areas([change(image, i) for i, image in enumerate(images)], scale)
        out["sets"][f"val {name}"] = _check(
            _load(f"val {name}"), areas, model.classes, reference, limits
        )
        print(name, out["sets"][f"val {name}"], flush=True)
    # The same cells, in the same order, as the calls of `shift_trust.py cells`.
    test_cells = len(_load("held-out PBC test")["truth"])
    for name, pairs in held_out_cells(test_cells).items():
        paths = [path for path, _ in pairs]
        areas = _areas([read_image(p) for p in paths], shared_rbc_diameter(paths))
        data = _load(name)
        out["sets"][name] = _check(data, areas, model.classes, reference, limits)
        out["sets"][name]["area_quartiles_by_true_class"] = {
            model.classes[c]: np.percentile(areas[data["truth"] == c], [0, 25, 50, 75, 100])
            .round(2)
            .tolist()
            for c in np.unique(data["truth"])
        }
        print(name, out["sets"][name], flush=True)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fit")
    f.add_argument("--per-class", type=int, default=300)
    f.add_argument("--write", action="store_true")
    sub.add_parser("report")
    args = parser.parse_args()
    if args.command == "report" and not CELLS.exists():
        raise SystemExit("run `python benchmarks/shift_trust.py cells` first")
    result = {"fit": fit, "report": report}[args.command](args)
    print(json.dumps(result, indent=1))
    name = "cell_size_fit.json" if args.command == "fit" else OUT.name
    (RESULTS / name).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
