"""The review flag of the shipped model: fitting its new references, and what it flags.

``fit [--method null_gain] [--write]``
    On the caches of ``benchmarks/issue9_cache.py``: the domain-shift reference
    (``core/model/domain.py``) from PBC **train** cells' encoder features and smear colours (100 per
    class), thresholded on PBC **val** cells (up to 100 per class); the anomaly score's reference
    and threshold (``core/model/calibration.fit_review``) from the exhaustive errors of the
    stratified PBC val subset (25 cells per class, 12 trials, the adaptive schedule replayed). The
    classifier's own calibration (spread, class biases, temperature, uncertainty threshold: fitted
    on all 1,735 val cells at 64 trials on an H100) is kept. ``--write`` stores the result in the
    shipped model file and records its new sha256 in ``models/registry.json``.
``fit-colour [--write]``
    Only the smear part of the domain reference (the smears' colour references, which are
    blind to exposure since 2026-12-07), refitted on the same caches; the rest is kept.
``report``
    With the model's calibration, on cells never used for fitting: the domain-shift AUROC of
    WBC dataset 1 cells and CBC white cells against PBC test cells (encoder features and
    smear colours of every cell of those sets), and on the PBC test / dataset 1 caches (12
    trials, adaptive replayed) the flagged shares by reason, the accuracy of unflagged calls
    and the calibration error.

Results: ``benchmarks/results/review_{fit,report}.json``.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS  # noqa: E402
from _metrics import auroc, balanced_accuracy, expected_calibration_error  # noqa: E402
from issue9_cache import CACHE  # noqa: E402

from napari_cytodiffusion.core.model import domain  # noqa: E402
from napari_cytodiffusion.core.model.classifier import (  # noqa: E402
    REASONS,
    calls_from_errors,
    replay_adaptive,
)

SHIPPED = (
    Path(__file__).resolve().parents[1]
    / "src"
    / "napari_cytodiffusion"
    / "models"
    / "cytodiffusion-pbc64-v1.pt"
)


def load(name):
    data = np.load(CACHE / f"{name}.npz")
    return {key: data[key] for key in data.files}


def fit(args):
    from napari_cytodiffusion.core.model.calibration import fit_review
    from napari_cytodiffusion.core.model.checkpoint import load_model_file

    model = load_model_file(SHIPPED, "cpu")
    train, val, val_features = load("pbc_train"), load("pbc_val"), load("pbc_val_features")
    reference = domain.fit_domain_reference(
        train["features"],
        train["colours"],
        val_features["features"],
        val_features["colours"],
        _sharpness(train),
        _sharpness(val_features),
    )
    labels = val["labels"][val["scored"]]
    before = dict(model.calibration)
    calibration = fit_review(model, val["errors"], labels, args.method, reference)
    cell, smear = _parts(reference, val_features)
    report = {
        "method": args.method,
        "anomaly_threshold": calibration["anomaly_threshold"],
        "anomaly_threshold_before": before.get("anomaly_threshold"),
        "domain_feature_threshold": reference["features"]["threshold"],
        "domain_colour_threshold": reference["colour"]["threshold"],
        "val_domain_flagged": float(np.mean(np.fmax(cell, smear) > 1)),
        "val_cells_anomaly_reference": int(len(labels)),
        "val_cells_domain_threshold": int(len(val_features["features"])),
        "train_cells_domain_reference": int(len(train["features"])),
        "kept_from_the_h100_calibration": [
            key for key in before if key not in ("anomaly_threshold",) and key in calibration
        ],
    }
    if args.write:
        model.metadata = {
            **model.metadata,
            "review": "anomaly score and domain shift of issue 9 (benchmarks/review.py fit)",
        }
        report["registry"] = write_shipped(model)
    return report


def fit_sharpness(args):
    from napari_cytodiffusion.core.model.checkpoint import load_model_file

    model = load_model_file(SHIPPED, "cpu")
    train, val_features = load("pbc_train"), load("pbc_val_features")
    reference = dict(model.calibration["domain"])
    before = np.fmax(*_parts(reference, val_features))
    reference["sharpness"] = domain.fit_sharpness_reference(
        _sharpness(train), _sharpness(val_features)
    )
    after = np.fmax(*_parts(reference, val_features))
    report = {
        "sharpness": reference["sharpness"],
        "val_domain_flagged_before": float(np.mean(before > 1)),
        "val_domain_flagged": float(np.mean(after > 1)),
        "train_cells": int(len(train["crops"])),
        "val_cells": int(len(val_features["crops"])),
    }
    if args.write:
        report["registry"] = write_shipped(model, domain=reference)
    return report


def fit_colour(args):
    """Refit only the smear part (colour references) of the shipped domain reference, from
    the caches' colours; the encoder, sharpness and anomaly parts and the trust decay stay."""
    from napari_cytodiffusion.core.model.checkpoint import load_model_file

    model = load_model_file(SHIPPED, "cpu")
    train, val_features = load("pbc_train"), load("pbc_val_features")
    reference = dict(model.calibration["domain"])
    reference["colour"] = domain._fit_colour_reference(train["colours"], val_features["colours"])
    cell, smear = _parts(reference, val_features)
    report = {
        "colour": reference["colour"],
        "val_smear_part_flagged": float(np.mean(smear > 1)),
        "val_domain_flagged": float(np.mean(np.fmax(cell, smear) > 1)),
        "train_cells": int(len(train["crops"])),
        "val_cells": int(len(val_features["crops"])),
    }
    if args.write:
        report["registry"] = write_shipped(model, domain=reference)
    return report


def _sharpness(data):
    return domain.crop_sharpness(data["crops"].astype(np.float32) / 255)


def _parts(reference, data):
    """(cell, smear) parts of the domain-shift score of a cached set."""
    return domain.domain_parts(reference, data["features"], data["colours"], _sharpness(data))


def write_shipped(model, **calibration):
    """Store ``calibration`` parts in ``model``, write it as the shipped model file (keeping
    the old file's training step and loss history) and record its new sha256 in the
    registry; returns the registry entry (name, sha256)."""
    import torch

    from napari_cytodiffusion.core.model.checkpoint import save_model_file
    from napari_cytodiffusion.core.model.weights import update_registry_hash

    model.calibration = {**model.calibration, **calibration}
    old = torch.load(SHIPPED, map_location="cpu", weights_only=True)
    save_model_file(model, SHIPPED)
    new = torch.load(SHIPPED, map_location="cpu", weights_only=True)
    new.update({key: old[key] for key in ("step", "history") if key in old})
    partial = SHIPPED.with_name(SHIPPED.name + ".partial")
    torch.save(new, partial)
    partial.replace(SHIPPED)
    return list(update_registry_hash(SHIPPED))


def _calls(model, data, colours=None):
    errors = data["errors"]
    replayed, spent = replay_adaptive(model, errors)
    index = data["scored"]
    shift, _ = domain.domain_scores(
        model,
        data["crops"][index].astype(np.float32) / 255,
        (colours if colours is not None else data["colours"])[index],
    )
    return calls_from_errors(model, replayed, spent, domain_shift=shift)


def _flag_report(calls, truth=None, classes=None):
    review = np.array([c.needs_review for c in calls])
    out = {
        "cells": len(calls),
        "flagged": float(review.mean()),
        "flagged_by_reason": {
            reason: float(np.mean([reason in c.why for c in calls])) for reason in REASONS
        },
    }
    if truth is not None:
        predicted = np.array([c.label for c in calls])
        correct = predicted == np.asarray(truth)
        confidence = np.array([c.probabilities[c.label] for c in calls])
        out.update(
            accuracy=float(correct.mean()),
            balanced_accuracy=balanced_accuracy(truth, predicted, classes),
            unflagged_accuracy=float(correct[~review].mean()) if (~review).any() else None,
            unflagged_cells=int((~review).sum()),
            expected_calibration_error=expected_calibration_error(confidence, correct),
        )
    return out


def report(args):
    from napari_cytodiffusion.core.model.checkpoint import load_model_file

    model = load_model_file(SHIPPED, "cpu")
    reference = model.calibration["domain"]
    pbc = load("pbc_test_features")
    sets = {"wbc_dataset1": load("dataset1"), "cbc_train": load("cbc_train")}
    out = {"model_sha256_note": "the shipped file (fit, fit-sharpness and fit-colour --write)"}
    pbc_cell, pbc_smear = _parts(reference, pbc)
    pbc_score = np.fmax(pbc_cell, pbc_smear)
    out["pbc_test_domain_flagged"] = float(np.mean(pbc_score > 1))
    out["pbc_test_sharpness_median"] = float(np.median(_sharpness(pbc)))
    for name, data in sets.items():
        cell, smear = _parts(reference, data)
        score = np.fmax(cell, smear)
        positive = np.r_[np.ones(len(score)), np.zeros(len(pbc_score))]
        out[name] = {
            "cells": len(score),
            "domain_auroc_vs_pbc_test": auroc(positive, np.r_[score, pbc_score]),
            "cell_part_auroc": auroc(positive, np.r_[cell, pbc_cell]),
            "smear_part_auroc": auroc(positive, np.r_[smear, pbc_smear]),
            "domain_flagged": float(np.mean(score > 1)),
            "domain_median": float(np.median(score)),
            "sharpness_median": float(np.median(_sharpness(data))),
        }
    both = {
        key: np.r_[sets["wbc_dataset1"][key], sets["cbc_train"][key]]
        for key in ("features", "colours", "crops")
    }
    score = np.fmax(*_parts(reference, both))
    out["dataset1_and_cbc_domain_auroc_vs_pbc_test"] = auroc(
        np.r_[np.ones(len(score)), np.zeros(len(pbc_score))], np.r_[score, pbc_score]
    )
    test = load("pbc_test")
    truth = [model.classes[i] for i in test["labels"][test["scored"]]]
    out["pbc_test_cache"] = _flag_report(_calls(model, test), truth, model.classes)
    d1 = load("dataset1")
    d1_truth = list(d1["labels"][d1["scored"]])
    out["dataset1_cache"] = _flag_report(_calls(model, d1), d1_truth, sorted(set(d1_truth)))
    out["note"] = (
        "Domain AUROC on every cell of each set (encoder features and smear colours); the "
        "_cache entries replay the adaptive schedule on 12-trial exhaustive errors (seed 0) of "
        "the stratified PBC test subset (30 per class) and of 100 dataset-1 cells. "
        "The end-to-end numbers (64 trials, live) are in classification_cpu_*.json and "
        "classification_dataset1.json."
    )
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="part", required=True)
    f = sub.add_parser("fit")
    f.add_argument("--method", default="null_gain")
    f.add_argument("--write", action="store_true")
    s = sub.add_parser("fit-sharpness")
    s.add_argument("--write", action="store_true")
    c = sub.add_parser("fit-colour")
    c.add_argument("--write", action="store_true")
    sub.add_parser("report")
    args = parser.parse_args()
    parts = {
        "fit": fit,
        "fit-sharpness": fit_sharpness,
        "fit-colour": fit_colour,
        "report": report,
    }
    result = parts[args.part](args)
    result["hardware"] = "2-core CPU shared with other developers' jobs"
    out = RESULTS / f"review_{args.part.replace('-', '_')}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
