"""Scoring soft (defocused) cells on the error's low band: the calibration for it, fitted here.

``collect``
    PBC **val** cells that the perturbation benchmark does not use (``--per-class`` a class,
    seed 1), each blurred before preparation by a Gaussian whose sigma is drawn from
    ``SIGMA_RANGE`` model pixels (seed 1), then prepared and cut as a user's single-cell image is
    at PBC's scale. Stored: their softness (``core/model/domain.py``) and exhaustive paired
    errors of every class and of the null class in the low band (the error blurred by a
    Gaussian of ``BAND`` model px before its mean square; ``--trials`` trials, seed 0), in
    ``work_data/soft_scoring/val_blurred.npz`` (not in the repository).
``fit [--write]``
    The soft calibration (``core/model/calibration.fit_calibration`` on the cells that are
    soft enough to be scored this way, the shipped calibration as the base; the review
    thresholds stay the main ones, see :func:`soft_part`), checked first by
    two-fold cross-fitting (fit on one half, calls on the other, the adaptive schedule
    replayed); ``--write`` stores it as ``calibration["soft"]`` in the shipped model file and
    records the file's new sha256 in the registry.

The band was chosen on PBC val cells by ``benchmarks/lowpass_scoring.py`` (sigma 2 px kept
blurred cells' calls where sharp ones are, 0.91-0.93 uncalibrated). What the live classifier
gains is measured by ``benchmarks/perturbations.py`` (other val cells) and
``benchmarks/classification.py`` (test cells). Results: ``benchmarks/results/soft_scoring.json``.

    python benchmarks/soft_scoring.py collect [--per-class 40] [--trials 64]
    python benchmarks/soft_scoring.py fit [--write]
"""

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import REPO, RESULTS  # noqa: E402
from _metrics import balanced_accuracy  # noqa: E402
from _sets import central_cell_crops, pbc_stratified  # noqa: E402
from perturbations import PBC_RBC_DIAMETER, blur  # noqa: E402
from review import SHIPPED, write_shipped  # noqa: E402

from napari_cytodiffusion.core.model.classifier import UNCERTAIN  # noqa: E402

CACHE = REPO / "work_data" / "soft_scoring" / "val_blurred.npz"
OUT = RESULTS / "soft_scoring.json"
BAND = 2.0  # model px
SIGMA_RANGE = (0.75, 2.0)  # model px of the blur the calibration cells get
# The main calibration's parts that hold for every cell: domain reference, size bounds and the
# review thresholds.
MAIN_ONLY = ("domain", "size", "uncertainty_threshold", "anomaly_threshold")


def main_calibration(model):
    """The shipped calibration without its soft part: what every cell's scoring shares."""
    return {k: v for k, v in model.calibration.items() if k != "soft"}


def band_model(model):
    """The model scoring errors in the low band, with the shipped calibration otherwise."""
    view = copy.copy(model)
    view.calibration = {**main_calibration(model), "error_band": BAND}
    return view


def fitting_records(per_class):
    """PBC val records of every class, none of them among the perturbation benchmark's."""
    taken = {r.path for r in pbc_stratified("val", 20)}
    return pbc_stratified("val", per_class, seed=1, exclude=taken)


def collect(args):
    from napari_cytodiffusion.core.io import read_image
    from napari_cytodiffusion.core.model.classifier import class_errors
    from napari_cytodiffusion.core.model.domain import domain_scores
    from napari_cytodiffusion.core.model.weights import load_model

    started = time.perf_counter()
    model = load_model("default", device="cpu")
    records = fitting_records(args.per_class)
    sigmas = np.random.default_rng(1).uniform(*SIGMA_RANGE, len(records))
    images = [blur(read_image(r.path), s) for r, s in zip(records, sigmas, strict=True)]
    crops, colours, _ = central_cell_crops(images, PBC_RBC_DIAMETER, model.image_size)
    _, softness = domain_scores(model, crops, colours)
    errors, _ = class_errors(
        band_model(model), crops, "exhaustive", 0, args.trials, batch_size=72, null=True
    )
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    np.savez(
        CACHE,
        errors=errors,
        labels=np.array([model.classes.index(r.label) for r in records]),
        softness=softness,
        sigmas=sigmas,
        colours=colours,
        crops=(np.clip(crops, 0, 1) * 255 + 0.5).astype(np.uint8),
    )
    print(f"{len(records)} cells, {time.perf_counter() - started:.0f} s")


def soft_part(fitted, base):
    """What the model file keeps for soft cells: the fitted spreads, class biases, temperature
    and anomaly reference, and the error band. The review thresholds stay the main ones (one
    pair for every cell, as the viewer applies them): the anomaly score is scaled so that the
    main threshold flags as many soft cells as their own threshold would."""
    soft = {k: v for k, v in fitted.items() if k not in MAIN_ONLY}
    soft["anomaly_scale"] = base["anomaly_threshold"] / fitted["anomaly_threshold"]
    soft["error_band"] = BAND
    return soft


def _calls(model, errors):
    """Calls of the adaptive schedule replayed on exhaustive errors (no domain-shift score:
    every cell here is soft, so that flag would mark them all)."""
    from napari_cytodiffusion.core.model.classifier import calls_from_errors, replay_adaptive

    replayed, spent = replay_adaptive(model, errors)
    return calls_from_errors(model, replayed, spent)


def _summary(calls, labels, classes):
    truth = [classes[i] for i in labels]
    predicted = [c.label for c in calls]
    right = np.array([p == t for p, t in zip(predicted, truth, strict=True)])
    kept = ~np.array([c.needs_review for c in calls])
    return {
        "cells": len(calls),
        "balanced_accuracy": round(balanced_accuracy(truth, predicted, classes), 4),
        "uncertain": round(float(np.mean([UNCERTAIN in c.why for c in calls])), 4),
        "flagged_uncertain_or_unknown_kind": round(float(np.mean(~kept)), 4),
        "unflagged_accuracy": round(float(right[kept].mean()), 4) if kept.any() else None,
    }


def fit(args):
    from napari_cytodiffusion.core.model.calibration import fit_calibration
    from napari_cytodiffusion.core.model.checkpoint import load_model_file
    from napari_cytodiffusion.core.model.classifier import SOFT_SCORING

    model = load_model_file(SHIPPED, "cpu")
    base = main_calibration(model)
    data = np.load(CACHE)
    soft = np.nan_to_num(data["softness"], nan=0.0) > SOFT_SCORING
    errors, labels = data["errors"][soft], data["labels"][soft]
    report = {
        "cells": int(len(soft)),
        "soft_enough": int(soft.sum()),
        "band_model_px": BAND,
        "blur_sigma_model_px": list(SIGMA_RANGE),
        "trials": int(errors.shape[1]),
    }
    halves = np.arange(len(labels)) % 2
    folds = []
    for held in (0, 1):
        view = band_model(model)
        fitted = fit_calibration(view, errors[halves != held], labels[halves != held], base=base)
        view.calibration = {**base, **soft_part(fitted, base)}
        calls = _calls(view, errors[halves == held])
        folds.append(_summary(calls, labels[halves == held], model.classes))
    report["cross_fitted"] = folds
    fitted = fit_calibration(band_model(model), errors, labels, base=base)
    soft_calibration = soft_part(fitted, base)
    report["fitted"] = {
        "own_uncertainty_threshold": fitted["uncertainty_threshold"],
        "own_anomaly_threshold": fitted["anomaly_threshold"],
        **{k: soft_calibration[k] for k in ("inverse_temperature", "anomaly_scale", "fitted_on")},
    }
    if args.write:
        report["registry"] = write_shipped(model, soft=soft_calibration)
    report.update(
        date=time.strftime("%Y-%m-%d %H:%M"),
        hardware=f"{platform.machine()}, CPU only",
    )
    OUT.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


def main():
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    actions = parser.add_subparsers(dest="action", required=True)
    collecting = actions.add_parser("collect")
    collecting.add_argument("--per-class", type=int, default=40)
    collecting.add_argument("--trials", type=int, default=64)
    fitting = actions.add_parser("fit")
    fitting.add_argument("--write", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    {"collect": collect, "fit": fit}[args.action](args)


if __name__ == "__main__":
    main()
