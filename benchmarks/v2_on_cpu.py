"""The v2 recipe fine-tuned on this CPU, a leg per session, while no GPU is lent.

``benchmarks/train_v2_gpu.py`` plans v2 for one GPU command (about 4 million augmented
images). Sessions without a GPU can still move it: this script fine-tunes v1 with the same
pack, the same lab augmentations and the same unlabelled cells (null class only), at batch 32,
and keeps one checkpoint in ``work_data/v2/cpu/`` (outside the repository) that every leg
resumes, optimiser and random state included. The learning rate follows one cosine schedule
over ``TOTAL_STEPS``, so legs add up to one run.

``leg``: train for ``--minutes`` (Ctrl-C saves the checkpoint too)::

    python benchmarks/v2_on_cpu.py leg --minutes 75

``check``: a quick check that needs no calibration, of v1 and of the checkpoint, on 150
WBC dataset 1 cells (another microscope and stain, through the user's path with one shared
red-cell scale) and 120 PBC **val** cells (15 per class): exhaustive paired trials, the class
with the lowest log error relative to the trial's mean over classes. The row is appended to
``benchmarks/results/v2_on_cpu.json``::

    python benchmarks/v2_on_cpu.py check

``check --checkpoint PATH`` checks another run's checkpoint or model file the
same way (for example one of ``benchmarks/train_v2_gpu.py run --device cpu``); ``--blur 1
1.5`` adds the PBC val cells blurred by those Gaussian sigmas (model px), ``--skip-v1`` leaves
v1 out.

``export``: the checkpoint's weights with v1's calibration, as a model file that ``adapt``
can start from (``work_data/v2/cpu/v2cpu-base.pt``; its calls are not calibrated for it)::

    python benchmarks/adaptation_more_draws.py v2cpu 8 24 --k 25 \\
        --base work_data/v2/cpu/v2cpu-base.pt --out adaptation_k25_choose.json
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import REPO, RESULTS  # noqa: E402

PACK = REPO / "work_data" / "v2" / "pack.npz"
FOLDER = REPO / "work_data" / "v2" / "cpu"
CHECKPOINT = FOLDER / "v2cpu.ckpt"
V1 = REPO / "src" / "napari_cytodiffusion" / "models" / "cytodiffusion-pbc64-v1.pt"
TOTAL_STEPS = 100_000
BATCH = 32
LR = 1e-4
CHECK_TRIALS = 16


def leg(args):
    """Train from the checkpoint (v1's weights the first time) for ``args.minutes``."""
    from napari_cytodiffusion.core.model.training import train

    if not PACK.exists():
        raise SystemExit(f"No pack at {PACK}: run `python benchmarks/train_v2_gpu.py pack`.")
    FOLDER.mkdir(parents=True, exist_ok=True)
    with open(FOLDER / "train.log", "a") as log_file:

        def log(line):
            line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}"
            print(line, flush=True)
            log_file.write(line + "\n")
            log_file.flush()

        def on_loss(step, loss):
            if step % 100 == 0:
                log(f"step {step} loss {loss:.4f}")

        resume = CHECKPOINT.exists()
        train(
            PACK,
            CHECKPOINT,
            steps=TOTAL_STEPS,
            batch_size=BATCH,
            lr=LR,
            device="cpu",
            resume=CHECKPOINT if resume else None,
            init=None if resume else V1,
            augmentation="lab",
            checkpoint_every=250,
            validate_every=1000,
            time_limit=args.minutes * 60,
            log=log,
            on_loss=on_loss,
        )


def check_sets(size):
    """The check's crops at the models' ``size``, cut once and cached beside the checkpoint."""
    from _sets import central_cell_crops, dataset1_records, pbc_stratified

    from napari_cytodiffusion.core.io import read_image
    from napari_cytodiffusion.core.tasks.classify import shared_rbc_diameter

    cache = FOLDER / f"check_sets_{size}.npz"
    if not cache.exists():
        FOLDER.mkdir(parents=True, exist_ok=True)
        lab = dataset1_records(limit=150)
        scale = shared_rbc_diameter([path for path, _ in lab])
        lab_crops, _, _ = central_cell_crops([read_image(p) for p, _ in lab], scale, size)
        val = pbc_stratified("val", 15, seed=1)
        scale = shared_rbc_diameter([r.path for r in val])
        val_crops, _, _ = central_cell_crops([read_image(r.path) for r in val], scale, size)
        np.savez(
            cache,
            dataset1=lab_crops,
            dataset1_labels=[label for _, label in lab],
            pbc_val=val_crops,
            pbc_val_labels=[r.label for r in val],
        )
    return np.load(cache)


def with_blurred_val(sets, sigmas):
    """``sets`` and the PBC val crops blurred by each Gaussian ``sigma`` (model px): whether a
    model's calls survive the softness of other labs' optics within its own domain."""
    from _sets import blurred

    sets = dict(sets)
    for sigma in sigmas:
        soft = blurred(sets["pbc_val"].astype(np.float32), sigma)
        sets[f"pbc_val_blur{sigma:g}"] = soft.astype(sets["pbc_val"].dtype)
        sets[f"pbc_val_blur{sigma:g}_labels"] = sets["pbc_val_labels"]
    return sets


def quick_check(model, sets):
    """Balanced accuracy, recalls and call counts of each set, without calibration."""
    from napari_cytodiffusion.core.model.classifier import class_errors

    classes = np.array(model.classes)
    out = {}
    for name in [key for key in sets if not key.endswith("_labels")]:
        errors, _ = class_errors(model, sets[name], "exhaustive", 0, CHECK_TRIALS)
        logs = np.log(errors)
        calls = classes[(logs - logs.mean(2, keepdims=True)).mean(1).argmin(1)]
        truth = sets[f"{name}_labels"]
        recall = {c: round(float(np.mean(calls[truth == c] == c)), 3) for c in sorted(set(truth))}
        out[name] = {
            "balanced_accuracy": round(float(np.mean(list(recall.values()))), 3),
            "recall": recall,
            "calls": {str(c): int(np.sum(calls == c)) for c in classes if np.any(calls == c)},
        }
    return out


def check(args):
    """Quick-check the checkpoint (and v1); append the row to the results file."""
    import torch

    from napari_cytodiffusion.core.model.checkpoint import load_model_file

    checkpoint = Path(args.checkpoint)
    if not checkpoint.exists():
        hint = ": run a `leg` first" if checkpoint == CHECKPOINT else ""
        raise SystemExit(f"No checkpoint or model file at {checkpoint}{hint}.")
    row = {"date": time.strftime("%Y-%m-%d %H:%M"), "checkpoint_file": str(checkpoint)}
    if checkpoint.suffix == ".ckpt":
        row["step"] = int(torch.load(checkpoint, map_location="cpu", weights_only=True)["step"])
        if checkpoint == CHECKPOINT:
            row["images"] = row["step"] * BATCH
    started = time.time()
    models = {"checkpoint": load_model_file(checkpoint, "cpu")}
    if not args.skip_v1:
        models["v1"] = load_model_file(V1, "cpu")
    sizes = {model.image_size for model in models.values()}
    if len(sizes) != 1:
        raise SystemExit(f"v1 and the checkpoint see cells at different sizes: {sorted(sizes)}.")
    sets = with_blurred_val(check_sets(sizes.pop()), args.blur)
    for name, model in models.items():
        row[name] = quick_check(model, sets)
    row["seconds"] = round(time.time() - started)
    row["machine"] = f"{torch.get_num_threads()} torch threads, CPU"
    path = RESULTS / "v2_on_cpu.json"
    rows = json.loads(path.read_text()) if path.exists() else []
    path.write_text(json.dumps(rows + [row], indent=1) + "\n")
    print(json.dumps(row, indent=1))


def export(args):
    """Write the checkpoint's weights under v1's calibration, a base for adapting."""
    from napari_cytodiffusion.core.model.checkpoint import load_model_file, save_model_file

    model = load_model_file(V1, "cpu")
    model.unet.load_state_dict(load_model_file(CHECKPOINT, "cpu").unet.state_dict())
    model.metadata = {**model.metadata, "name": "v2cpu-base", "weights": str(CHECKPOINT)}
    save_model_file(model, FOLDER / "v2cpu-base.pt")
    print(FOLDER / "v2cpu-base.pt")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="part", required=True)
    sub.add_parser("leg").add_argument("--minutes", type=float, default=60.0)
    checking = sub.add_parser("check")
    checking.add_argument("--checkpoint", default=str(CHECKPOINT), help="a checkpoint or model")
    checking.add_argument("--blur", type=float, nargs="*", default=[], help="PBC val blurred too")
    checking.add_argument("--skip-v1", action="store_true", help="check the checkpoint alone")
    sub.add_parser("export")
    args = parser.parse_args()
    {"leg": leg, "check": check, "export": export}[args.part](args)


if __name__ == "__main__":
    main()
