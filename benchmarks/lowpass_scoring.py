"""Diffusion-classifier scores from the error in a low-pass band: a lead on blur robustness.

A soft (defocused) cell lacks fine detail, so the denoisers of smooth classes (platelets)
predict its noise best in the fine band and win it whatever the cell is. Blurring the paired
noise-prediction error by a Gaussian of ``sigma`` model pixels before its mean square leaves
only the bands a soft image still has. Each cell gets the same ``--trials`` trials (shared
noise and timesteps, no orientation changes) for every class; a class's score is the sum over
trials of its log error relative to the trial's mean over classes (no calibration, so these
numbers compare the bands with each other, not with the shipped classifier's).

Sets: PBC **val** cells (stratified) as imaged and blurred before preparation
(``perturbations.blur``), at PBC's scale; WBC dataset 1 through the user's path with one
shared scale. Results: ``benchmarks/results/lowpass_scoring.json``.

    python benchmarks/lowpass_scoring.py [--n-per-class 10] [--dataset1 150]
"""

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS  # noqa: E402
from _metrics import balanced_accuracy  # noqa: E402
from _sets import central_cell_crops, dataset1_records, pbc_stratified  # noqa: E402
from perturbations import PBC_RBC_DIAMETER, blur  # noqa: E402

SIGMAS = (0.0, 1.0, 2.0)


def band_errors(model, crops, trials, batch=8):
    """Paired errors (len(SIGMAS), n, trials, classes), each band's mean square."""
    import torch

    from napari_cytodiffusion.core.model.batches import crops_to_tensor
    from napari_cytodiffusion.core.model.classifier import trial_timesteps
    from napari_cytodiffusion.core.model.diffusion import add_noise, autocast

    size, k = model.image_size, model.num_classes
    noise = torch.randn(trials, 3, size, size, generator=torch.Generator().manual_seed(0))
    timesteps = torch.from_numpy(trial_timesteps(trials))
    f = torch.fft.fftfreq(size)
    frequency2 = f[:, None] ** 2 + f[None, :] ** 2
    x0 = crops_to_tensor(crops, model)
    out = np.zeros((len(SIGMAS), len(x0), trials, k), np.float32)
    for start in range(0, len(x0), batch):
        cells = x0[start : start + batch]
        n = len(cells)
        t, eps = timesteps.repeat(n), noise.repeat(n, 1, 1, 1)
        with torch.inference_mode():
            with autocast(model.device):
                noisy = add_noise(cells.repeat_interleave(trials, 0), t, eps, model.alpha_bars)
                encoded = model.unet.encode(noisy, t)
                predictions = [
                    model.unet.decode(encoded, torch.full((len(t),), c)).float() for c in range(k)
                ]
            for c, predicted in enumerate(predictions):
                error = predicted - eps
                for j, sigma in enumerate(SIGMAS):
                    if sigma:
                        gain = torch.exp(-2 * np.pi**2 * sigma**2 * frequency2)
                        band = torch.fft.ifft2(torch.fft.fft2(error) * gain).real
                    else:
                        band = error
                    square = (band**2).mean(dim=(1, 2, 3)).view(n, trials)
                    out[j, start : start + n, :, c] = square.numpy()
    return out


def main():
    import torch

    from napari_cytodiffusion.core.io import read_image
    from napari_cytodiffusion.core.model.diffusion import network_precision
    from napari_cytodiffusion.core.model.weights import load_model
    from napari_cytodiffusion.core.tasks.classify import shared_rbc_diameter

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-per-class", type=int, default=10)
    parser.add_argument("--dataset1", type=int, default=150, help="dataset-1 cells")
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model("default", device="cpu")
    records = pbc_stratified("val", args.n_per_class)
    pbc_truth = [r.label for r in records]
    images = [read_image(r.path) for r in records]
    d1 = dataset1_records(args.dataset1)
    d1_scale = shared_rbc_diameter([path for path, _ in dataset1_records()])
    # name -> (images, red-cell diameter, truth)
    sets = {
        "pbc val as imaged": (images, PBC_RBC_DIAMETER, pbc_truth),
        "pbc val blur 1.0 px": ([blur(im, 1.0) for im in images], PBC_RBC_DIAMETER, pbc_truth),
        "pbc val blur 1.5 px": ([blur(im, 1.5) for im in images], PBC_RBC_DIAMETER, pbc_truth),
        "wbc dataset 1": ([read_image(p) for p, _ in d1], d1_scale, [label for _, label in d1]),
    }
    report = {
        "model": model.name,
        "trials": args.trials,
        "sigmas_model_px": list(SIGMAS),
        "hardware": f"{platform.machine()} CPU, {args.threads} threads",
        "network_precision": network_precision("cpu"),
        "sets": {},
    }
    for name, (cells, rbc_diameter, truth) in sets.items():
        started = time.perf_counter()
        crops, _, _ = central_cell_crops(cells, rbc_diameter, model.image_size)
        errors = band_errors(model, crops, args.trials)
        entry = {"cells": len(truth)}
        for j, sigma in enumerate(SIGMAS):
            scores = np.log(errors[j] / errors[j].mean(axis=2, keepdims=True)).sum(axis=1)
            predicted = [model.classes[i] for i in scores.argmin(axis=1)]
            entry[f"sigma {sigma:g}"] = {
                "balanced_accuracy": balanced_accuracy(truth, predicted, sorted(set(truth))),
                "platelet_calls": predicted.count("platelet"),
            }
        entry["seconds"] = round(time.perf_counter() - started, 1)
        report["sets"][name] = entry
        print(name, json.dumps(entry), flush=True)
    out = RESULTS / "lowpass_scoring.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(out)


if __name__ == "__main__":
    main()
