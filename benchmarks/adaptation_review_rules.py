"""What the review flag of a model adapted on a few cells is made of, and whether refitting its
parts otherwise would flag fewer of the lab's cells without leaving more wrong calls unflagged.

    python benchmarks/adaptation_review_rules.py collect [--k 25] [--draws 3,4,5]
    python benchmarks/adaptation_review_rules.py compare [--out adaptation_review_rules.json]

``collect`` adapts the shipped model exactly as ``benchmarks/adaptation.py`` does (its
``draw``, ``adapt_once`` and scored cells) and keeps, per draw, what the calibration was fitted
on (the held-back cells' exhaustive errors and labels, the base calibration) and the raw
errors, domain-shift scores and chromatin areas of every scored cell, in
work_data/review_rules/ (the adapted models too, so a draw is adapted once). ``compare``
replays the scored cells' calls under the calibration as adapted and under variants refitted
from the held-back cells alone:

* the inverse temperature's prior towards the base's worth 5 or 25 cells instead of 1;
* the anomaly threshold (1 % false alarms) set on cross-fitted scores of the held-back cells
  (5 folds, each fold scored by a reference fitted without it) instead of their in-sample
  scores, since a class's reference rests on 3-8 of those same cells.

Per draw: accuracy of the unflagged calls, share flagged, confidently wrong calls and the
flags by reason; and the confidently wrong calls by image, to look at. Results:
benchmarks/results/OUT.

``--tag NAME`` keeps a run's files in their own sub-folder, for a variant of the adapting code
tried on the same draws; ``compare --note`` says in the results how its models were adapted.
"""

import argparse
import functools
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import adaptation as bench  # noqa: E402
from _common import RESULTS  # noqa: E402
from _metrics import balanced_accuracy  # noqa: E402

WORK = Path(__file__).parents[1] / "work_data" / "review_rules"
FOLDS = 5
LAB_CLASSES = sorted(bench.NAMES[i] for i in (1, 2, 3, 4))  # the basophil is left out


def collect(k, draws):
    from napari_cytodiffusion.core.model import calibration, classifier
    from napari_cytodiffusion.core.model.weights import CACHE_ENV, load_model

    os.environ[CACHE_ENV] = str(WORK / "cache")
    captured = {}
    fit, make_calls = calibration.fit_calibration, classifier.calls_from_errors

    def capture_fit(model, errors, labels, base=None, bias_cells=None):
        captured.update(held_errors=errors, held_labels=np.asarray(labels))
        captured["base_calibration"] = json.dumps(base)
        return fit(model, errors, labels, base=base, bias_cells=bias_cells)

    def capture_calls(model, errors, spent, *args, domain_shift=None, chromatin_area=None, **kw):
        captured.update(errors=errors, spent=spent, shift=domain_shift, area=chromatin_area)
        return make_calls(
            model,
            errors,
            spent,
            *args,
            domain_shift=domain_shift,
            chromatin_area=chromatin_area,
            **kw,
        )

    calibration.fit_calibration = capture_fit
    classifier.calls_from_errors = capture_calls
    paths, labels, crops, groups, _ = bench.lab_cells()
    WORK.mkdir(parents=True, exist_ok=True)
    for seed in draws:
        saved = WORK / f"k{k}_draw{seed}.npz"
        kept = dict(np.load(saved)) if saved.is_file() else {}
        picked = bench.draw(labels, groups, k, seed)
        name = f"k{k}-rules-{seed}"
        if "held_errors" not in kept:
            bench.adapt_once(paths, labels, picked, name, seed)
            kept.update(captured)
        model = load_model(name, "cpu")
        rest = np.setdiff1d(np.arange(len(labels)), picked)
        classifier.classify_crops(model, crops.crops[rest], colour_statistics=crops.colours[rest])
        kept.update({key: captured[key] for key in ("errors", "spent", "shift", "area")})
        kept.update(
            model_calibration=json.dumps(model.calibration),
            labels=labels[rest],
            images=np.array([paths[i].name for i in rest]),
        )
        np.savez(saved, **kept)
        print(seed, "saved", flush=True)


def _model_with(calibration):
    """The shipped network's class list with a given calibration: all a replay needs (the
    network is loaded once; each replay sets its own calibration)."""
    model = _shipped_model()
    model.calibration = json.loads(calibration)
    return model


@functools.cache
def _shipped_model():
    from napari_cytodiffusion.core.model.weights import load_model

    return load_model("default", "cpu")


class HeldBack:
    """The held-back cells of a draw, replayed as the calibration sees them."""

    def __init__(self, saved, model):
        from napari_cytodiffusion.core.model.classifier import (
            evidence,
            replay_adaptive,
            trial_timesteps,
        )

        self.base = json.loads(str(saved["base_calibration"]))
        self.labels = saved["held_labels"]
        replayed, _ = replay_adaptive(model, saved["held_errors"])
        self.errors, self.null = replayed[:, :, :-1], replayed[:, :, -1]
        self.timesteps = trial_timesteps(self.errors.shape[1])
        self.against, self.best = evidence(model, self.errors)


def with_temperature_prior(model, held, prior_cells):
    """``model`` with the temperature refitted under a prior worth ``prior_cells`` cells (the
    calibration's own fit, its prior's spread narrowed from one cell's), and the uncertainty
    threshold refitted under it (never more lenient than the base's)."""
    from napari_cytodiffusion.core.model import calibration

    one_cell = calibration.TEMPERATURE_PRIOR_SD
    calibration.TEMPERATURE_PRIOR_SD = one_cell / np.sqrt(prior_cells)
    try:
        beta = calibration._fit_inverse_temperature(
            held.against, held.labels, held.base["inverse_temperature"]
        )
    finally:
        calibration.TEMPERATURE_PRIOR_SD = one_cell
    probabilities = calibration._softmax(-held.against * beta)
    uncertainty = calibration._normalised_entropy(probabilities)
    threshold = calibration._review_threshold(uncertainty, held.best == held.labels)
    model.calibration["inverse_temperature"] = beta
    model.calibration["uncertainty_threshold"] = min(threshold, held.base["uncertainty_threshold"])
    return model


def with_cross_fitted_anomaly_threshold(model, held):
    """``model`` with its anomaly threshold set on cross-fitted scores of the held-back cells."""
    from napari_cytodiffusion.core.model import anomaly
    from napari_cytodiffusion.core.model.calibration import ANOMALY_FALSE_ALARM, ANOMALY_METHOD

    folds = np.zeros(len(held.labels), int)
    rng = np.random.default_rng(0)
    for c in np.unique(held.labels):
        members = np.flatnonzero(held.labels == c)
        folds[rng.permutation(members)] = np.arange(len(members)) % FOLDS
    scores = np.zeros(len(held.labels))
    for fold in np.unique(folds):
        out, kept = folds == fold, folds != fold
        reference = anomaly.fit_reference(
            ANOMALY_METHOD,
            held.errors[kept],
            held.null[kept],
            held.labels[kept],
            held.timesteps,
            held.base.get("anomaly"),
        )
        scores[out] = anomaly.score(
            reference, held.errors[out], held.null[out], held.best[out], held.timesteps
        )
    model.calibration["anomaly_threshold"] = float(
        np.quantile(np.nan_to_num(scores), 1 - ANOMALY_FALSE_ALARM)
    )
    return model


def scored(model, saved):
    from napari_cytodiffusion.core.model.classifier import calls_from_errors

    calls = calls_from_errors(
        model,
        saved["errors"],
        saved["spent"],
        domain_shift=saved["shift"],
        chromatin_area=saved["area"],
    )
    called = np.array([c.label for c in calls])
    correct = called == saved["labels"]
    kept = ~np.array([c.needs_review for c in calls])
    reasons = {}
    for call in calls:
        for reason in filter(None, call.why.split("; ")):
            reasons[reason] = reasons.get(reason, 0) + 1
    wrong = np.flatnonzero(kept & ~correct)
    return {
        "balanced_accuracy": round(balanced_accuracy(saved["labels"], called, LAB_CLASSES), 4),
        "unflagged_accuracy": round(float(correct[kept].mean()), 4) if kept.any() else None,
        "flagged": round(float(1 - kept.mean()), 4),
        "confidently_wrong": len(wrong),
        "flags_by_reason": reasons,
        "inverse_temperature": round(model.calibration["inverse_temperature"], 2),
        "uncertainty_threshold": round(model.calibration["uncertainty_threshold"], 4),
        "anomaly_threshold": round(model.calibration["anomaly_threshold"], 2),
        "confidently_wrong_cells": [
            f"{saved['images'][i]}: {saved['labels'][i]} called {called[i]}" for i in wrong
        ],
    }


def compare(out, note):
    variants = {
        "as adapted": lambda model, held: model,
        "temperature prior worth 5 cells": lambda m, h: with_temperature_prior(m, h, 5),
        "temperature prior worth 25 cells": lambda m, h: with_temperature_prior(m, h, 25),
        "cross-fitted anomaly threshold": with_cross_fitted_anomaly_threshold,
    }
    rows = []
    for path in sorted(WORK.glob("k*_draw*.npz")):
        saved = np.load(path)
        row = {"run": path.stem}
        for name, change in variants.items():
            model = _model_with(str(saved["model_calibration"]))
            held = HeldBack(saved, model)
            row[name] = scored(change(model, held), saved)
            row["held_back_cells"] = len(held.labels)
            row["held_back_wrong"] = int(np.sum(held.best != held.labels))
        rows.append(row)
        print(json.dumps(row), flush=True)
    measured = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "environment": f"{platform.machine()}, {os.cpu_count()} cores, CPU only",
        "adapted_with": note or "the shipped adapting code",
        "rows": rows,
    }
    (RESULTS / out).write_text(json.dumps(measured, indent=1))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=("collect", "compare"))
    parser.add_argument("--k", type=int, default=25)
    parser.add_argument("--draws", default="3,4,5")
    parser.add_argument("--out", default="adaptation_review_rules.json")
    parser.add_argument("--tag", default="", help="a sub-folder of work_data/review_rules")
    parser.add_argument("--note", default="", help="compare: how the tag's models were adapted")
    args = parser.parse_args()
    global WORK
    WORK = WORK / args.tag
    if args.step == "collect":
        collect(args.k, [int(d) for d in args.draws.split(",")])
    else:
        compare(args.out, args.note)


if __name__ == "__main__":
    main()
