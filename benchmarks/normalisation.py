"""Colour normalisation at inference: white balance alone against stain normalisation.

``pbc --split val --n-per-class N``
    PBC cells as they are, and the same cells under a simulated other lab (stain amounts and
    hues in optical-density space, lamp tint and vignetting, hue, saturation, brightness,
    contrast and gamma: ``core/model/augment.py``, drawn once per image with a fixed seed and
    applied to the raw image before it is prepared). Every cell is prepared, normalised and
    classified adaptively by the shipped model with each normalisation, at PBC's known
    red-cell scale (29 px), so only the colour differs. This part chooses the normalisation.
``dataset1 [--n N] [--rbc-diameter PX]``
    WBC dataset 1 (another microscope and rapid stain) through ``core.tasks.classify`` with
    each normalisation: the red-cell scale estimated by ``prepare_smear`` (the user's path,
    no ``--rbc-diameter``), or a given scale to see what the scale costs. Reported, never used
    to choose.

Results: ``benchmarks/results/normalisation_<part>.json``.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS  # noqa: E402
from _metrics import balanced_accuracy  # noqa: E402
from _sets import dataset1_records, pbc_stratified  # noqa: E402

METHODS = ("white-balance", "stain")


def simulate_other_lab(image, seed):
    """``image`` (uint8 RGB) as another lab might have stained and lit it."""
    import torch

    from napari_cytodiffusion.core.model import augment

    generator = torch.Generator().manual_seed(int(seed))
    x = torch.from_numpy(np.asarray(image, np.float32) / 255).permute(2, 0, 1)[None]
    x = augment.stain_jitter(x, generator, amount=0.35, hue_degrees=10.0)
    x = augment.illumination(x, generator, tint=0.10, vignette=0.2)
    x = augment.colour_jitter(
        x, generator, hue=0.03, saturation=0.3, brightness=0.1, contrast=0.2, gamma=0.25
    )
    return (x[0].permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)


def _classify(images, model, normalisation, rbc_diameter):
    """Calls of the central cell of each image: every image prepared and cut as
    ``core.tasks.classify`` does, then all crops classified in one batch (the same calls as
    one at a time: each cell's trials and pruning are its own)."""
    from napari_cytodiffusion.core.model.classifier import classify_crops
    from napari_cytodiffusion.core.smear.crops import central_cell_site
    from napari_cytodiffusion.core.smear.prepare import prepare_smear

    started = time.perf_counter()
    crops, colours = [], []
    for image in images:
        smear = prepare_smear(image, rbc_diameter, normalisation=normalisation)
        crops.append(central_cell_site(smear).crop(smear.rgb, model.image_size))
        colours.append(smear.colour_map.statistics())
    calls = classify_crops(
        model, np.stack(crops), batch_size=64, colour_statistics=np.stack(colours)
    )
    return calls, (time.perf_counter() - started) / len(images)


def _scores(calls, truth, classes):
    predicted = np.array([c.label for c in calls])
    correct = predicted == np.asarray(truth)
    review = np.array([c.needs_review for c in calls])
    return {
        "balanced_accuracy": balanced_accuracy(truth, predicted, classes),
        "accuracy": float(correct.mean()),
        "flagged": float(review.mean()),
        "unflagged_accuracy": float(correct[~review].mean()) if (~review).any() else None,
        "predicted": {c: int((predicted == c).sum()) for c in classes if (predicted == c).any()},
    }


def pbc(args, model):
    from napari_cytodiffusion.core.io import read_image

    records = pbc_stratified(args.split, args.n_per_class)
    truth = [r.label for r in records]
    images = [read_image(r.path) for r in records]
    shifted = [simulate_other_lab(image, i) for i, image in enumerate(images)]
    report = {"cells": len(records), "split": args.split, "rbc_diameter": 29.0}
    for name, batch in (("as_imaged", images), ("simulated_other_lab", shifted)):
        for method in args.methods:
            calls, seconds = _classify(batch, model, method, 29.0)
            entry = _scores(calls, truth, model.classes)
            entry["seconds_per_cell"] = seconds
            report[f"{name}/{method}"] = entry
            print(name, method, json.dumps(entry), flush=True)
    return report


def dataset1(args, model):
    from napari_cytodiffusion.core.io import read_image
    from napari_cytodiffusion.core.smear.prepare import prepare_smear

    records = dataset1_records(args.n)
    truth = [label for _, label in records]
    classes = sorted(set(truth))
    images = [read_image(path) for path, _ in records]
    scales = [prepare_smear(image).rbc_diameter for image in images]
    report = {
        "cells": len(records),
        "classes": {c: truth.count(c) for c in classes},
        "rbc_diameter": args.rbc_diameter or "estimated per image (prepare_smear)",
        "estimated_rbc_diameter_quartiles": np.percentile(scales, [25, 50, 75]).round(1).tolist(),
    }
    for method in args.methods:
        calls, seconds = _classify(images, model, method, args.rbc_diameter)
        entry = _scores(calls, truth, classes)
        entry["seconds_per_cell"] = seconds
        report[method] = entry
        print(method, json.dumps(entry), flush=True)
    return report


def main():
    import torch

    from napari_cytodiffusion.core.model.weights import load_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="part", required=True)
    p = sub.add_parser("pbc")
    p.add_argument("--split", default="val", choices=["val", "test"])
    p.add_argument("--n-per-class", type=int, default=30)
    d = sub.add_parser("dataset1")
    d.add_argument("--n", type=int, default=300)
    d.add_argument("--rbc-diameter", type=float, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated")
    parser.add_argument("--tag", default="", help="suffix of the results file")
    parser.add_argument("--model", default="default")
    args = parser.parse_args()
    args.methods = [m for m in args.methods.split(",") if m in METHODS]
    torch.set_num_threads(args.threads)
    model = load_model(args.model, device="cpu")
    report = {"pbc": pbc, "dataset1": dataset1}[args.part](args, model)
    report["model"] = model.name
    report["hardware"] = "2-core CPU shared with other jobs (times are indicative only)"
    suffix = (
        args.split
        if args.part == "pbc"
        else ("estimated" if not args.rbc_diameter else f"{args.rbc_diameter:g}px")
    )
    out = RESULTS / f"normalisation_{args.part}_{suffix}{args.tag}.json"
    if out.exists():  # runs of other methods on the same cells are kept beside this one
        report = {**json.loads(out.read_text()), **report}
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(out)


if __name__ == "__main__":
    main()
