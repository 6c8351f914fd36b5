"""The same cells under a dimmer lamp: do the calls and their confidence stay?

White balance divides a smear's brightness out of every crop, so a lamp turned down (or a
shorter exposure) should change nothing. Each image is scaled by a factor (1, 0.7, 0.4, as
8-bit values) and classified through the user's path (``tasks.classify.classify``, no scale
given): PBC **test** single-cell images (5 per class), every 10th image of WBC dataset 1 (30
cells of another lab) and the bundled CBC sample fields (segmented). Per set and factor:
calls that agree with the factor-1 calls, the median change of the top probability, the
median domain-shift score, the share flagged as unlike the training smears, and (where the
truth is known) accuracy, mean top probability and expected calibration error.

``python benchmarks/exposure.py [--out NAME]``: ``benchmarks/results/exposure[_NAME].json``.
Run with ``PYTHONPATH=<an older checkout>/src`` to measure an earlier version.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS  # noqa: E402
from _metrics import expected_calibration_error  # noqa: E402
from _sets import dataset1_records, pbc_stratified  # noqa: E402

FACTORS = (1.0, 0.7, 0.4)
SAMPLES = ("cbc_lymphocyte", "cbc_monocyte_eosinophil")


def cell_sets():
    """{set: [(image path, true class or None, segment?)]}."""
    from napari_cytodiffusion._sample_data import sample_path

    pbc = [(r.path, r.label, False) for r in pbc_stratified("test", 5)]
    dataset1 = [(path, label, False) for path, label in dataset1_records(30)]
    samples = [(sample_path(name), None, True) for name in SAMPLES]
    return {"pbc_test": pbc, "wbc_dataset1": dataset1, "cbc_samples": samples}


def classify_all(model, records, factor):
    """[(call, truth)] of every cell of ``records`` with each image scaled by ``factor``."""
    from napari_cytodiffusion.core.io import read_image
    from napari_cytodiffusion.core.tasks.classify import classify

    out = []
    for path, truth, segment in records:
        image = read_image(path).astype(np.float64)
        dimmed = np.round(image * factor).astype(np.uint8)
        result = classify(dimmed, model, segment=segment)
        out += [(call, truth) for call in result.calls]
    return out


def summary(calls, reference):
    top = np.array([c.probabilities[c.label] for c, _ in calls])
    labels = [c.label for c, _ in calls]
    row = {
        "cells": len(calls),
        "calls_as_at_full_exposure": float(
            np.mean([a == c.label for a, (c, _) in zip(reference["labels"], calls, strict=True)])
        ),
        "median_top_probability_change": float(np.median(np.abs(top - reference["top"]))),
        "median_domain_shift": float(np.nanmedian([c.domain_shift for c, _ in calls])),
        "flagged_unlike_training_smears": float(
            np.mean(["unlike the training smears" in c.why for c, _ in calls])
        ),
        "flagged": float(np.mean([c.needs_review for c, _ in calls])),
        "mean_top_probability": float(top.mean()),
    }
    truth = [t for _, t in calls]
    if all(t is not None for t in truth):
        correct = np.array([label == t for label, t in zip(labels, truth, strict=True)])
        row["accuracy"] = float(correct.mean())
        row["expected_calibration_error"] = expected_calibration_error(top, correct)
    return row, {"labels": labels, "top": top}


def main():
    import torch

    from napari_cytodiffusion.core.model.weights import load_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="", help="suffix of the results file")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model("default", device="cpu")
    report = {"factors": list(FACTORS), "sets": {}}
    started = time.perf_counter()
    for name, records in cell_sets().items():
        rows, reference = {}, None
        for factor in FACTORS:
            calls = classify_all(model, records, factor)
            if reference is None:
                _, reference = summary(calls, {"labels": [None] * len(calls), "top": 0.0})
            rows[str(factor)], _ = summary(calls, reference)
            print(name, factor, json.dumps(rows[str(factor)]), flush=True)
        report["sets"][name] = rows
    report["seconds"] = round(time.perf_counter() - started)
    report["hardware"] = "2-core CPU shared with other developers' jobs"
    suffix = f"_{args.out}" if args.out else ""
    out = RESULTS / f"exposure{suffix}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(out)


if __name__ == "__main__":
    main()
