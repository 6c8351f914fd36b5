"""Which input recipe carries PBC's classes to another lab's cells: a quick CNN probe.

Issue 9's v2 diffusion model needs a GPU run that no session has had for a while, and a
diffusion model does not train far enough on this CPU to tell recipes apart (the runs here
reached 0.2-0.39 balanced accuracy on WBC dataset 1). A small CNN trains to convergence here
in minutes, on the same pack, the same augmentations and the same crops, so it can answer a
narrower question first: how far does a recipe let *any* model trained on PBC call dataset
1's cells? What no discriminative model gets across with is unlikely to get a diffusion model
across.

``run``: train one probe for ``--minutes`` and score it on all 300 WBC dataset 1 cells
(through the user's path: each image prepared, one red-cell scale shared by all) and on the
PBC **val** cells of the pack, sharp and blurred (sigma 1 model px); the row is appended to
``benchmarks/results/cnn_probe.json``::

    python benchmarks/cnn_probe.py run --augmentation lab --input grey --minutes 15

Inputs: ``rgb`` as the diffusion model sees cells; ``grey`` the luminance alone, so that no
call can rest on the stain's hues. ``--grey-share`` greys that share of the training views
(``core.model.augment.greyscale``), ``--colour-strength`` widens the stain and hue changes.
``--unlabelled N`` adds FixMatch's self-training on N of the pack's unlabelled CBC and
phone-camera white cells a step (:func:`pseudo_labelled_loss`; ``--align`` holds each
class's share of its guesses to the labelled views', :func:`aligned`); each check then counts
the classes the probe took for them.

``score``: saved probes (``run --save``), alone or several together::

    cd work_data/cnn_probe && python ../../benchmarks/cnn_probe.py score lab_rgb.pt lab_grey.pt

Dataset 1 holds a single basophil, so each row also gives the balanced accuracy over the
classes of 10 cells or more (its four others; every PBC class).
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
FOLDER = REPO / "work_data" / "cnn_probe"
SIZE = 64
BATCH = 64
NOT_WHITE_CELLS = ("erythroblast", "platelet")


def probe_network(in_channels, num_classes):
    """A strided stem, then four stages of two 3 x 3 convolutions (24-192 channels), each
    halving the image, pooled, and a linear layer: small enough for minutes on one core."""
    from torch import nn

    def block(width, out, stride=1):
        conv = nn.Conv2d(width, out, 3, stride=stride, padding=1, bias=False)
        return [conv, nn.BatchNorm2d(out), nn.ReLU(inplace=True)]

    layers, width = block(in_channels, 24, stride=2), 24
    for out in (24, 48, 96, 192):
        layers += block(width, out) + block(out, out) + [nn.MaxPool2d(2)]
        width = out
    head = [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes)]
    return nn.Sequential(*layers, *head)


def to_input(x, mode):
    """Float (n, 3, s, s) crops in [0, 1] as the probe reads them, centred on 0."""
    from napari_cytodiffusion.core.model.augment import greyscale

    if mode == "grey":
        x = greyscale(x, None)[:, :1]
    return x - 0.5


def dataset1_crops():
    """All WBC dataset 1 cells as ``classify`` cuts several single-cell images (cached)."""
    from _sets import central_cell_crops, dataset1_records

    from napari_cytodiffusion.core.io import read_image
    from napari_cytodiffusion.core.tasks.classify import shared_rbc_diameter

    cache = FOLDER / f"dataset1_{SIZE}.npz"
    if not cache.exists():
        FOLDER.mkdir(parents=True, exist_ok=True)
        records = dataset1_records()
        scale = shared_rbc_diameter([path for path, _ in records])
        crops, _, _ = central_cell_crops([read_image(p) for p, _ in records], scale, SIZE)
        np.savez(cache, crops=crops, labels=[label for _, label in records])
    with np.load(cache) as saved:
        return saved["crops"], saved["labels"]


def as_float(crops):
    """(n, s, s, 3) crops, uint8 or float in [0, 1] -> float tensor (n, 3, s, s)."""
    import torch

    x = torch.from_numpy(np.asarray(crops, dtype=np.float32))
    if crops.dtype == np.uint8:
        x = x / 255
    return x.permute(0, 3, 1, 2).contiguous()


def scored_sets(pack, mode):
    """{name: (float crops, class names)}: dataset 1 and PBC val, sharp and blurred, and for
    a colour probe both sets in grey too (what a probe that has seen grey cells makes of
    cells whose foreign hues are taken away)."""
    from _sets import blurred

    from napari_cytodiffusion.core.model.augment import greyscale

    keep = np.flatnonzero((pack.splits == "val") & (pack.labels >= 0))
    offset = (pack.images.shape[1] - SIZE) // 2
    val = pack.images[keep][:, offset : offset + SIZE, offset : offset + SIZE]
    val_labels = np.array(pack.classes)[pack.labels[keep]]
    crops, labels = dataset1_crops()
    sets = {
        "dataset1": (as_float(crops), labels),
        "pbc_val": (as_float(val), val_labels),
        "pbc_val_blur1": (as_float(blurred(val.astype(np.float32) / 255)), val_labels),
    }
    if mode == "rgb":
        for name in ("dataset1", "pbc_val"):
            x, truth = sets[name]
            sets[f"{name}_as_grey"] = (greyscale(x, None), truth)
    return sets


def score(predict, sets, classes):
    """Balanced accuracy, recalls and call counts of every set; ``predict`` maps float crops
    (n, 3, s, s) to class log-probabilities or logits."""
    import torch

    out = {}
    with torch.no_grad():
        for name, (x, truth) in sets.items():
            logits = torch.cat([predict(part) for part in x.split(256)])
            calls = np.array(classes)[logits.argmax(1).numpy()]
            names = sorted(set(truth))
            recall = {c: round(float(np.mean(calls[truth == c] == c)), 3) for c in names}
            # Dataset 1 holds one basophil: its one call moves the balanced accuracy by 0.2.
            common = [recall[c] for c in recall if np.sum(truth == c) >= 10]
            out[name] = {
                "balanced_accuracy": round(float(np.mean(list(recall.values()))), 3),
                "balanced_accuracy_classes_of_10_cells_or_more": round(float(np.mean(common)), 3),
                "recall": recall,
                "calls": {c: int(np.sum(calls == c)) for c in classes if np.any(calls == c)},
            }
    return out


def score_network(network, sets, classes, mode):
    """:func:`score` of one probe, in evaluation mode (its batch norms' running statistics)."""
    network.eval()
    out = score(lambda x: network(to_input(x, mode)), sets, classes)
    network.train()
    return out


def append_row(row):
    """Add ``row`` to ``benchmarks/results/cnn_probe.json``."""
    path = RESULTS / "cnn_probe.json"
    rows = json.loads(path.read_text()) if path.exists() else []
    path.write_text(json.dumps(rows + [row], indent=1) + "\n")


def summary(scores):
    """{set: balanced accuracy over its classes of 10 cells or more} of a check's scores
    (its step, minutes and pseudo-label counts left out)."""
    key = "balanced_accuracy_classes_of_10_cells_or_more"
    return {name: v[key] for name, v in scores.items() if isinstance(v, dict) and key in v}


def lab_settings(args):
    """Overrides of the lab augmentations: greyed views, stain and hue changes made wider."""
    from napari_cytodiffusion.core.model.augment import LAB_AUGMENTATIONS

    settings = {"grey": (args.grey_share, {})}
    for name, wider in (("stain", ("amount", "hue_degrees")), ("colour", ("hue", "saturation"))):
        probability, parameters = LAB_AUGMENTATIONS[name]
        parameters = {
            k: v * args.colour_strength if k in wider else v for k, v in parameters.items()
        }
        settings[name] = (probability, parameters)
    return settings


def run(args):
    import torch
    from torch.nn import functional as F

    from napari_cytodiffusion.core.datasets import load_pack
    from napari_cytodiffusion.core.model.training import ZOOM, augment

    if not PACK.exists():
        raise SystemExit(f"No pack at {PACK}: run `python benchmarks/train_v2_gpu.py pack`.")
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    pack = load_pack(PACK)
    sets = scored_sets(pack, args.input)
    train = np.flatnonzero((pack.splits == "train") & (pack.labels >= 0))
    images, labels = torch.from_numpy(pack.images[train]), torch.from_numpy(pack.labels[train])
    # Square-root class balancing, as the diffusion model's training draws its batches.
    counts = np.bincount(pack.labels[train], minlength=len(pack.classes))
    weights = torch.tensor(1 / np.sqrt(counts[pack.labels[train]]))
    # CBC and phone-camera train cells without a class (the pack's null-class cells).
    unlabelled = torch.from_numpy(pack.images[pack.labels < 0])
    network = probe_network(1 if args.input == "grey" else 3, len(pack.classes))
    optimiser = torch.optim.AdamW(network.parameters(), lr=args.lr, weight_decay=1e-4)
    row = {"date": time.strftime("%Y-%m-%d %H:%M"), **vars(args), "lr_schedule": "cosine"}
    if args.unlabelled:
        row["pseudo_labels_from"] = "white-cell classes"
    row["checks"] = []
    started, step, next_check = time.time(), 0, args.check_minutes * 60
    pseudo_labels = []  # per step: the class taken for each unlabelled cell, -1 below threshold
    shares = {}  # --align: running mean class probabilities of the unlabelled cells
    # The unlabelled cells were boxed as white cells: a guess is one of these classes.
    possible = torch.tensor([c not in NOT_WHITE_CELLS for c in pack.classes])
    lab = args.augmentation == "lab" and lab_settings(args)
    while time.time() - started < args.minutes * 60:
        pick = torch.multinomial(weights, BATCH, replacement=True, generator=generator)
        x = augment(images[pick], SIZE, generator, zoom=ZOOM[args.augmentation], lab=lab)
        if args.unlabelled:
            extra = unlabelled, lab or True, generator, possible, shares
            loss, taken = pseudo_labelled_loss(network, x, labels[pick], *extra, args)
            pseudo_labels.append(taken)
        else:
            loss = F.cross_entropy(network(to_input(x, args.input)), labels[pick].long())
        optimiser.zero_grad()
        loss.backward()
        # A cosine decay over the run's time, so that its last checks score a settled network.
        progress = min((time.time() - started) / (args.minutes * 60), 1.0)
        for group in optimiser.param_groups:
            group["lr"] = args.lr * 0.5 * (1 + np.cos(np.pi * progress))
        optimiser.step()
        step += 1
        if time.time() - started >= next_check:
            next_check += args.check_minutes * 60
            check = {"step": step, "minutes": round((time.time() - started) / 60, 1)}
            check.update(score_network(network, sets, pack.classes, args.input))
            if pseudo_labels:
                check["pseudo_labels"] = pseudo_label_counts(pseudo_labels, pack.classes)
                pseudo_labels.clear()
            row["checks"].append(check)
            print(step, f"loss {loss.item():.3f}", summary(check), flush=True)
    if not row["checks"] or row["checks"][-1]["step"] != step:
        final = {"step": step, "minutes": round((time.time() - started) / 60, 1)}
        row["checks"].append({**final, **score_network(network, sets, pack.classes, args.input)})
    row["machine"] = f"{torch.get_num_threads()} torch threads, CPU"
    if args.save:
        Path(args.save).parent.mkdir(parents=True, exist_ok=True)
        torch.save(network.state_dict(), args.save)
    append_row(row)
    print(json.dumps(row["checks"][-1], indent=1))


def pseudo_labelled_loss(network, x, truth, unlabelled, lab, generator, possible, shares, args):
    """Cross-entropy of the labelled views plus FixMatch's term on unlabelled cells of other
    labs: a mildly changed view (geometry only) names the class where the probe is sure
    (``--threshold``), and a strongly changed view (the lab augmentations) is taught it. The
    cells were annotated as white cells, so a guess is never a platelet or an erythroblast
    (unrestricted, the probe called nearly all of them platelet and learned that): only the
    ``possible`` classes are guessed. With ``--align`` the guesses are made from
    :func:`aligned` probabilities, ``shares`` keeping its running mean.
    Returns the loss and the classes taken (-1 where the probe was unsure)."""
    import torch
    from torch.nn import functional as F

    from napari_cytodiffusion.core.model.training import ZOOM, augment

    pick = torch.randint(len(unlabelled), (args.unlabelled,), generator=generator)
    weak = augment(unlabelled[pick], SIZE, generator, zoom=ZOOM["basic"])
    strong = augment(unlabelled[pick], SIZE, generator, zoom=ZOOM["lab"], lab=lab)
    # One pass for all three, so that the batch norms see every domain together.
    logits = network(to_input(torch.cat([x, weak, strong]), args.input))
    labelled, weak_logits, strong_logits = logits.split([len(x), len(pick), len(pick)])
    weak_logits = weak_logits.detach().masked_fill(~possible, -torch.inf)
    probability = weak_logits.softmax(1)
    if args.align:
        probability = aligned(probability, labelled.detach().softmax(1), possible, shares)
    confidence, guess = probability.max(1)
    sure = confidence >= args.threshold
    per_cell = F.cross_entropy(strong_logits, guess, reduction="none")
    taught = args.unlabelled_weight * (per_cell * sure).mean()
    return F.cross_entropy(labelled, truth.long()) + taught, torch.where(sure, guess, -1)


def aligned(probability, labelled, possible, shares):
    """Distribution alignment (ReMixMatch): scale the unlabelled cells' class probabilities
    by the labelled views' class shares (among the white-cell classes) over a running mean of
    their own, so that no class can take over the pseudo-labels."""
    mean = probability.mean(0)
    shares["unlabelled"] = 0.99 * shares.get("unlabelled", mean) + 0.01 * mean
    target = labelled.mean(0) * possible
    target = target / target.sum()
    scaled = probability * target / shares["unlabelled"].clamp_min(1e-6)
    return scaled / scaled.sum(1, keepdim=True)


def pseudo_label_counts(taken, classes):
    """{class: cells taken, "unsure": cells below the threshold} over the steps of ``taken``."""
    import torch

    taken = torch.cat(taken)
    counts = {c: int((taken == i).sum()) for i, c in enumerate(classes)}
    return {**counts, "unsure": int((taken < 0).sum())}


def score_saved(args):
    """Score saved probes, one alone or several together (their mean probabilities: a colour
    probe and a grey one miss different classes of dataset 1), on the sets of ``run``;
    ``--grey-views``: each colour probe reads every cell in colour and greyed."""
    import torch

    from napari_cytodiffusion.core.datasets import load_pack
    from napari_cytodiffusion.core.model.augment import greyscale

    pack = load_pack(PACK)
    sets = scored_sets(pack, "grey")
    members = []
    for path in args.weights:
        state = torch.load(path, map_location="cpu", weights_only=True)
        channels = state["0.weight"].shape[1]  # the stem's input: 1 for a grey probe
        network = probe_network(channels, len(pack.classes))
        network.load_state_dict(state)
        members.append((network.eval(), "grey" if channels == 1 else "rgb"))

    def mean_probability(x):
        probabilities = []
        for network, mode in members:
            probabilities.append(network(to_input(x, mode)).softmax(1))
            if args.grey_views and mode == "rgb":
                probabilities.append(network(to_input(greyscale(x, None), mode)).softmax(1))
        return torch.stack(probabilities).mean(0).log()

    row = {"date": time.strftime("%Y-%m-%d %H:%M"), "probes": [str(w) for w in args.weights]}
    row["grey_views"] = args.grey_views
    row.update(score(mean_probability, sets, pack.classes))
    append_row(row)
    print(summary(row))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="part", required=True)
    running = sub.add_parser("run")
    running.add_argument("--augmentation", choices=("basic", "lab"), default="lab")
    running.add_argument("--input", choices=("rgb", "grey"), default="rgb")
    running.add_argument("--minutes", type=float, default=15.0)
    running.add_argument("--check-minutes", type=float, default=5.0)
    running.add_argument("--grey-share", type=float, default=0.0, help="lab only: greyed views")
    running.add_argument(
        "--colour-strength", type=float, default=1.0, help="lab only: stain and hue ranges times"
    )
    running.add_argument("--lr", type=float, default=1e-3, help="peak, decayed to 0 by the end")
    running.add_argument(
        "--unlabelled", type=int, default=0, help="unlabelled CBC / phone cells a step (FixMatch)"
    )
    running.add_argument("--threshold", type=float, default=0.95, help="FixMatch's confidence")
    running.add_argument("--unlabelled-weight", type=float, default=1.0)
    running.add_argument(
        "--align", action="store_true", help="FixMatch with distribution alignment"
    )
    running.add_argument("--seed", type=int, default=0)
    running.add_argument("--save", help="where to keep the trained probe's weights")
    saved = sub.add_parser("score")
    saved.add_argument("weights", nargs="+", help="probes saved by `run --save`")
    saved.add_argument(
        "--grey-views", action="store_true", help="colour probes also read each cell greyed"
    )
    args = parser.parse_args()
    if args.part == "score":
        return score_saved(args)
    if (args.grey_share or args.colour_strength != 1) and args.augmentation != "lab":
        parser.error(
            "--grey-share and --colour-strength change lab augmentations: add --augmentation lab"
        )
    run(args)


if __name__ == "__main__":
    main()
