"""Training ``cytodiffusion-pbc64-v2`` and the leave-one-class-out checks on one GPU.

Two steps, the first here on a CPU, the second in one command on a GPU machine (no napari,
pooch or network needed there; torch, numpy, scipy and Pillow are):

1. ``pack``: every PBC cell (train, val and test splits, at PBC's red-cell scale of 29 px) and
   the unlabelled white cells of the CBC and phone-camera (wbc_smartphone_pig) *train* fields
   (at their annotated boxes, each field prepared as a user's would be), normalised exactly as
   at inference (``core/smear/normalise.py``: background, red cells, nuclear hue), in one
   ``.npz`` of JPEG crops 1.25 times wider than the model's 64 px::

       python benchmarks/train_v2_gpu.py pack --out work_data/v2/pack.npz

   About 20 minutes on two CPU cores; 36.5 MiB (2026-12-06). The pack must stay under
   ``--max-mib`` (the working tree, about 22 MiB, and the carried files travel together,
   64 MiB at most).

2. ``gpu``: in one command of at most ten minutes (``--minutes``, default 9), side by side on
   the one GPU:

   * **v2**: fine-tuned from v1's weights (trained on PBC train only) with every lab
     augmentation (``core/model/augment.py``: stain in optical-density space, hue and
     saturation, brightness, contrast and gamma, background tint and vignetting, blur,
     sensor noise, JPEG artefacts; scale +-20 %), the unlabelled cells training the null
     class; checkpoints as it goes; exported to ``$OUT/cytodiffusion-pbc64-v2.pt``
     (uncalibrated), and its exhaustive paired errors of every class and the null class on
     all PBC val and test cells (``$OUT/v2_errors.npz``, for the calibration on a CPU);
   * **leave-one-class-out**: for each class of ``--leave-out`` (default erythroblast and
     monocyte) a model trained from scratch without any cell of that class, calibrated on the
     val cells of the other classes, and every anomaly score of ``core/model/anomaly.py``
     measured on the test cells: AUROC of the left-out class against the others.

   ``$OUT/v2_results.json`` gathers everything; each run's log is ``$OUT/<run>.log``::

       PYTHONPATH=src PYTHONUNBUFFERED=1 python benchmarks/train_v2_gpu.py gpu \\
           --pack work_data/v2/pack.npz --out $OUT

   run with ``carry: ["work_data/v2"]`` and ``timeout_s: 600``.

``run`` (one training and its evaluation) is what ``gpu`` starts per run; it also runs on a
CPU for a few steps (``tests/test_training.py``).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DATA = REPO.parent / "shared" / "data"
V1 = REPO / "src" / "napari_cytodiffusion" / "models" / "cytodiffusion-pbc64-v1.pt"
PBC_SCALE = 29.0
PACK_MARGIN = 1.25
PACK_QUALITY = 82


# ----------------------------------------------------------------------------- packing


def unlabelled_records(split="train"):
    """Records of the white cells of CBC and phone-camera fields at their annotated boxes."""
    from PIL import Image

    from napari_cytodiffusion.core.datasets import Record, voc_boxes, yolo_boxes

    records = []
    cbc = DATA / "cbc" / split
    for xml in sorted((cbc / "annotations").glob("*.xml")):
        for r0, c0, r1, c1 in voc_boxes(xml).get("WBC", []):
            centre = ((r0 + r1) / 2, (c0 + c1) / 2)
            records.append(
                Record(cbc / "images" / f"{xml.stem}.jpg", "", "train", None, centre, "cbc")
            )
    pig = DATA / "wbc_smartphone_pig" / split
    for label_file in sorted((pig / "labels").glob("*.txt")):
        images = [pig / "images" / f"{label_file.stem}{s}" for s in (".jpg", ".png", ".jpeg")]
        image = next((p for p in images if p.exists()), None)
        if image is None:
            continue
        width, height = Image.open(image).size
        for r0, c0, r1, c1 in yolo_boxes(label_file, (height, width)):  # one class: WBC
            records.append(Record(image, "", "train", None, ((r0 + r1) / 2, (c0 + c1) / 2), "pig"))
    return records


def pack(args):
    from napari_cytodiffusion.core.datasets import Record, list_labelled_images, pack_cells

    pbc = [
        Record(r.path, r.label, r.split, PBC_SCALE, None, "pbc")
        for r in list_labelled_images(DATA / "pbc" / "splits.csv")
    ]
    unlabelled = unlabelled_records()
    if args.limit:
        pbc, unlabelled = pbc[:: max(1, len(pbc) // args.limit)], unlabelled[: args.limit // 4]
    records = pbc + unlabelled
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()

    def progress(done, total):
        if done % 500 == 0 or done == total:
            print(f"{done}/{total} cells, {time.time() - started:.0f} s", flush=True)

    pack_cells(records, out, 64, None, args.quality, progress, margin=args.margin)
    mib = out.stat().st_size / 2**20
    print(f"{out}: {len(pbc)} PBC cells, {len(unlabelled)} unlabelled, {mib:.1f} MiB")
    if mib > args.max_mib:
        raise SystemExit(f"the pack is {mib:.1f} MiB, over --max-mib {args.max_mib}")


# ----------------------------------------------------------------------------- one run


def _crops(cells, split, image_size):
    """The centred model-size float crops and labels of one split of a decoded pack."""
    keep = np.flatnonzero((cells.splits == split) & (cells.labels >= 0))
    offset = (cells.images.shape[1] - image_size) // 2
    window = slice(offset, offset + image_size)
    crops = cells.images[keep][:, window, window].astype(np.float32) / 255
    return crops, cells.labels[keep]


def _metrics(calls, truth, classes):
    sys.path.insert(0, str(HERE))
    from _metrics import call_metrics

    return call_metrics(calls, [classes[i] for i in truth], classes)


def evaluate(model_path, pack_path, device, trials, leave_out=(), limit=None, errors_out=None):
    """Calibrate on val and measure on test: calls (the v2 run) or anomaly AUROCs (a run with
    classes left out)."""
    import copy

    from napari_cytodiffusion.core.datasets import load_pack
    from napari_cytodiffusion.core.model import anomaly
    from napari_cytodiffusion.core.model.calibration import fit_calibration
    from napari_cytodiffusion.core.model.checkpoint import load_model_file
    from napari_cytodiffusion.core.model.classifier import (
        calls_from_errors,
        class_errors,
        evidence,
        replay_adaptive,
        trial_timesteps,
    )

    sys.path.insert(0, str(HERE))
    from _metrics import auroc

    model = load_model_file(model_path, device)
    cells = load_pack(pack_path, splits=("val", "test"))
    left = [model.classes.index(c) for c in leave_out]
    kept = [i for i in range(model.num_classes) if i not in left]
    out, errors = {}, {}
    for split in ("val", "test"):
        crops, labels = _crops(cells, split, model.image_size)
        if limit:  # spread over the split, which the pack holds class by class
            some = np.linspace(0, len(labels) - 1, min(limit, len(labels))).astype(int)
            crops, labels = crops[some], labels[some]
        started = time.time()
        errors[split], _ = class_errors(
            model, crops, "exhaustive", 0, trials, classes=kept, null=True
        )
        errors[split + "_labels"] = labels
        out[f"{split}_errors_seconds"] = time.time() - started
    if errors_out:
        np.savez_compressed(
            errors_out,
            val=errors["val"].astype(np.float16),
            val_labels=errors["val_labels"],
            test=errors["test"].astype(np.float16),
            test_labels=errors["test_labels"],
            classes=np.array(model.classes),
            kept=np.array(kept),
        )
    # A model of the kept classes only: column j is class kept[j]; the null class is last.
    view = copy.copy(model)
    view.classes = tuple(model.classes[i] for i in kept)
    remap = {c: j for j, c in enumerate(kept)}
    known = np.isin(errors["val_labels"], kept)
    val_labels = np.array([remap[c] for c in errors["val_labels"][known]])
    fit_calibration(view, errors["val"][known], val_labels)
    test, test_labels = errors["test"], errors["test_labels"]
    replayed, spent = replay_adaptive(view, test)
    if not left:
        calls = calls_from_errors(view, replayed, spent)
        out["test_adaptive"] = _metrics(calls, [remap[c] for c in test_labels], view.classes)
        return out, view.calibration
    timesteps = trial_timesteps(test.shape[1])
    val_replayed, _ = replay_adaptive(view, errors["val"][known])
    _, best = evidence(view, replayed[:, :, :-1])
    for method in anomaly.METHODS:
        reference = anomaly.fit_reference(
            method, val_replayed[:, :, :-1], val_replayed[:, :, -1], val_labels, timesteps
        )
        scores = anomaly.score(reference, replayed[:, :, :-1], replayed[:, :, -1], best, timesteps)
        scores = np.nan_to_num(scores, nan=0.0)
        out[f"anomaly_auroc/{method}"] = {
            name: auroc(test_labels == c, scores) for name, c in zip(leave_out, left, strict=True)
        }
    uncertainty = [c.uncertainty for c in calls_from_errors(view, replayed, spent)]
    out["anomaly_auroc/uncertainty"] = {
        name: auroc(test_labels == c, uncertainty) for name, c in zip(leave_out, left, strict=True)
    }
    return out, view.calibration


def run(args):
    """Train one model (v2 or a left-out run) within its time, export it, evaluate it."""
    import torch

    from napari_cytodiffusion.core.model.training import export_model, train

    deadline = time.time() + args.minutes * 60
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(args.scratch or out)
    scratch.mkdir(parents=True, exist_ok=True)
    checkpoint = scratch / f"{args.name}.ckpt"
    log_file = open(out / f"{args.name}.log", "a")

    def log(line):
        print(f"[{args.name}] {line}", flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    common = {
        "batch_size": args.batch_size,
        "lr": args.lr,
        "device": args.device,
        "seed": args.seed,
        "channels": tuple(int(c) for c in args.channels.split(",")),
        "augmentation": args.augmentation,
        "leave_out": tuple(args.leave_out),
        "log": log,
        "checkpoint_every": args.checkpoint_every,
        "validate_every": args.validate_every,
    }
    init = None if args.leave_out or args.from_scratch else args.init
    # A short first leg measures the speed; the second plans the learning-rate decay so that
    # it ends with the time left for training.
    train_seconds = max(args.minutes * 60 - args.eval_seconds, 1)
    if args.steps:
        summary = train(args.pack, checkpoint, steps=args.steps, init=init, **common)
    else:
        first = 200
        started = time.time()
        train(args.pack, checkpoint, steps=first, init=init, **common)
        rate = first / (time.time() - started)
        total = int(first + rate * max(train_seconds - (time.time() - started), 1) * 0.97)
        log(f"{rate:.1f} steps/s measured; planning {total} steps")
        left = deadline - args.eval_seconds - time.time()
        summary = train(
            args.pack, checkpoint, steps=total, resume=checkpoint, time_limit=left, **common
        )
    model_file = out / (args.export_name or f"{args.name}.pt")
    metadata = {
        "name": args.export_name.removesuffix(".pt") if args.export_name else args.name,
        "trained_on": "PBC train split; unlabelled CBC and wbc_smartphone_pig train white cells "
        "(null class only)",
        "augmentation": "lab (core/model/augment.py) and scale +-20 %"
        if args.augmentation == "lab"
        else args.augmentation,
        "left_out": list(args.leave_out),
        "init": str(init) if init else None,
        "steps": summary["step"],
        "device": torch.cuda.get_device_name() if args.device == "cuda" else args.device,
    }
    export_model(checkpoint, model_file, metadata=metadata)
    result = {"steps": summary["step"], "train_seconds": summary["seconds"]}
    result["val_loss"] = summary["history"]["val_loss"][-1:] or None
    errors_out = out / f"{args.name}_errors.npz" if args.save_errors else None
    evaluation, calibration = evaluate(
        model_file,
        args.pack,
        args.device,
        args.trials,
        tuple(args.leave_out),
        args.eval_limit,
        errors_out,
    )
    result.update(evaluation)
    if not args.leave_out:
        # The calibration fitted on val with these errors, ready to store in the model file.
        (out / f"{args.name}_calibration.json").write_text(json.dumps(calibration) + "\n")
    if not args.keep_model:
        model_file.unlink()
    (out / f"{args.name}_result.json").write_text(json.dumps(result, indent=2) + "\n")
    log(json.dumps(result))
    return result


# ----------------------------------------------------------------------------- the GPU command


def gpu(args):
    """Start v2 and the left-out runs side by side; gather their results."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(args.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    script = str(Path(__file__).resolve())
    base = [sys.executable, script, "run", "--pack", args.pack, "--out", str(out)]
    base += ["--scratch", str(scratch), "--device", "cuda", "--trials", str(args.trials)]
    runs = {
        "v2": base
        + ["--name", "v2", "--minutes", str(args.minutes), "--lr", "2e-4"]
        + ["--export-name", "cytodiffusion-pbc64-v2.pt", "--keep-model", "--save-errors"]
    }
    for name in args.leave_out:
        runs[f"without_{name}"] = base + [
            "--name",
            f"without_{name}",
            "--minutes",
            str(args.minutes - 0.5),
            "--leave-out",
            name,
            "--lr",
            "4e-4",
        ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    started = time.time()
    processes = {name: subprocess.Popen(command, env=env) for name, command in runs.items()}
    codes = {name: process.wait() for name, process in processes.items()}
    summary = {"return_codes": codes, "wall_seconds": time.time() - started}
    for name in runs:
        path = out / f"{name}_result.json"
        summary[name] = json.loads(path.read_text()) if path.exists() else None
        path.unlink(missing_ok=True)
    try:
        import torch

        summary["device"] = torch.cuda.get_device_name()
    except Exception as error:  # noqa: BLE001 - only a label
        summary["device"] = str(error)
    (out / "v2_results.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="part", required=True)
    p = sub.add_parser("pack")
    p.add_argument("--out", default=str(REPO / "work_data" / "v2" / "pack.npz"))
    p.add_argument("--quality", type=int, default=PACK_QUALITY)
    p.add_argument("--margin", type=float, default=PACK_MARGIN)
    p.add_argument("--max-mib", type=float, default=38.0)
    p.add_argument("--limit", type=int, help="about this many PBC cells (a quick check)")
    g = sub.add_parser("gpu")
    g.add_argument("--pack", required=True)
    g.add_argument("--out", required=True)
    g.add_argument("--scratch", default="/tmp/v2_scratch")
    g.add_argument("--minutes", type=float, default=9.0)
    g.add_argument("--trials", type=int, default=32)
    g.add_argument("--leave-out", nargs="*", default=["erythroblast", "monocyte"])
    r = sub.add_parser("run")
    r.add_argument("--pack", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--scratch")
    r.add_argument("--name", default="v2")
    r.add_argument("--export-name")
    r.add_argument("--device", default="cuda")
    r.add_argument("--minutes", type=float, default=8.0)
    r.add_argument("--eval-seconds", type=float, default=75.0)
    r.add_argument("--steps", type=int, help="a fixed number of steps instead of --minutes")
    r.add_argument("--batch-size", type=int, default=256)
    r.add_argument("--lr", type=float, default=2e-4)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--channels", default="64,128,192")
    r.add_argument("--init", default=str(V1))
    r.add_argument("--from-scratch", action="store_true")
    r.add_argument("--augmentation", default="lab", choices=["lab", "basic"])
    r.add_argument("--leave-out", nargs="*", default=[])
    r.add_argument("--trials", type=int, default=32)
    r.add_argument("--eval-limit", type=int, help="cells per split evaluated (a quick check)")
    r.add_argument("--checkpoint-every", type=int, default=1000)
    r.add_argument("--validate-every", type=int, default=1000)
    r.add_argument("--save-errors", action="store_true")
    r.add_argument("--keep-model", action="store_true")
    args = parser.parse_args()
    {"pack": pack, "gpu": gpu, "run": run}[args.part](args)


if __name__ == "__main__":
    main()
