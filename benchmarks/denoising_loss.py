"""Denoising loss of a model on the PBC val split, by timestep range.

For every val cell (the centre 64 px of the packed 88-px crops, as the classifier sees it) one
timestep is drawn so that every range of timesteps gets the same number of cells, with one
noise draw. The loss is the mean squared error of the predicted noise (the training loss),
once with the cell's true class and once with the null class (unconditional); the gap between
the two is the class information the diffusion classifier relies on.

    python benchmarks/denoising_loss.py [--pack work_data/pbc_train_val_64.npz] [--model default]

Writes benchmarks/results/denoising_loss.json and .md.
"""

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from napari_cytodiffusion.core.datasets import load_pack
from napari_cytodiffusion.core.model.batches import paired_predictions
from napari_cytodiffusion.core.model.diffusion import NUM_TIMESTEPS, add_noise, to_model_range
from napari_cytodiffusion.core.model.weights import file_sha256, load_model, model_path

RESULTS = Path(__file__).resolve().parent / "results"


def val_crops(pack, image_size):
    """The val cells' centre crops (n, 3, s, s) in model range, and their labels."""
    images, labels, _, _ = load_pack(pack, splits=("val",))
    offset = (images.shape[1] - image_size) // 2
    crops = images[:, offset : offset + image_size, offset : offset + image_size]
    return to_model_range(torch.from_numpy(crops).permute(0, 3, 1, 2)), torch.from_numpy(labels)


def stratified_timesteps(n, bins, generator):
    """One timestep per cell; each of ``bins`` equal ranges gets n / bins cells (+-1)."""
    width = NUM_TIMESTEPS // bins
    bin_of_cell = torch.arange(n) % bins
    bin_of_cell = bin_of_cell[torch.randperm(n, generator=generator)]
    return bin_of_cell * width + torch.randint(0, width, (n,), generator=generator)


def measure(model, x0, labels, bins, batch_size, seed):
    generator = torch.Generator().manual_seed(seed)
    t = stratified_timesteps(len(x0), bins, generator)
    noise = torch.randn(x0.shape, generator=generator)
    null = torch.full_like(labels, model.num_classes)
    errors = []
    for start in range(0, len(x0), batch_size):
        part = slice(start, start + batch_size)
        candidates = torch.stack([labels[part], null[part]], dim=1)
        noisy = add_noise(x0[part], t[part], noise[part], model.alpha_bars)
        with torch.no_grad():
            predicted = paired_predictions(model.unet, noisy, t[part], candidates)
        errors.append(((predicted - noise[part][:, None]) ** 2).mean(dim=(2, 3, 4)))
    return t, torch.cat(errors).numpy()


def summarise(t, errors, labels, classes, bins):
    width = NUM_TIMESTEPS // bins
    rows = []
    for b in range(bins):
        chosen = (t.numpy() // width) == b
        true, null = errors[chosen, 0], errors[chosen, 1]
        rows.append(
            {
                "t_from": b * width,
                "t_to": (b + 1) * width - 1,
                "cells": int(chosen.sum()),
                "loss_true_class": float(true.mean()),
                "loss_true_class_sem": float(true.std(ddof=1) / np.sqrt(len(true))),
                "loss_null_class": float(null.mean()),
                "true_below_null_fraction": float((true < null).mean()),
            }
        )
    per_class = {
        name: float(errors[labels.numpy() == i, 0].mean())
        for i, name in enumerate(classes)
        if (labels.numpy() == i).any()
    }
    return rows, per_class


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pack", default="work_data/pbc_train_val_64.npz")
    parser.add_argument("--model", default="default")
    parser.add_argument("--bins", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    model = load_model(args.model, device="cpu")
    x0, labels = val_crops(args.pack, model.image_size)
    load_before = os.getloadavg()
    started = time.perf_counter()
    t, errors = measure(model, x0, labels, args.bins, args.batch_size, args.seed)
    seconds = time.perf_counter() - started
    rows, per_class = summarise(t, errors, labels, model.classes, args.bins)
    result = {
        "model": model.name,
        "model_sha256": file_sha256(model_path(args.model)),
        "data": f"PBC val split ({len(x0)} cells), centre {model.image_size} px of {args.pack}",
        "method": "one stratified timestep and one noise draw per cell, seed "
        f"{args.seed}; loss = mean squared error of the predicted noise",
        "overall_loss_true_class": float(errors[:, 0].mean()),
        "overall_loss_null_class": float(errors[:, 1].mean()),
        "by_timestep": rows,
        "by_class_true_class_loss": per_class,
        "seconds": round(seconds, 1),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads; load average "
        f"{load_before[0]:.1f} before (shared with other jobs)",
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "denoising_loss.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "denoising_loss.md").write_text(markdown(result))
    print(markdown(result))


def markdown(result):
    lines = [
        f"# Denoising loss of `{result['model']}` on the PBC val split",
        "",
        f"Data: {result['data']}. Method: {result['method']}.",
        "",
        f"Overall: true class {result['overall_loss_true_class']:.4f}, null class "
        f"{result['overall_loss_null_class']:.4f}.",
        "",
        "| timesteps | cells | loss, true class (± s.e.) | loss, null class | true < null |",
        "|---|---|---|---|---|",
    ]
    for row in result["by_timestep"]:
        lines.append(
            f"| {row['t_from']}-{row['t_to']} | {row['cells']} | "
            f"{row['loss_true_class']:.4f} ± {row['loss_true_class_sem']:.4f} | "
            f"{row['loss_null_class']:.4f} | {row['true_below_null_fraction']:.0%} |"
        )
    lines += ["", "| class | loss, true class |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in result["by_class_true_class_loss"].items()]
    lines += ["", f"{result['seconds']} s on {result['machine']}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
