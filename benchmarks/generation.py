"""Synthetic-cell benchmarks: speed, accuracy versus steps, realism, memorisation, class fidelity.

Run from the repository root (CPU; each part is separate so a shared machine is not hogged):

    python benchmarks/generation.py --parts speed,steps,realism,memorisation,fidelity

Parts (results merged into benchmarks/results/generation.json and .md):

* speed: seconds to generate 8 cells per sampler and step count (wall clock, this CPU).
* steps: how far each sampler's cells are from the exact solution of the sampling ODE (a
  200-step DPM-Solver++ run from the same noise), per step count: RMSE in [0, 1] pixel units.
* realism: leave-one-out 1-nearest-neighbour two-sample test, per class, between real PBC
  *test* cells (normalised exactly as the model sees cells; never used for training or tuning)
  and as many synthetic cells of that class. Accuracy 0.5: indistinguishable; 1: separable.
  Two feature spaces: pixels (16 x 16 RGB, area-downsampled) and the diffusion UNet encoder's
  pooled features at a small noise level (an embedding that sees texture; it belongs to the
  same model, so it is not an independent judge).
* memorisation: each synthetic cell's distance to its nearest training crop (the centre 64 px
  of the training pack, the cells the model was trained on) against the nearest-neighbour
  distance between training crops themselves; both over the 8 flips/rotations by 90 degrees.
* fidelity: the diffusion classifier's accuracy on generated cells, per class.

Synthetic cells are cached (--cache) so the parts share them.
"""

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import REPO, RESULTS, add_float32_option, pbc_records  # noqa: E402

from napari_cytodiffusion.core.classes import CLASSES  # noqa: E402
from napari_cytodiffusion.core.datasets import load_pack  # noqa: E402
from napari_cytodiffusion.core.model import generation, sampling  # noqa: E402
from napari_cytodiffusion.core.model.diffusion import (  # noqa: E402
    NUM_TIMESTEPS,
    autocast,
    network_precision,
)
from napari_cytodiffusion.core.model.weights import load_model  # noqa: E402
from napari_cytodiffusion.core.turing import normalise_real_cells  # noqa: E402

MODEL = "cytodiffusion-pbc64-v1"  # loaded through the registry, so its sha256 is checked
PACK = REPO / "work_data/pbc_train_val_64.npz"
PBC_RBC_DIAMETER = 29.0  # the red-cell diameter PBC's 160-px images were packed with


def environment():
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": os.getloadavg()[0],
        "torch": torch.__version__,
        "network_precision": network_precision("cpu"),
    }


@torch.no_grad()
def ddim_sample(model, class_ids, steps, guidance, generator, alpha_bars, x_start=None):
    """The plain baseline the samplers are compared with: DDIM, uniform in t, full CFG.

    Runs the whole network twice per step (class and null) and returns model-range images.
    """
    n, size = class_ids.shape[0], model.config["image_size"]
    times = torch.linspace(NUM_TIMESTEPS - 1, 0, steps + 1).round().long()
    x = torch.randn((n, 3, size, size), generator=generator) if x_start is None else x_start
    null = torch.full_like(class_ids, model.num_classes)
    for i in range(steps):
        t, t_next = times[i], times[i + 1]
        with autocast(x.device):  # the precision the package's samplers run in
            both = model(torch.cat([x, x]), t.repeat(2 * n), torch.cat([class_ids, null]))
        both = both.float()
        eps_class, eps_null = both.chunk(2)
        eps = eps_null + guidance * (eps_class - eps_null)
        a = alpha_bars[t]
        a_next = alpha_bars[t_next] if i < steps - 1 else torch.ones(())
        x0 = ((x - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
    return x


def part_speed(model, args):
    """Wall-clock seconds for 8 cells, one class per cell, per sampler and step count."""
    labels = [CLASSES[i % len(CLASSES)] for i in range(8)]
    class_ids = torch.tensor([CLASSES.index(c) for c in labels])
    rows = []
    generation.generate_cells(model, labels[:2], steps=2)  # warm-up
    for sampler, steps in [("dpm++2m", 10), ("dpm++2m", 15), ("dpm++2m", 20), ("ddim", 20)]:
        started = time.perf_counter()
        generation.generate_cells(model, labels, steps=steps, sampler=sampler)
        rows.append(
            {"sampler": sampler, "steps": steps, "seconds_8_cells": time.perf_counter() - started}
        )
        print(rows[-1], flush=True)
    for steps in (20, 50):  # the original uniform-in-t DDIM, for comparison
        started = time.perf_counter()
        ddim_sample(
            model.unet, class_ids, steps, 2.0, torch.Generator().manual_seed(0), model.alpha_bars
        )
        rows.append(
            {
                "sampler": "ddim (uniform t, full CFG)",
                "steps": steps,
                "seconds_8_cells": time.perf_counter() - started,
            }
        )
        print(rows[-1], flush=True)
    return {"environment": environment(), "guidance": 2.0, "runs": rows}


def part_steps(model, args):
    """RMSE to a converged reference, per sampler and step count, from the same noise."""
    n = 16
    class_ids = torch.arange(n) % len(CLASSES)
    noise = sampling.cell_noise(range(n), model.image_size)

    def run(steps, sampler):
        x = sampling.denoise(
            model.unet, noise.clone(), class_ids, model.alpha_bars, steps, 2.0, sampler
        )
        return (x + 1) / 2

    reference = run(200, "dpm++2m")
    rows = []
    for steps in (5, 8, 10, 15, 20, 30, 50):
        for sampler in sampling.SAMPLERS:
            error = float((run(steps, sampler) - reference).pow(2).mean().sqrt())
            rows.append({"sampler": sampler, "steps": steps, "rmse_to_converged": error})
            print(rows[-1], flush=True)
        x = ddim_sample(
            model.unet, class_ids, steps, 2.0, None, model.alpha_bars, x_start=noise.clone()
        )
        error = float(((x + 1) / 2 - reference).pow(2).mean().sqrt())
        rows.append({"sampler": "ddim (uniform t)", "steps": steps, "rmse_to_converged": error})
        print(rows[-1], flush=True)
    return {
        "cells": n,
        "guidance": 2.0,
        "reference": "dpm++2m, 200 steps (log-SNR spacing)",
        "runs": rows,
    }


def synthetic_cells(model, per_class, steps, guidance, cache):
    """``per_class`` cells of every class (cached on disk by their settings)."""
    path = Path(cache) / f"synthetic_{per_class}_{steps}_{guidance}.npz"
    if path.exists():
        with np.load(path) as data:
            return data["images"], data["labels"], float(data["seconds_per_cell"])
    labels = [c for c in CLASSES for _ in range(per_class)]
    started = time.perf_counter()
    cells = generation.generate_cells(model, labels, steps=steps, guidance=guidance, seed=10_000)
    seconds = (time.perf_counter() - started) / len(labels)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, images=cells.images, labels=np.array(labels), seconds_per_cell=seconds)
    return cells.images, np.array(labels), seconds


def real_test_cells(per_class, cache):
    """``per_class`` normalised PBC test cells of every class (seeded choice, cached)."""
    path = Path(cache) / f"real_test_{per_class}.npz"
    if path.exists():
        with np.load(path) as data:
            return data["images"], data["labels"]
    records = pbc_records("test")
    rng = np.random.default_rng(0)
    chosen = []
    for label in CLASSES:
        members = [r for r in records if r.label == label]
        chosen += [members[i] for i in rng.choice(len(members), per_class, replace=False)]
    images = normalise_real_cells(chosen, 64, PBC_RBC_DIAMETER)
    labels = np.array([r.label for r in chosen])
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, images=images, labels=labels)
    return images, labels


def as_shown(images):
    """The last steps every compared cell goes through (as in the Turing test panel)."""
    return np.round(generation.balance_background(images) * 255) / 255


def pixel_features(images, side=16):
    n, size = images.shape[0], images.shape[1]
    factor = size // side
    return images.reshape(n, side, factor, side, factor, 3).mean(axis=(2, 4)).reshape(n, -1)


@torch.no_grad()
def encoder_features(model, images, t=50):
    """Pooled encoder activations (every level, mean and std over space) of lightly noised cells."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1
    times = torch.full((len(x),), t)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    a = model.alpha_bars[t]
    h, skips, _ = model.unet.encode(a.sqrt() * x + (1 - a).sqrt() * noise, times)
    parts = []
    for level in [*skips, h]:
        parts += [level.mean(dim=(2, 3)), level.std(dim=(2, 3))]
    return torch.cat(parts, dim=1).numpy()


def one_nn_accuracy(real, synthetic, standardise):
    """Leave-one-out 1-NN accuracy at telling the two sets apart (0.5 = indistinguishable)."""
    features = np.concatenate([real, synthetic]).astype(np.float64)
    if standardise:
        features = (features - features.mean(0)) / (features.std(0) + 1e-8)
    truth = np.r_[np.zeros(len(real)), np.ones(len(synthetic))]
    squared = (features**2).sum(1)
    distances = squared[:, None] + squared[None, :] - 2 * features @ features.T
    np.fill_diagonal(distances, np.inf)
    return float((truth[distances.argmin(1)] == truth).mean())


def part_realism(model, args):
    real, real_labels = real_test_cells(args.per_class, args.cache)
    synthetic, synthetic_labels, seconds = synthetic_cells(
        model, args.per_class, args.steps, args.guidance, args.cache
    )
    real, synthetic = as_shown(real), as_shown(synthetic)
    spaces = {
        "pixels_16x16": (pixel_features, False),
        "unet_encoder": (lambda x: encoder_features(model, x.astype(np.float32)), True),
    }
    result = {
        "real": "PBC test split, normalised (rbc_diameter 29 px), seeded random choice",
        "per_class": args.per_class,
        "steps": args.steps,
        "guidance": args.guidance,
        "sampler": sampling.DEFAULT_SAMPLER,
        "seconds_per_synthetic_cell": seconds,
        "one_nn_accuracy": {},
    }
    for name, (features, standardise) in spaces.items():
        by_class = {}
        for label in CLASSES:
            r, s = real[real_labels == label], synthetic[synthetic_labels == label]
            by_class[label] = one_nn_accuracy(features(r), features(s), standardise)
        by_class["mean"] = float(np.mean(list(by_class.values())))
        result["one_nn_accuracy"][name] = by_class
        print(name, by_class, flush=True)
    return result


def part_baselines(model, args):
    """The same 1-NN test between real test cells and real *training* cells, as they are and
    as the model saw them in training (randomly augmented): what a perfect generator of the
    training distribution would score."""
    from napari_cytodiffusion.core.model.training import augment

    real, real_labels = real_test_cells(args.per_class, args.cache)
    pack = load_pack(PACK, splits=("train",))
    images, labels = pack.images, pack.labels
    rng = np.random.default_rng(1)
    chosen = np.concatenate(
        [
            rng.choice(np.flatnonzero(labels == CLASSES.index(c)), args.per_class, replace=False)
            for c in CLASSES
        ]
    )
    offset = (images.shape[1] - 64) // 2
    plain = images[chosen, offset : offset + 64, offset : offset + 64].astype(np.float32) / 255
    augmented = (
        augment(torch.from_numpy(images[chosen]), 64, torch.Generator().manual_seed(0))
        .permute(0, 2, 3, 1)
        .numpy()
    )
    train_labels = np.array([CLASSES[i] for i in labels[chosen]])
    spaces = {
        "pixels_16x16": (pixel_features, False),
        "unet_encoder": (lambda x: encoder_features(model, x.astype(np.float32)), True),
    }
    result = {"per_class": args.per_class, "one_nn_accuracy": {}}
    for name, train in (("train_as_is", plain), ("train_augmented", augmented)):
        result["one_nn_accuracy"][name] = {}
        for space, (features, standardise) in spaces.items():
            by_class = {
                c: one_nn_accuracy(
                    features(as_shown(real[real_labels == c])),
                    features(as_shown(train[train_labels == c])),
                    standardise,
                )
                for c in CLASSES
            }
            by_class["mean"] = float(np.mean(list(by_class.values())))
            result["one_nn_accuracy"][name][space] = by_class
            print(name, space, by_class, flush=True)
    return result


def part_guidance(model, args):
    """Mean 1-NN accuracy (both feature spaces) per guidance scale: realism versus guidance."""
    rows = []
    for guidance in (1.0, 1.5, 2.0, 3.0):
        result = part_realism(model, argparse.Namespace(**{**vars(args), "guidance": guidance}))
        accuracy = result["one_nn_accuracy"]
        rows.append(
            {
                "guidance": guidance,
                "pixels_16x16": accuracy["pixels_16x16"]["mean"],
                "unet_encoder": accuracy["unet_encoder"]["mean"],
                "seconds_per_cell": result["seconds_per_synthetic_cell"],
            }
        )
    return {"per_class": args.per_class, "steps": args.steps, "runs": rows}


def dihedral(images):
    """The 8 flips and rotations by 90 degrees of (n, s, s, c) images: (8, n, s, s, c)."""
    rotations = [np.rot90(images, k, axes=(1, 2)) for k in range(4)]
    return np.stack(rotations + [r[:, :, ::-1] for r in rotations])


def nearest_distances(queries, reference, exclude_self=False, chunk=256):
    """RMS pixel distance of each query (with its 8 dihedral copies) to its nearest reference."""
    ref = torch.from_numpy(reference.reshape(len(reference), -1))
    ref_sq = (ref**2).sum(1)
    best = np.full(len(queries), np.inf)
    best_index = np.zeros(len(queries), int)
    variants = dihedral(queries)
    for v in variants:
        flat = torch.from_numpy(np.ascontiguousarray(v).reshape(len(v), -1))
        for start in range(0, len(flat), chunk):
            q = flat[start : start + chunk]
            d = (q**2).sum(1)[:, None] + ref_sq[None] - 2 * q @ ref.T
            if exclude_self:
                rows = torch.arange(len(q))
                d[rows, exclude_self[start : start + chunk]] = float("inf")
            value, index = d.min(1)
            value = value.clamp_min(0).numpy()
            better = value < best[start : start + chunk]
            best[start : start + chunk][better] = value[better]
            best_index[start : start + chunk][better] = index.numpy()[better]
    return np.sqrt(best / ref.shape[1]), best_index


def part_memorisation(model, args):
    images = load_pack(PACK, splits=("train",)).images
    offset = (images.shape[1] - 64) // 2
    train = images[:, offset : offset + 64, offset : offset + 64].astype(np.float32) / 255
    train32 = train.reshape(len(train), 32, 2, 32, 2, 3).mean(axis=(2, 4))
    synthetic, synthetic_labels, _ = synthetic_cells(
        model, args.per_class, args.steps, args.guidance, args.cache
    )
    synthetic32 = synthetic.reshape(len(synthetic), 32, 2, 32, 2, 3).mean(axis=(2, 4))
    synth_nn, synth_index = nearest_distances(synthetic32, train32)
    rng = np.random.default_rng(0)
    sample = rng.choice(len(train32), args.train_sample, replace=False)
    train_nn, _ = nearest_distances(train32[sample], train32, exclude_self=list(sample))
    low = float(np.percentile(train_nn, 1))
    result = {
        "space": "RMS difference of 32 x 32 RGB pixels in [0, 1], min over 8 flips/rotations",
        "training_crops": len(train32),
        "synthetic_cells": len(synthetic32),
        "train_sample": args.train_sample,
        "synthetic_to_train_nn": _percentiles(synth_nn),
        "train_to_train_nn": _percentiles(train_nn),
        "train_to_train_exact_duplicates": int((train_nn < 1e-3).sum()),
        "ratio_of_medians": float(np.median(synth_nn) / np.median(train_nn)),
        "synthetic_below_train_1st_percentile": int((synth_nn < low).sum()),
        "closest_synthetic": [
            {
                "label": str(synthetic_labels[i]),
                "distance": float(synth_nn[i]),
                "train_index": int(synth_index[i]),
            }
            for i in np.argsort(synth_nn)[:8]
        ],
    }
    _closest_pairs_figure(synthetic, train, synth_nn, synth_index, synthetic_labels)
    print(json.dumps(result, indent=1), flush=True)
    return result


def _percentiles(values):
    return {f"p{p}": float(np.percentile(values, p)) for p in (1, 5, 25, 50, 75, 95)}


def _closest_pairs_figure(synthetic, train, distances, index, labels):
    from matplotlib.figure import Figure

    order = np.argsort(distances)[:8]
    figure = Figure(figsize=(12, 3.4))
    axes = figure.subplots(2, 8)
    for column, i in enumerate(order):
        axes[0, column].imshow(synthetic[i])
        axes[0, column].set_title(f"{labels[i]}\nd={distances[i]:.3f}", fontsize=7)
        axes[1, column].imshow(train[index[i]])
    for axis in axes.ravel():
        axis.set_axis_off()
    figure.suptitle(
        "The 8 synthetic cells closest to a training cell (top) and that training cell", fontsize=9
    )
    figure.tight_layout()
    figure.savefig(REPO / "docs/images/generation_memorisation.png", dpi=100)


def part_fidelity(model, args):
    from napari_cytodiffusion.core.model.classifier import classify_crops

    synthetic, labels, _ = synthetic_cells(
        model, args.per_class, args.steps, args.guidance, args.cache
    )
    keep = np.concatenate([np.flatnonzero(labels == c)[: args.fidelity_per_class] for c in CLASSES])
    started = time.perf_counter()
    calls = classify_crops(model, synthetic[keep], strategy="adaptive", seed=0)
    seconds = time.perf_counter() - started
    predicted = np.array([c.label for c in calls])
    truth = labels[keep]
    by_class = {c: float((predicted[truth == c] == c).mean()) for c in CLASSES}
    confusion = {
        c: {p: int(((truth == c) & (predicted == p)).sum()) for p in CLASSES} for c in CLASSES
    }
    result = {
        "cells_per_class": args.fidelity_per_class,
        "accuracy": float((predicted == truth).mean()),
        "accuracy_by_class": by_class,
        "confusion": confusion,
        "classifier": "classify_crops(strategy='adaptive', seed=0)",
        "classify_seconds_per_cell": seconds / len(keep),
    }
    print(json.dumps(result, indent=1), flush=True)
    return result


def write_markdown(results):
    lines = [
        "# Synthetic-cell benchmarks",
        "",
        "Made by `benchmarks/generation.py`; raw numbers in generation.json.",
        "",
    ]
    for part, section in SECTIONS.items():
        if part in results:
            lines += section(results[part]) + [""]
    (RESULTS / "generation.md").write_text("\n".join(lines))


def _table(header, rows):
    """Markdown table lines from a header and rows of cells."""
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def _speed_section(speed):
    env = speed["environment"]
    rows = [
        (r["sampler"], r["steps"], f"{r['seconds_8_cells']:.2f}", f"{r['seconds_8_cells'] / 8:.2f}")
        for r in speed["runs"]
    ]
    return [
        "## Speed (8 cells, guidance 2)",
        "",
        f"CPU: {env['cores']} cores shared with other jobs (load average "
        f"{env['load_average_at_start']:.1f} at start), {env['torch_threads']} torch threads, "
        f"network in {env.get('network_precision', 'float32')}.",
        "",
        *_table(("sampler", "steps", "seconds for 8 cells", "seconds per cell"), rows),
    ]


def _steps_section(steps):
    samplers = list(dict.fromkeys(r["sampler"] for r in steps["runs"]))
    counts = sorted({r["steps"] for r in steps["runs"]})
    table = {(r["sampler"], r["steps"]): r["rmse_to_converged"] for r in steps["runs"]}
    rows = [(n, *(f"{table[(s, n)]:.4f}" for s in samplers)) for n in counts]
    return [
        "## Accuracy versus steps",
        "",
        f"RMSE (pixel units, [0, 1]) of {steps['cells']} cells to the converged ODE solution "
        f"({steps['reference']}) from the same noise; lower is better.",
        "",
        *_table(("steps", *samplers), rows),
    ]


def _realism_section(realism):
    spaces = list(realism["one_nn_accuracy"])
    rows = [
        (label, *(f"{realism['one_nn_accuracy'][s][label]:.3f}" for s in spaces))
        for label in [*CLASSES, "mean"]
    ]
    return [
        "## Realism: 1-NN two-sample test (leave-one-out)",
        "",
        f"{realism['per_class']} real PBC test cells and {realism['per_class']} synthetic "
        f"cells per class ({realism['sampler']}, {realism['steps']} steps, "
        f"guidance {realism['guidance']}). 0.5 = indistinguishable; target <= 0.65.",
        "",
        *_table(("class", *spaces), rows),
    ]


def _baselines_section(baselines):
    rows = [
        (name, f"{s['pixels_16x16']['mean']:.3f}", f"{s['unet_encoder']['mean']:.3f}")
        for name, s in baselines["one_nn_accuracy"].items()
    ]
    return [
        "## Realism baselines: real test cells against real training cells",
        "",
        "The same 1-NN test with training cells in place of synthetic ones: as they are, and "
        "randomly augmented as in training (rotation, flip, zoom, shift, colour jitter), the "
        "distribution the model learned. A perfect generator would score the latter.",
        "",
        *_table(("compared with", "pixels_16x16", "unet_encoder"), rows),
    ]


def _guidance_section(guidance):
    rows = [
        (
            r["guidance"],
            f"{r['pixels_16x16']:.3f}",
            f"{r['unet_encoder']:.3f}",
            f"{r['seconds_per_cell']:.2f}",
        )
        for r in guidance["runs"]
    ]
    return [
        "## Realism versus guidance",
        "",
        f"Mean 1-NN accuracy over the classes ({guidance['per_class']} real and synthetic cells "
        f"per class, {guidance['steps']} steps); seconds per cell on one shared CPU thread.",
        "",
        *_table(("guidance", "pixels_16x16", "unet_encoder", "seconds per cell"), rows),
    ]


def _memorisation_section(m):
    rows = [
        (key, *(f"{m[key][p]:.4f}" for p in ("p1", "p5", "p50", "p95")))
        for key in ("synthetic_to_train_nn", "train_to_train_nn")
    ]
    return [
        "## Memorisation",
        "",
        f"Distance: {m['space']}. {m['synthetic_cells']} synthetic cells against all "
        f"{m['training_crops']} training crops; train-to-train from {m['train_sample']} "
        "training crops.",
        "",
        *_table(("nearest-neighbour distance", "p1", "p5", "p50", "p95"), rows),
        "",
        f"Median ratio synthetic/train: {m['ratio_of_medians']:.2f}; synthetic cells closer "
        "to a training cell than 1 % of training cells are to each other: "
        f"{m['synthetic_below_train_1st_percentile']} of {m['synthetic_cells']}; exact "
        f"duplicates among training crops in the sample: "
        f"{m['train_to_train_exact_duplicates']}.",
    ]


def _fidelity_section(f):
    rows = [(c, f"{a:.2f}") for c, a in f["accuracy_by_class"].items()]
    return [
        "## Class fidelity",
        "",
        f"{f['classifier']} on {f['cells_per_class']} generated cells per class: "
        f"accuracy {f['accuracy']:.3f} (target >= 0.90).",
        "",
        *_table(("class", "accuracy"), rows),
    ]


SECTIONS = {
    "speed": _speed_section,
    "steps": _steps_section,
    "realism": _realism_section,
    "baselines": _baselines_section,
    "guidance": _guidance_section,
    "memorisation": _memorisation_section,
    "fidelity": _fidelity_section,
}


PARTS = {
    "speed": part_speed,
    "steps": part_steps,
    "realism": part_realism,
    "guidance": part_guidance,
    "baselines": part_baselines,
    "memorisation": part_memorisation,
    "fidelity": part_fidelity,
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="speed,steps", help=",".join(PARTS))
    parser.add_argument(
        "--per-class", type=int, default=50, help="real and synthetic cells per class"
    )
    parser.add_argument("--steps", type=int, default=sampling.DEFAULT_STEPS)
    parser.add_argument("--guidance", type=float, default=sampling.DEFAULT_GUIDANCE)
    parser.add_argument(
        "--train-sample", type=int, default=1000, help="training crops for train-train NN"
    )
    parser.add_argument("--fidelity-per-class", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the CPU is shared)")
    parser.add_argument("--cache", default="/tmp/cytodiffusion_generation_bench")
    add_float32_option(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(MODEL, device="cpu")
    path = RESULTS / "generation.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    for name in args.parts.split(","):
        results[name] = PARTS[name](model, args)
        results[name]["date"] = time.strftime("%Y-%m-%d %H:%M")
        path.write_text(json.dumps(results, indent=1))
        write_markdown(results)


if __name__ == "__main__":
    main()
