"""Classifier and generator runs on a GPU: throughput, plus the paired errors for calibration.

Run on a CUDA machine (no napari or pooch needed) from the repository root:

    PYTHONPATH=src python benchmarks/gpu_classify_generate.py CROPS.npz --out DIR

CROPS.npz holds 64-px normalised PBC crops of the val and test splits (made by
benchmarks/pack_eval_crops.py). Writes to DIR:

* ``{split}_exhaustive.npz``: errors (n, 64 trials, 9) for the 8 classes and the null class,
  labels; the reference strategy, and on val the data the calibration is fitted on.
* ``calibration.json`` (with ``--fit-calibration``): the calibration fitted on the val split's
  exhaustive errors.
* ``{split}_adaptive.npz``: errors and evaluations spent by the adaptive strategy, run live
  with that calibration.
* ``gpu_results.json``: cells per second for both strategies and for generation.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from napari_cytodiffusion.core.classes import CLASSES
from napari_cytodiffusion.core.model.calibration import fit_calibration
from napari_cytodiffusion.core.model.checkpoint import load_model_file
from napari_cytodiffusion.core.model.classifier import class_errors
from napari_cytodiffusion.core.model.generation import generate_cells


def timed(function):
    torch.cuda.synchronize()
    started = time.perf_counter()
    result = function()
    torch.cuda.synchronize()
    return result, time.perf_counter() - started


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("crops")
    parser.add_argument(
        "--model", default="src/napari_cytodiffusion/models/cytodiffusion-pbc64-v1.pt"
    )
    parser.add_argument("--out", required=True)
    parser.add_argument("--limit", type=int, help="cells per split (for a quick check)")
    parser.add_argument("--budget", type=int, default=64)
    parser.add_argument(
        "--fit-calibration",
        action="store_true",
        help="fit the calibration on the val split's exhaustive errors and use it (how the "
        "shipped calibration was made); by default the model's own calibration is used",
    )
    parser.add_argument("--splits", default="val,test")
    args = parser.parse_args()
    out = Path(args.out)
    model = load_model_file(args.model, device="cuda")
    data = np.load(args.crops)
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    warm = data["crops"][:64].astype(np.float32) / 255
    class_errors(model, warm, "adaptive", budget=4)
    for split in args.splits.split(","):
        keep = np.flatnonzero(data["splits"] == split)[: args.limit]
        crops = data["crops"][keep].astype(np.float32) / 255
        labels = data["labels"][keep]
        for strategy, classes in (("exhaustive", list(range(9))), ("adaptive", None)):
            (errors, spent), seconds = timed(
                lambda x=crops, s=strategy, c=classes: class_errors(
                    model, x, s, seed=0, budget=args.budget, classes=c
                )
            )
            np.savez_compressed(
                out / f"{split}_{strategy}.npz", errors=errors, spent=spent, labels=labels
            )
            results[f"{split}_{strategy}"] = {
                "cells": len(crops),
                "seconds": seconds,
                "cells_per_second": len(crops) / seconds,
                "mean_unet_evals": float(spent.mean()),
            }
            print(split, strategy, results[f"{split}_{strategy}"], flush=True)
            if split == "val" and strategy == "exhaustive" and args.fit_calibration:
                calibration = fit_calibration(model, errors[:, :, : model.num_classes], labels)
                (out / "calibration.json").write_text(json.dumps(calibration))
    # Slide scale: the test cells four times over (new noise each time), as one batch of work.
    tiled = np.tile(data["crops"][data["splits"] == "test"][: args.limit], (4, 1, 1, 1))
    (_, spent), seconds = timed(
        lambda: class_errors(model, tiled.astype(np.float32) / 255, "adaptive", seed=1)
    )
    results["slide_adaptive"] = {
        "cells": len(tiled),
        "seconds": seconds,
        "cells_per_second": len(tiled) / seconds,
        "mean_unet_evals": float(spent.mean()),
    }
    print("slide adaptive", results["slide_adaptive"], flush=True)
    for count in (8, 1024):
        labels = [CLASSES[i % len(CLASSES)] for i in range(count)]
        generate_cells(model, labels[:8], steps=2)  # warm-up
        cells, seconds = timed(lambda y=labels: generate_cells(model, y, batch_size=1024))
        results[f"generate_{count}"] = {
            "cells": count,
            "steps": cells.steps,
            "guidance": cells.guidance,
            "sampler": cells.sampler,
            "seconds": seconds,
            "cells_per_second": count / seconds,
        }
        print(results[f"generate_{count}"], flush=True)
    (out / "gpu_results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
