"""What one kind of difference between labs does to the calls, one at a time.

PBC **val** cells (stratified), each image changed in one way before it is prepared the way a
user's image is (``prepare_smear``, ``central_cell_site``), at PBC's known red-cell scale so
that only the change differs: defocus (Gaussian blur, sigma in model pixels), sensor noise,
JPEG compression, another lab's stain and lamp (``normalisation.simulate_other_lab``), and a
red-cell scale that is wrong by 20 %. For each: balanced accuracy, the share of calls flagged
for review and why, and the calls left unflagged that are wrong ("confidently wrong"), which
the review flag exists to prevent.

The changes are the lab augmentations v2 trains with (``core/model/augment.py``); rerun this
with ``--model`` to see what a model trained with them gains (the model card's ablation).

    python benchmarks/perturbations.py [--n-per-class 20] [--only blur]

Results: ``benchmarks/results/perturbations.json``.
"""

import argparse
import io
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, add_float32_option  # noqa: E402
from _metrics import call_metrics  # noqa: E402
from _sets import central_cell_crops, pbc_stratified  # noqa: E402
from normalisation import simulate_other_lab  # noqa: E402

PBC_RBC_DIAMETER = 29.0
# Source pixels per model pixel for PBC's 160-px images: the 64-px crop spans 2.5 diameters.
SOURCE_PER_MODEL_PX = 2.5 * PBC_RBC_DIAMETER / 64


def blur(image, sigma_model_px):
    sigma = sigma_model_px * SOURCE_PER_MODEL_PX
    return ndi.gaussian_filter(image.astype(np.float32), (sigma, sigma, 0)).round().astype(np.uint8)


def noise(image, sd, seed):
    rng = np.random.default_rng(seed)
    noisy = image / 255.0 + rng.normal(0.0, sd, image.shape)
    return (np.clip(noisy, 0, 1) * 255).round().astype(np.uint8)


def jpeg(image, quality):
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(buffer).convert("RGB"))


# name -> (change of the uint8 image (image, index) -> image, red-cell diameter given)
CONDITIONS = {
    "as imaged": (lambda im, i: im, PBC_RBC_DIAMETER),
    "blur 0.5 px": (lambda im, i: blur(im, 0.5), PBC_RBC_DIAMETER),
    "blur 1.0 px": (lambda im, i: blur(im, 1.0), PBC_RBC_DIAMETER),
    "blur 1.5 px": (lambda im, i: blur(im, 1.5), PBC_RBC_DIAMETER),
    "noise 0.03": (lambda im, i: noise(im, 0.03, i), PBC_RBC_DIAMETER),
    "noise 0.06": (lambda im, i: noise(im, 0.06, i), PBC_RBC_DIAMETER),
    "jpeg 30": (lambda im, i: jpeg(im, 30), PBC_RBC_DIAMETER),
    "jpeg 15": (lambda im, i: jpeg(im, 15), PBC_RBC_DIAMETER),
    "other lab colour": (lambda im, i: simulate_other_lab(im, i), PBC_RBC_DIAMETER),
    "scale x0.8": (lambda im, i: im, 0.8 * PBC_RBC_DIAMETER),
    "scale x1.2": (lambda im, i: im, 1.2 * PBC_RBC_DIAMETER),
}


def run_condition(model, images, truth, change, rbc_diameter):
    from napari_cytodiffusion.core.model.classifier import classify_crops

    started = time.perf_counter()
    changed = [change(image, i) for i, image in enumerate(images)]
    crops, colours, _ = central_cell_crops(changed, rbc_diameter, model.image_size)
    calls = classify_crops(model, crops, colour_statistics=colours)
    seconds = (time.perf_counter() - started) / len(images)
    metrics = call_metrics(calls, truth, model.classes)
    predicted = [c.label for c in calls]
    wrong_unflagged = [
        f"{t} -> {p}"
        for t, p, c in zip(truth, predicted, calls, strict=True)
        if p != t and not c.needs_review
    ]
    keep = (
        "balanced_accuracy",
        "needs_review_fraction",
        "unflagged_accuracy",
        "unflagged_cells",
        "flagged_by_reason",
    )
    return {
        **{k: metrics[k] for k in keep},
        "confidently_wrong": len(wrong_unflagged),
        "confidently_wrong_calls": sorted(set(wrong_unflagged), key=wrong_unflagged.count)[::-1],
        "predicted": {c: predicted.count(c) for c in model.classes if c in predicted},
        "seconds_per_cell": round(seconds, 3),
    }


def main():
    import torch

    from napari_cytodiffusion.core.io import read_image
    from napari_cytodiffusion.core.model.diffusion import network_precision
    from napari_cytodiffusion.core.model.weights import load_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-per-class", type=int, default=20)
    parser.add_argument("--only", help="run the conditions whose name contains this")
    parser.add_argument("--model", default="default")
    parser.add_argument("--threads", type=int, default=2)
    add_float32_option(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model, device="cpu")
    records = pbc_stratified("val", args.n_per_class)
    truth = [r.label for r in records]
    images = [read_image(r.path) for r in records]
    out = RESULTS / f"perturbations{'' if args.model == 'default' else '_' + model.name}.json"
    report = json.loads(out.read_text()) if out.exists() and args.only else {}
    report.update(
        {
            "model": model.name,
            "cells": len(records),
            "split": "val",
            "hardware": f"{platform.machine()} CPU, {args.threads} threads",
            "network_precision": network_precision("cpu"),
        }
    )
    conditions = report.setdefault("conditions", {})
    for name, (change, rbc_diameter) in CONDITIONS.items():
        if args.only and args.only not in name:
            continue
        conditions[name] = run_condition(model, images, truth, change, rbc_diameter)
        print(name, json.dumps(conditions[name]), flush=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
    print(out)


if __name__ == "__main__":
    main()
