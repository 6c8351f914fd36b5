"""Counterfactual edits: do they keep the cell, and do they reach the target class?

On PBC validation cells (never the test split: the edit settings are tuned on these), each
cell is edited towards every class with ``counterfactual_image`` and measured two ways:

* self-edit RMSE: the edit towards the cell's own (true) class against the cell, in pixel
  units of [0, 1] RGB; an edit that keeps the cell gives the cell back (0);
* target-hit rate: how often the diffusion classifier (``classify_crops``, adaptive, seed 0)
  calls an edit towards another class that class.

    python benchmarks/counterfactual.py --label after --methods noise invert \\
        --strengths 0.4 0.6 0.8 --per-class 8

Each run is merged into benchmarks/results/counterfactual.json under its label (one label
per code version: the numbers "before" were made by the code before the change) and the
tables are written to benchmarks/results/counterfactual.md.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, add_float32_option, pbc_records  # noqa: E402

from napari_cytodiffusion.core.model.diffusion import network_precision  # noqa: E402

RBC_DIAMETER = 29.0  # PBC's red-cell diameter in pixels (360 x 363 px images)
OUT = RESULTS / "counterfactual.json"


def val_cells(model, per_class, seed=0):
    """(crops, classes): ``per_class`` random val cells of every class, normalised."""
    from napari_cytodiffusion.core.io import read_image
    from napari_cytodiffusion.core.smear.crops import normalised_cell

    records = pbc_records("val")
    rng = np.random.default_rng(seed)
    crops, labels = [], []
    for name in model.classes:
        members = [r for r in records if r.label == name]
        for i in sorted(rng.choice(len(members), min(per_class, len(members)), replace=False)):
            image = read_image(members[i].path)
            crops.append(normalised_cell(image, model.image_size, RBC_DIAMETER))
            labels.append(name)
    return np.stack(crops), labels


def run_setting(model, crops, labels, method, strength, steps, guidance):
    """Edits of every cell towards every class, their RMSEs and the classifier's calls."""
    from napari_cytodiffusion.core.model.classifier import classify_crops
    from napari_cytodiffusion.core.model.counterfactual import counterfactual_image

    classes = tuple(model.classes)
    started = time.perf_counter()
    edits = np.zeros((len(crops), len(classes), *crops.shape[1:]), np.float32)
    for i, (crop, source) in enumerate(zip(crops, labels, strict=True)):
        for k, target in enumerate(classes):
            edits[i, k] = counterfactual_image(
                model, crop, target, source, strength, steps, guidance, method, seed=i
            )
    seconds_per_edit = (time.perf_counter() - started) / (len(crops) * len(classes))
    calls = classify_crops(model, edits.reshape(-1, *crops.shape[1:]), seed=0)
    called = np.array([call.label for call in calls]).reshape(len(crops), len(classes))
    rmse = np.sqrt(((edits - crops[:, None]) ** 2).mean(axis=(2, 3, 4)))
    own = np.array([classes.index(label) for label in labels])
    rows = np.arange(len(crops))
    other = np.ones_like(rmse, bool)
    other[rows, own] = False
    hit = called == np.array(classes)[None, :]
    per_class = {}
    for k, name in enumerate(classes):
        mine = own == k
        per_class[name] = {
            "self_edit_rmse": float(rmse[mine, k].mean()),
            "self_edit_keeps_class": float(hit[mine, k].mean()),
            "target_hit_rate": float(hit[~mine, k].mean()),
        }
    return {
        "method": method,
        "strength": strength,
        "steps": steps,
        "guidance": guidance,
        "self_edit_rmse": float(rmse[rows, own].mean()),
        "self_edit_keeps_class": float(hit[rows, own].mean()),
        "target_hit_rate": float(hit[other].mean()),
        "other_edit_rmse": float(rmse[other].mean()),
        "seconds_per_edit": seconds_per_edit,
        "per_class": per_class,
    }


def markdown(report):
    """The tables of counterfactual.md, one row per (label, method, strength)."""
    lines = [
        "# Counterfactual edits on PBC validation cells",
        "",
        "Made by `benchmarks/counterfactual.py`; numbers in `counterfactual.json`. Self-edit "
        "RMSE: the edit towards the cell's own class against the cell (pixels in [0, 1]). "
        "Target hit: the classifier calls an edit towards another class that class. Other-edit "
        "RMSE: how far edits towards other classes move from the cell. Timings are on a "
        "shared, busy 2-core CPU: compare them within a run only.",
        "",
        "The classifier calls "
        + ", ".join(
            f"{run['classifier_accuracy_on_the_cells']:.3f} of the unedited cells right ({label})"
            for label, run in report["runs"].items()
        )
        + ": a self-edit that gives the cell back keeps the class only where that call does.",
        "",
        "| run | method | strength | guidance | self-edit RMSE | self-edit keeps class | "
        "target hit | other-edit RMSE | s per edit |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, run in report["runs"].items():
        for s in run["settings"]:
            lines.append(
                f"| {label} | {s['method']} | {s['strength']} | {s['guidance']} | "
                f"{s['self_edit_rmse']:.3f} | {s['self_edit_keeps_class']:.2f} | "
                f"{s['target_hit_rate']:.2f} | {s['other_edit_rmse']:.3f} | "
                f"{s['seconds_per_edit']:.2f} |"
            )
    for label, run in report["runs"].items():
        default = run.get("default")
        chosen = [
            s
            for s in run["settings"]
            if default and (s["method"], s["strength"]) == (default["method"], default["strength"])
        ]
        if not chosen:
            continue
        setting = chosen[0]
        lines += [
            "",
            f"## Per class, {label}: the default edit ({setting['method']}, strength "
            f"{setting['strength']})",
            "",
            "| class | self-edit RMSE | self-edit keeps class | target hit (edits towards it) |",
            "|---|---|---|---|",
        ]
        for name, row in setting["per_class"].items():
            lines.append(
                f"| {name} | {row['self_edit_rmse']:.3f} | {row['self_edit_keeps_class']:.2f} | "
                f"{row['target_hit_rate']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None):
    import torch

    from napari_cytodiffusion.core.model import counterfactual
    from napari_cytodiffusion.core.model.weights import load_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True, help="name of this code version's run")
    parser.add_argument("--methods", nargs="+", default=list(counterfactual.EDIT_METHODS))
    parser.add_argument("--strengths", nargs="+", type=float, default=[0.4, 0.6, 0.8])
    parser.add_argument("--guidance", type=float, default=counterfactual.DEFAULT_EDIT_GUIDANCE)
    parser.add_argument("--steps", type=int, default=counterfactual.DEFAULT_EDIT_STEPS)
    parser.add_argument("--per-class", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    add_float32_option(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_model("default", device="cpu")
    crops, labels = val_cells(model, args.per_class)
    calls = counterfactual_free_calls(model, crops)
    settings = []
    for method in args.methods:
        for strength in args.strengths:
            setting = run_setting(model, crops, labels, method, strength, args.steps, args.guidance)
            print(json.dumps({k: v for k, v in setting.items() if k != "per_class"}), flush=True)
            settings.append(setting)
    report = json.loads(OUT.read_text()) if OUT.is_file() else {"runs": {}}
    report["runs"][args.label] = {
        "cells": len(crops),
        "cells_per_class": args.per_class,
        "network_precision": network_precision("cpu"),
        "classifier_accuracy_on_the_cells": float(np.mean(np.array(calls) == np.array(labels))),
        "default": {
            "method": getattr(counterfactual, "DEFAULT_EDIT_METHOD", "noise"),
            "strength": counterfactual.DEFAULT_STRENGTH,
        },
        "settings": settings,
    }
    report["note"] = (
        f"PBC val cells, normalised_cell(image, {model.image_size}, {RBC_DIAMETER}); "
        f"{args.steps} sampler steps over the schedule, edit seed = cell number, "
        "classifier adaptive with seed 0, CPU single-threaded."
    )
    OUT.write_text(json.dumps(report, indent=1))
    (RESULTS / "counterfactual.md").write_text(markdown(report))
    print(f"wrote {OUT}")


def counterfactual_free_calls(model, crops):
    """The classifier's calls on the unedited cells (how well it knows these cells)."""
    from napari_cytodiffusion.core.model.classifier import classify_crops

    return [call.label for call in classify_crops(model, crops, seed=0)]


if __name__ == "__main__":
    main()
