"""Diffusion-classifier benchmarks on PBC's test split (never trained or tuned on).

Three parts, each writing benchmarks/results/classification_<part>.json:

``h100 DIR``
    Metrics of the H100 run made by ``gpu_classify_generate.py`` (its output folder DIR):
    the live adaptive run and the exhaustive reference on all 2,470 test cells, both turned
    into calls with the calibration shipped in the model, plus the GPU throughput.
``cpu --n N [--scale shared|per-image]``
    End to end on this machine's CPU: N test images read from disk, the central cell located
    and normalised, classified adaptively, one at a time; seconds per cell and the same
    metrics. The red-cell scale is estimated once for the batch (``shared``, what the CLI
    does for single-cell images) or from each image alone (``per-image``).
``dataset1 [--scale shared|per-image]``
    WBC dataset 1 (another microscope and rapid stain, 5 classes, never trained or tuned on)
    through the user's path: the scale estimated once for the folder as the CLI does for
    three or more single-cell images (``shared``), or from each image alone (``per-image``,
    what the widget does for one image), never given; each image prepared, its central cell
    located, normalised (the model's colour normalisation) and classified adaptively. The
    crops of all images are classified in one call (the same calls as one at a time).
``shift --n N``
    Cells unlike the training data: white cells of another hospital (CBC test fields, cut at
    their annotated boxes) and of another microscope and stain (segmentation_wbc_dataset1),
    against PBC test cells: how the anomaly score and the uncertainty rank them.

On a CPU with bfloat16 units (AMX or AVX-512 BF16) the network runs in bfloat16 autocast, as
for a user; ``--float32`` keeps it in float32 to compare.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import DATA, RESULTS, add_float32_option, pbc_records  # noqa: E402
from _metrics import auroc, call_metrics  # noqa: E402

from napari_cytodiffusion.core.classes import CLASSES  # noqa: E402
from napari_cytodiffusion.core.model.diffusion import network_precision  # noqa: E402
from napari_cytodiffusion.core.model.weights import load_model  # noqa: E402


def h100(args):
    from napari_cytodiffusion.core.model.classifier import calls_from_errors

    model = load_model("default", device="cpu")
    folder = Path(args.folder)
    report = {"gpu": json.loads((folder / "gpu_results.json").read_text())}
    for strategy in ("adaptive", "exhaustive"):
        run = np.load(folder / f"test_{strategy}.npz")
        errors = run["errors"][:, :, : model.num_classes]
        spent = run["spent"] if strategy == "adaptive" else np.full(len(errors), errors[0].size)
        calls = calls_from_errors(model, errors, spent)
        truth = [CLASSES[i] for i in run["labels"]]
        report[strategy] = call_metrics(calls, truth, CLASSES)
    report["evaluations_ratio_exhaustive_over_adaptive"] = (
        report["exhaustive"]["mean_unet_evals"] / report["adaptive"]["mean_unet_evals"]
    )
    report["note"] = (
        "Errors computed on one NVIDIA H100 80GB in bfloat16 (64 trials, seed 0); "
        "exhaustive = 64 trials x 8 classes per cell. Calibration fitted on the val split."
    )
    return report


def _test_records(n, seed=0):
    records = pbc_records("test")
    rng = np.random.default_rng(seed)
    return [records[i] for i in sorted(rng.choice(len(records), n, replace=False))]


def cpu(args):
    import torch

    from napari_cytodiffusion.core.io import read_image
    from napari_cytodiffusion.core.tasks.classify import classify, shared_rbc_diameter

    torch.set_num_threads(args.threads)
    model = load_model(args.model, device="cpu")
    if args.stratified:
        from _sets import pbc_stratified

        records = pbc_stratified("test", args.stratified)
    else:
        records = _test_records(args.n)
    # "shared": one scale for the batch, as the CLI does for single-cell images of one scanner.
    scale = shared_rbc_diameter([r.path for r in records]) if args.scale == "shared" else None
    calls, seconds, cpu_seconds = [], [], []
    for record in records:
        started, cpu_started = time.perf_counter(), time.process_time()
        result = classify(read_image(record.path), model, segment=False, rbc_diameter=scale)
        seconds.append(time.perf_counter() - started)
        cpu_seconds.append(time.process_time() - cpu_started)
        calls.extend(result.calls)
    report = call_metrics(calls, [r.label for r in records], CLASSES)
    report.update(
        seconds_per_cell_mean=float(np.mean(seconds)),
        seconds_per_cell_median=float(np.median(seconds)),
        seconds_per_cell_p90=float(np.percentile(seconds, 90)),
        # CPU time of this process (all its threads): less affected by other jobs than the
        # wall-clock time when the machine is shared.
        cpu_seconds_per_cell_mean=float(np.mean(cpu_seconds)),
        torch_threads=args.threads,
        red_cell_scale=args.scale if scale is None else f"shared: {scale:.1f} px",
        note="One cell at a time, end to end (read, locate, normalise, classify "
        "adaptively), on this machine's CPU (2 cores).",
    )
    return report


def dataset1(args):
    import torch
    from _sets import dataset1_records

    from napari_cytodiffusion.core.io import read_image
    from napari_cytodiffusion.core.model.classifier import classify_crops
    from napari_cytodiffusion.core.smear.crops import central_cell_site
    from napari_cytodiffusion.core.smear.prepare import prepare_smear
    from napari_cytodiffusion.core.tasks.classify import shared_rbc_diameter

    torch.set_num_threads(args.threads)
    model = load_model(args.model, device="cpu")
    records = dataset1_records()
    paths = [path for path, _ in records]
    truth = [label for _, label in records]
    scale = shared_rbc_diameter(paths) if args.scale == "shared" else None
    started = time.perf_counter()
    crops, colours, scales = [], [], []
    for path in paths:
        smear = prepare_smear(read_image(path), scale)
        crops.append(central_cell_site(smear).crop(smear.rgb, model.image_size))
        colours.append(smear.colour_map.statistics())
        scales.append(smear.rbc_diameter)
    calls = classify_crops(
        model, np.stack(crops), batch_size=64, colour_statistics=np.stack(colours)
    )
    seconds = (time.perf_counter() - started) / len(paths)
    classes = sorted(set(truth))
    report = call_metrics(calls, truth, classes)
    report.update(
        classes={c: truth.count(c) for c in classes},
        predicted={c: [x.label for x in calls].count(c) for c in CLASSES},
        red_cell_scale=args.scale if scale is None else f"shared: {scale:.1f} px",
        rbc_diameter_quartiles=np.percentile(scales, [25, 50, 75]).round(1).tolist(),
        domain_shift_median=float(np.nanmedian([c.domain_shift for c in calls])),
        seconds_per_cell=seconds,
        model=args.model,
        note="Balanced accuracy over the 5 classes of dataset 1 (one basophil among them). "
        "2-core CPU shared with other jobs; all crops classified in one batch.",
    )
    return report


def _cbc_cells(limit):
    """White cells of the CBC test fields, cut at the centre of their annotated boxes."""
    from napari_cytodiffusion.core.datasets import voc_boxes
    from napari_cytodiffusion.core.io import read_image
    from napari_cytodiffusion.core.smear.crops import crop_cell
    from napari_cytodiffusion.core.smear.image import to_rgb_float
    from napari_cytodiffusion.core.smear.scale import background_colour, estimate_rbc_diameter

    crops = []
    for xml in sorted((DATA / "cbc" / "test" / "annotations").glob("*.xml")):
        rgb = to_rgb_float(read_image(DATA / "cbc" / "test" / "images" / f"{xml.stem}.jpg"))
        scale, background = estimate_rbc_diameter(rgb), background_colour(rgb)
        for r0, c0, r1, c1 in voc_boxes(xml).get("WBC", []):
            centre = ((r0 + r1) / 2, (c0 + c1) / 2)
            crops.append(crop_cell(rgb, centre, scale, 64, background=background))
        if len(crops) >= limit:
            break
    return np.stack(crops[:limit])


def _other_microscope_cells(limit):
    from napari_cytodiffusion.core.io import read_image
    from napari_cytodiffusion.core.smear.crops import normalised_cell

    files = sorted((DATA / "segmentation_wbc_dataset1").glob("*_image.png"))[:limit]
    return np.stack([normalised_cell(read_image(f), 64) for f in files])


def shift(args):
    import torch

    from napari_cytodiffusion.core.io import read_image
    from napari_cytodiffusion.core.model.classifier import classify_crops
    from napari_cytodiffusion.core.smear.crops import normalised_cell

    torch.set_num_threads(args.threads)
    model = load_model("default", device="cpu")
    sets = {
        "pbc_test": np.stack(
            [normalised_cell(read_image(r.path), 64) for r in _test_records(args.n)]
        ),
        "cbc_other_hospital": _cbc_cells(args.n),
        "wbc_dataset1_other_microscope": _other_microscope_cells(args.n),
    }
    scores = {}
    for name, crops in sets.items():
        calls = classify_crops(model, crops)
        scores[name] = {
            "anomaly": np.array([c.anomaly_score for c in calls]),
            "uncertainty": np.array([c.uncertainty for c in calls]),
            "review": np.array([c.needs_review for c in calls]),
            "labels": [c.label for c in calls],
        }
    report = {}
    reference = scores["pbc_test"]
    for name, s in scores.items():
        entry = {
            "cells": len(s["anomaly"]),
            "anomaly_score_median": float(np.median(s["anomaly"])),
            "needs_review_fraction": float(s["review"].mean()),
            "predicted_classes": {c: s["labels"].count(c) for c in CLASSES if c in s["labels"]},
        }
        if name != "pbc_test":
            positive = np.r_[np.ones(len(s["anomaly"])), np.zeros(len(reference["anomaly"]))]
            entry["anomaly_auroc_vs_pbc_test"] = auroc(
                positive, np.r_[s["anomaly"], reference["anomaly"]]
            )
            entry["uncertainty_auroc_vs_pbc_test"] = auroc(
                positive, np.r_[s["uncertainty"], reference["uncertainty"]]
            )
        report[name] = entry
    report["note"] = (
        "AUROC: how well the score ranks cells of the shifted set above PBC test cells "
        "(1 = perfectly, 0.5 = chance). The shifted sets are normal white cells imaged "
        "elsewhere, not blasts; no blasts are available here."
    )
    return report


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="part", required=True)
    sub.add_parser("h100").add_argument("folder")
    for name in ("cpu", "shift", "dataset1"):
        p = sub.add_parser(name)
        p.add_argument("--n", type=int, default=200)
        p.add_argument("--threads", type=int, default=2)
        p.add_argument("--model", default="default")
        p.add_argument("--tag", default="", help="suffix of the results file")
    for name in ("cpu", "dataset1"):
        sub.choices[name].add_argument("--scale", choices=["per-image", "shared"], default="shared")
        add_float32_option(sub.choices[name])
    sub.choices["cpu"].add_argument("--stratified", type=int, help="cells per class instead")
    args = parser.parse_args()
    parts = {"h100": h100, "cpu": cpu, "shift": shift, "dataset1": dataset1}
    report = parts[args.part](args)
    if args.part in ("cpu", "dataset1"):
        report["network_precision"] = network_precision("cpu")
    suffix = f"_{args.scale}" if args.part in ("cpu", "dataset1") else ""
    suffix += getattr(args, "tag", "")
    out = RESULTS / f"classification_{args.part}{suffix}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
