"""What adapting buys on another lab's cells, and what it costs in the original domain.

    python benchmarks/adaptation.py [--draws 3] [--k 5,10,25] [--pbc 200] [--resume]

On ``segmentation_wbc_dataset1`` (another microscope, camera and rapid stain; 5 classes):
for K cells per class (at most half of a class, so every class keeps cells to score; the
dataset's single basophil cannot be split and is left out) and several random draws, the
lab's cells are written as class folders and the shipped model is adapted with the
``adapt`` task exactly as a user runs it (300 steps, 30 % of the K cells held back for
calibration, one red-cell scale for the lab's images). Every cell not drawn is then
classified by the adapted model, as ``classify`` does several single-cell images (one scale
shared by all): balanced accuracy, accuracy of the calls left unflagged, share flagged (and
of them, unlike the training smears, which for an adapted model are the lab's), and the wall
time of adapting (normalising, training, calibrating). The base model is scored on the same
cells. The model adapted on the first draw of the largest K is also scored on a stratified
sample of PBC test cells against the base model: what adapting costs there, and whether the
adapted model says that these are not its lab's cells. Results:
benchmarks/results/adaptation.json and .md.

The dataset holds some cells twice (the same cell photographed or cut out again, one pair of
them with two different labels; ``datasets.copy_groups`` finds them, as ``adapt`` does). A
cell's copies are drawn together, so that no scored cell was seen while adapting, and cells
whose copies disagree on the class are left out.
"""

import argparse
import csv
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import DATA, RESULTS, pbc_records  # noqa: E402
from _metrics import balanced_accuracy  # noqa: E402

from napari_cytodiffusion.core.datasets import (  # noqa: E402
    copy_groups,
    disagreeing_copies,
    has_a_copy,
    pick_whole_copies,
)
from napari_cytodiffusion.core.model.diffusion import network_precision  # noqa: E402

DATASET = DATA / "segmentation_wbc_dataset1"
NAMES = {1: "neutrophil", 2: "lymphocyte", 3: "monocyte", 4: "eosinophil", 5: "basophil"}


def lab_cells():
    """(paths, labels, normalised crops, copy groups) of the dataset's cells, the basophil
    and cells whose copies disagree on their class left out, and the left-out image ids."""
    with open(DATASET / "class_labels.csv", newline="") as handle:
        rows = [row for row in csv.reader(handle)][1:]
    paths, labels = [], []
    for image_id, label in rows:
        if NAMES[int(label)] != "basophil":
            paths.append(DATASET / f"{int(image_id):03d}_image.png")
            labels.append(NAMES[int(label)])
    labels, cells = np.array(labels), cell_crops(paths)
    groups = copy_groups(cells.crops)
    agreed = ~disagreeing_copies(labels, groups)
    left_out = [paths[i].name for i in np.flatnonzero(~agreed)]
    keep = np.flatnonzero(agreed)
    return [paths[i] for i in keep], labels[keep], cells[keep], groups[keep], left_out


def cell_crops(paths):
    """Normalised central-cell crops and their smears' colour references (n, 9), as
    ``classify`` makes them for several single-cell images: one red-cell scale shared by
    all of them (the domain-shift score needs the colour references)."""
    from napari_cytodiffusion.core.io import read_image
    from napari_cytodiffusion.core.smear.crops import central_cell_site
    from napari_cytodiffusion.core.smear.prepare import prepare_smear
    from napari_cytodiffusion.core.tasks.classify import shared_rbc_diameter

    scale = shared_rbc_diameter(paths)
    crops, colours = [], []
    for path in paths:
        smear = prepare_smear(read_image(path), scale)
        crops.append(central_cell_site(smear).crop(smear.rgb, 64))
        colours.append(smear.colour_map.statistics())
    return Cells(np.stack(crops), np.stack(colours))


@dataclass
class Cells:
    crops: np.ndarray
    colours: np.ndarray

    def __getitem__(self, index):
        return Cells(self.crops[index], self.colours[index])


def draw(labels, groups, k, seed):
    """Indices of K cells per class (at most half of each class) for adapting, a cell's
    copies drawn together."""
    rng = np.random.default_rng(seed)
    picked = []
    for name in sorted(set(labels)):
        members = np.flatnonzero(labels == name)
        picked += pick_whole_copies(members, groups, min(k, len(members) // 2), rng)
    return np.sort(picked)


def score(model, cells, labels):
    from napari_cytodiffusion.core.model.classifier import classify_crops

    calls = classify_crops(model, cells.crops, colour_statistics=cells.colours)
    predicted = np.array([call.label for call in calls])
    kept = ~np.array([call.needs_review for call in calls])
    unfamiliar = np.array([call.domain_shift for call in calls], float) > 1
    correct = predicted == labels
    return {
        "cells": len(labels),
        "balanced_accuracy": round(balanced_accuracy(labels, predicted, sorted(set(labels))), 4),
        "accuracy": round(float(correct.mean()), 4),
        "unflagged_accuracy": round(float(correct[kept].mean()), 4) if kept.any() else None,
        "flagged_fraction": round(float(1 - kept.mean()), 4),
        "unlike_training_smears_fraction": round(float(unfamiliar.mean()), 4),
        "confidently_wrong": int(np.sum(~correct & kept)),
    }


def adapt_once(paths, labels, picked, name, seed, **settings):
    """Adapt the shipped model to the picked cells as ``adapt`` does; ``settings``: other
    fields of the request (for settings compared by other benchmarks)."""
    from napari_cytodiffusion.core.tasks.adapt import AdaptRequest, adapt_model

    with tempfile.TemporaryDirectory() as folder:
        for i in picked:
            target = Path(folder) / labels[i] / paths[i].name
            target.parent.mkdir(exist_ok=True)
            os.symlink(paths[i], target)
        started = time.perf_counter()
        result = adapt_model(
            # replace: a model of this name left by an earlier, stopped run is made again
            AdaptRequest(folder, name, seed=seed, device="cpu", replace=True, **settings),
            log=lambda _: 0,
        )
        return result, time.perf_counter() - started


def pbc_sample(n):
    records = pbc_records("test")
    rng = np.random.default_rng(0)
    classes = sorted({r.label for r in records})
    per_class = max(1, n // len(classes))
    chosen = []
    for name in classes:
        members = [r for r in records if r.label == name]
        chosen += [members[i] for i in rng.permutation(len(members))[:per_class]]
    return cell_crops([r.path for r in chosen]), np.array([r.label for r in chosen])


def summarise(runs):
    out = {}
    for k in sorted({run["k"] for run in runs}):
        chosen = [run for run in runs if run["k"] == k]
        entry = {"draws": len(chosen)}
        for key in (
            "balanced_accuracy",
            "unflagged_accuracy",
            "flagged_fraction",
            "unlike_training_smears_fraction",
            "seconds",
        ):
            values = np.array([run[key] for run in chosen if run[key] is not None], float)
            entry[key] = {
                "mean": round(float(values.mean()), 4),
                "sd": round(float(values.std()), 4),
            }
        out[str(k)] = entry
    return out


def write_markdown(results):
    lines = [
        "# Adapting to another lab's cells",
        "",
        f"Data: `segmentation_wbc_dataset1` (another microscope and rapid stain), "
        f"{results['lab_cells']} cells of 4 classes (the single basophil left out). "
        f"Hardware: {results['environment']['cpu']}, {results['environment']['cores']} cores, "
        f"CPU only, network in {results['environment'].get('network_precision', 'float32')}. "
        "Generated by `benchmarks/adaptation.py` on "
        f"{results['date']}.",
        "",
        "| model | K per class | draws | balanced accuracy | unflagged accuracy | flagged | "
        "of them unlike the training smears | adapt wall time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base = results["base"]
    unflagged = base["unflagged_accuracy"]
    unflagged = "none left unflagged" if unflagged is None else f"{unflagged:.3f}"
    lines.append(
        f"| shipped (not adapted) | 0 | - | {base['balanced_accuracy']:.3f} | {unflagged} | "
        f"{100 * base['flagged_fraction']:.0f}% | "
        f"{100 * base.get('unlike_training_smears_fraction', float('nan')):.0f}% | - |"
    )
    for k, entry in results["summary"].items():

        def cell(key, scale=1.0, digits=3, entry=entry):
            value = entry[key]
            return f"{scale * value['mean']:.{digits}f} ± {scale * value['sd']:.{digits}f}"

        lines.append(
            f"| adapted | {k} | {entry['draws']} | {cell('balanced_accuracy')} | "
            f"{cell('unflagged_accuracy')} | {cell('flagged_fraction', 100, 0)}% | "
            f"{cell('unlike_training_smears_fraction', 100, 0)}% | "
            f"{cell('seconds', 1, 0)} |"
        )
    pbc = results.get("pbc_test")
    if pbc:
        lines += [
            "",
            f"PBC test ({pbc['base']['cells']} cells, stratified): balanced accuracy "
            f"{pbc['base']['balanced_accuracy']:.3f} shipped, "
            f"{pbc['adapted']['balanced_accuracy']:.3f} after adapting to dataset1 "
            f"(K = {pbc['k']}, first draw). The adapted model flags "
            f"{100 * pbc['adapted']['flagged_fraction']:.0f}% of these cells "
            f"({100 * pbc['adapted']['unlike_training_smears_fraction']:.0f}% as unlike the "
            f"training smears, which for it are the lab's) and leaves "
            f"{pbc['adapted']['confidently_wrong']} wrong calls unflagged; the shipped model "
            f"leaves {pbc['base']['confidently_wrong']}.",
        ]
    lines += [
        "",
        "K is capped at half of a class (eosinophils: 22 cells, so at most 11 adapt). Scored "
        "cells are all cells not drawn; they differ between draws. Each cell is scored with "
        "its smear's colour references, as `classify` does.",
        "",
        f"{results['copies']['cells_with_a_copy']} cells are in the dataset more than once "
        "(the same cell imaged or cut out again); a cell's copies are drawn together, so no "
        "scored cell was seen while adapting. Left out because their copies carry different "
        f"labels: {', '.join(results['copies']['left_out_disagreeing']) or 'none'}.",
    ]
    if results.get("note"):
        lines += ["", results["note"]]
    (RESULTS / "adaptation.md").write_text("\n".join(lines) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--k", default="5,10,25")
    parser.add_argument("--pbc", type=int, default=200, help="PBC test cells (0: skip)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the base score and the runs already in adaptation.json (and their models)",
    )
    args = parser.parse_args()
    import torch

    from napari_cytodiffusion.core.model.weights import CACHE_ENV, load_model

    torch.set_num_threads(os.cpu_count() or 1)
    # The adapted models are registered here, not in the user's cache; kept for --resume.
    cache = Path(tempfile.gettempdir()) / "cytodiffusion_adaptation_bench"
    if not args.resume:
        shutil.rmtree(cache, ignore_errors=True)
    os.environ[CACHE_ENV] = str(cache)
    paths, labels, crops, groups, left_out = lab_cells()
    base = load_model("default", "cpu")
    saved = RESULTS / "adaptation.json"
    if args.resume and saved.is_file():
        results = json.loads(saved.read_text())
    else:
        results = {"lab_cells": len(labels), "base": score(base, crops, labels), "runs": []}
    results["copies"] = {
        "cells_with_a_copy": int(np.sum(has_a_copy(groups))),
        "left_out_disagreeing": left_out,
    }
    results["environment"] = {
        "cpu": platform.machine(),
        "cores": os.cpu_count(),
        "network_precision": network_precision("cpu"),
    }
    print("base", results["base"], flush=True)
    ks = [int(k) for k in args.k.split(",")]
    done = {(run["k"], run["draw"]) for run in results["runs"]}
    for k in ks:
        for seed in range(args.draws):
            if (k, seed) in done:
                continue
            picked = draw(labels, groups, k, seed)
            name = f"dataset1-k{k}-draw{seed}"
            result, seconds = adapt_once(paths, labels, picked, name, seed)
            rest = np.setdiff1d(np.arange(len(labels)), picked)
            measured = score(load_model(name, "cpu"), crops[rest], labels[rest])
            run = {"k": k, "draw": seed, "adapted_cells": len(picked), "seconds": round(seconds, 1)}
            run.update(measured)
            run["held_back_balanced_accuracy"] = round(result.held_back_balanced_accuracy, 4)
            run["date"] = time.strftime("%Y-%m-%d %H:%M")
            results["runs"].append(run)
            print(run, flush=True)
            # Saved after every run: a long benchmark stopped part way keeps what it measured.
            results["summary"] = summarise(results["runs"])
            results["date"] = time.strftime("%Y-%m-%d %H:%M")
            saved.write_text(json.dumps(results, indent=1))
    results["summary"] = summarise(results["runs"])
    if args.pbc:
        pbc_crops, pbc_labels = pbc_sample(args.pbc)
        results["pbc_test"] = {
            "k": max(ks),
            "base": score(base, pbc_crops, pbc_labels),
            "adapted": score(
                load_model(f"dataset1-k{max(ks)}-draw0", "cpu"), pbc_crops, pbc_labels
            ),
        }
        print(results["pbc_test"], flush=True)
    results["date"] = time.strftime("%Y-%m-%d %H:%M")
    saved.write_text(json.dumps(results, indent=1))
    write_markdown(results)


if __name__ == "__main__":
    main()
