"""Paired errors and features of the issue-9 cell sets, computed once and cached.

For each set: the normalised crops (uint8), their PNG sizes, the colour references of their
smears, the encoder features of the domain-shift score, and (for the sets scored by the
network) exhaustive paired errors of every class and of the null class over ``--trials``
trials (seed 0). ``benchmarks/anomaly.py`` and ``benchmarks/review.py`` read these caches;
nothing here is fitted. The caches live in ``work_data/issue9/`` (not in the repository).

Sets (PBC cells at PBC's known red-cell scale, 29 px; the others through the user's path,
``prepare_smear`` with no scale given):

``pbc_train``   features only, 100 cells per class (the domain reference)
``pbc_val``     25 per class;  ``pbc_val_blur`` its first 10 per class, Gaussian blur 1 px
``pbc_test``    30 per class;  ``pbc_test_blur`` its first 15 per class, blurred
``pbc_val_features``, ``pbc_test_features``  features only, 100 per class (the domain-shift
                threshold is set on the val ones)
``dataset1``    WBC dataset 1: errors for ``--dataset1-errors`` cells (every k-th), features
                for all 300
``cbc_train``   white cells of CBC train fields at their boxes: errors for 80, features for all
"""

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import REPO  # noqa: E402
from _sets import (  # noqa: E402
    blurred,
    cbc_white_cells,
    central_cell_crops,
    dataset1_records,
    pbc_stratified,
)

CACHE = REPO / "work_data" / "issue9"
PBC_SCALE = 29.0


def png_bytes(crop):
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray((np.clip(crop, 0, 1) * 255 + 0.5).astype(np.uint8)).save(buffer, "PNG")
    return len(buffer.getvalue())


def pbc_set(split, per_class, size):
    from napari_cytodiffusion.core.classes import CLASSES
    from napari_cytodiffusion.core.io import read_image

    records = pbc_stratified(split, per_class)
    images = [read_image(r.path) for r in records]
    crops, colours, scales = central_cell_crops(images, PBC_SCALE, size)
    labels = np.array([CLASSES.index(r.label) for r in records])
    return crops, colours, scales, labels


def save(name, crops, colours, labels, model, trials, score=None, scales=None, **extra):
    """Write one set's cache; ``score`` is the index (or slice) of the cells scored by the
    network (all when None, none when False)."""
    from napari_cytodiffusion.core.model.classifier import class_errors
    from napari_cytodiffusion.core.model.domain import cell_features

    started = time.perf_counter()
    out = {
        "crops": (np.clip(crops, 0, 1) * 255 + 0.5).astype(np.uint8),
        "colours": colours,
        "labels": labels,
        "png_bytes": np.array([png_bytes(c) for c in crops]),
        "features": cell_features(model, crops),
        "scales": scales if scales is not None else np.full(len(crops), np.nan),
    }
    if score is not False:
        index = np.arange(len(crops)) if score is None else np.asarray(score)
        errors, _ = class_errors(
            model, crops[index], "exhaustive", 0, trials, batch_size=72, null=True
        )
        out.update(errors=errors, scored=index)
    out.update(extra)
    np.savez(CACHE / f"{name}.npz", **out)
    print(f"{name}: {len(crops)} cells, {time.perf_counter() - started:.0f} s", flush=True)


def main():
    import torch

    from napari_cytodiffusion.core.io import read_image
    from napari_cytodiffusion.core.model.weights import load_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sets", nargs="+")
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--dataset1-errors", type=int, default=120)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    CACHE.mkdir(parents=True, exist_ok=True)
    model = load_model("default", device="cpu")
    size = model.image_size
    for name in args.sets:
        if (CACHE / f"{name}.npz").exists() and not args.force:
            print(f"{name}: cached")
            continue
        if name == "pbc_train":
            crops, colours, scales, labels = pbc_set("train", 100, size)
            save(name, crops, colours, labels, model, args.trials, score=False, scales=scales)
        elif name in ("pbc_test_features", "pbc_val_features"):
            crops, colours, scales, labels = pbc_set(name.split("_")[1], 100, size)
            save(name, crops, colours, labels, model, args.trials, score=False, scales=scales)
        elif name in ("pbc_val", "pbc_test"):
            per_class = 25 if name == "pbc_val" else 30
            crops, colours, scales, labels = pbc_set(name.split("_")[1], per_class, size)
            save(name, crops, colours, labels, model, args.trials, scales=scales)
        elif name in ("pbc_val_blur", "pbc_test_blur"):
            base = np.load(CACHE / f"{name[:-5]}.npz")
            per_class = 10 if name == "pbc_val_blur" else 15
            index = np.concatenate(
                [np.flatnonzero(base["labels"] == c)[:per_class] for c in np.unique(base["labels"])]
            )
            crops = blurred(base["crops"][index].astype(np.float32) / 255)
            save(
                name,
                crops,
                base["colours"][index],
                base["labels"][index],
                model,
                args.trials,
                source_index=index,
            )
        elif name == "dataset1":
            records = dataset1_records()
            images = [read_image(p) for p, _ in records]
            crops, colours, scales = central_cell_crops(images, None, size)
            labels = np.array([label for _, label in records])
            score = np.linspace(0, len(crops) - 1, args.dataset1_errors).astype(int)
            save(name, crops, colours, labels, model, args.trials, score=score, scales=scales)
        elif name == "cbc_train":
            crops, colours = cbc_white_cells("train", None, size)
            score = np.linspace(0, len(crops) - 1, min(80, len(crops))).astype(int)
            save(name, crops, colours, np.full(len(crops), -1), model, args.trials, score=score)
        else:
            raise SystemExit(f"unknown set {name}")


if __name__ == "__main__":
    main()
