"""The ``napari-cytodiffusion`` command: thin wrappers around the core.

Each subcommand has a ``_add_<name>`` function that declares its arguments and a ``_<name>``
function that runs it. Heavy imports happen inside those, so ``--help`` is instant.
Problems with the user's input are reported on stderr with exit code 2, never as a traceback.
"""

import argparse
import sys

USAGE_ERROR = 2


class UsageError(Exception):
    """Input the command cannot use; the message tells the user what to do."""


def _add_train(subparsers):
    parser = subparsers.add_parser(
        "train",
        help="train the diffusion model on labelled cells",
        description="Train the class-conditional diffusion model. DATA is a folder of class "
        "subfolders, a CSV with file, label and split columns, or a packed .npz.",
    )
    parser.add_argument("data", metavar="DATA")
    parser.add_argument("--out", required=True, metavar="MODEL", help="checkpoint to write")
    parser.add_argument("--resolution", type=int, default=64, help="model image size (px)")
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", metavar="CKPT", help="continue from this checkpoint")
    parser.add_argument(
        "--init",
        metavar="MODEL",
        help="fine-tune: start from the weights of this model name (e.g. default) or file; "
        "ignored with --resume",
    )
    parser.add_argument(
        "--rbc-diameter",
        type=float,
        help="red-cell diameter in pixels of the training images (one scanner); "
        "estimated per image when not given",
    )
    parser.add_argument("--time-limit", type=float, help="save and stop after this many seconds")
    parser.add_argument("--channels", default="64,128,192", help="UNet channels per level")


def _train(args):
    from pathlib import Path

    from napari_cytodiffusion.core import training
    from napari_cytodiffusion.core.datasets import list_labelled_images, pack_cells

    data = Path(args.data)
    if not data.exists():
        raise UsageError(f"No such file or folder: {data}")
    if data.suffix.lower() == ".npz":
        pack = data
    else:
        records = list_labelled_images(data)
        records = [r for r in records if r.split in ("train", "val")]
        pack = Path(args.out).with_suffix(".cells.npz")
        if not pack.exists():
            bar = _progress_bar("normalising cells")
            pack_cells(records, pack, args.resolution, args.rbc_diameter, progress=bar)
    init = None
    if args.init and not args.resume:
        from napari_cytodiffusion.core.weights import model_path

        init = model_path(
            args.init, progress=_progress_bar(f"downloading {args.init}", in_bytes=True)
        )
    bar = _progress_bar("training")
    summary = training.train(
        pack,
        args.out,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        device=args.device,
        seed=args.seed,
        resume=args.resume,
        init=init,
        channels=[int(c) for c in args.channels.split(",")],
        image_size=args.resolution,
        time_limit=args.time_limit,
        progress=lambda step, total, loss: bar(step, total, f"loss {loss:.4f}"),
        log=lambda message: print(message, file=sys.stderr),
    )
    print(f"step {summary['step']} saved to {args.out} ({summary['seconds']:.0f} s)")


def _add_models(subparsers):
    parser = subparsers.add_parser(
        "models",
        help="list, download and locate the diffusion models",
        description="Named models of the registry. NAPARI_CYTODIFFUSION_CACHE sets the download "
        "folder and NAPARI_CYTODIFFUSION_MODEL_URL a mirror to download from.",
    )
    actions = parser.add_subparsers(dest="models_command", required=True)
    actions.add_parser("list", help="the registry's models and where they are")
    download = actions.add_parser("download", help="download models (to prepare offline use)")
    download.add_argument("names", nargs="+", metavar="NAME")
    path = actions.add_parser("path", help="print a model's local file path (last line)")
    path.add_argument("name", metavar="NAME")
    hash_ = actions.add_parser("hash", help="print a model file's sha256 (for the registry)")
    hash_.add_argument("file", metavar="FILE")
    hash_.add_argument(
        "--update",
        action="store_true",
        help="record it in the registry entry with the same file name",
    )


def _models(args):
    from pathlib import Path

    from napari_cytodiffusion.core import weights

    if args.models_command == "list":
        print(f"{'name':<34} {'version':<8} {'size':<5} {'where':<10} description")
        for entry in weights.list_models():
            name = f"{entry.name} (default)" if entry.default else entry.name
            where = weights.location(entry)
            print(
                f"{name:<34} {entry.version:<8} {entry.image_size:<5} {where:<10} "
                f"{entry.description}"
            )
    elif args.models_command == "download":
        for name in args.names:
            path = weights.model_path(
                name, progress=_progress_bar(f"downloading {name}", in_bytes=True)
            )
            print(f"{name}: {path}")
    elif args.models_command == "path":
        print(
            weights.model_path(
                args.name, progress=_progress_bar(f"downloading {args.name}", in_bytes=True)
            )
        )
    elif not Path(args.file).is_file():
        raise UsageError(f"No such file: {args.file}")
    elif args.update:
        name, sha256 = weights.update_registry_hash(args.file)
        print(f"{name}: sha256 {sha256} recorded in {weights.REGISTRY_PATH}")
    else:
        print(weights.file_sha256(args.file))


def _add_generate(subparsers):
    from napari_cytodiffusion.core import generation
    from napari_cytodiffusion.core.classes import CLASSES

    parser = subparsers.add_parser(
        "generate",
        help="generate synthetic cells of one class",
        description="Generate N synthetic cells of one class with the diffusion model. Writes "
        "N PNG files and metadata.csv (file, label, seed, steps, guidance, model, sampler) to "
        "DIR; a cell's seed regenerates it alone with -n 1 --seed SEED.",
    )
    parser.add_argument("--label", required=True, metavar="CLASS", help=", ".join(CLASSES))
    parser.add_argument("-n", type=int, default=8, help="number of cells (default 8)")
    parser.add_argument("--steps", type=int, default=generation.DEFAULT_STEPS)
    parser.add_argument("--guidance", type=float, default=generation.DEFAULT_GUIDANCE)
    parser.add_argument(
        "--sampler", choices=generation.SAMPLERS, default=generation.DEFAULT_SAMPLER
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="default", help="model name or file")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    parser.add_argument("--out", required=True, metavar="DIR")


def _generate(args):
    import time

    from napari_cytodiffusion.core import generation
    from napari_cytodiffusion.core.classes import canonical_class

    label = canonical_class(args.label)
    if args.n < 1 or args.steps < 1:
        raise UsageError("-n and --steps must be at least 1.")
    model = _load_model(args.model, args.device)
    bar = _progress_bar(f"generating {args.n} {label}")
    started = time.perf_counter()
    cells = generation.generate_cells(
        model,
        label,
        args.n,
        steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
        sampler=args.sampler,
        progress=bar,
    )
    seconds = time.perf_counter() - started
    path = generation.save_cells(cells, args.out)
    print(f"{args.n} {label} cells in {seconds:.1f} s ({seconds / args.n:.2f} s per cell): {path}")


def _add_counterfactual(subparsers):
    from napari_cytodiffusion.core import counterfactual
    from napari_cytodiffusion.core.classes import CLASSES

    parser = subparsers.add_parser(
        "counterfactual",
        help="what would have to change for the model to call a cell another class",
        description="Heat map of what the model would change to call the cell TARGET, and the "
        "cell edited towards TARGET. IMAGE is a single-cell image, or a smear with --segment "
        "--cell-id. Writes to DIR: heatmap.png (over the image), heatmap.npy (image pixels, "
        "NaN outside the crop), heatmap_crop.npy, cell.png, counterfactual.png/.npy (64-px "
        "crops) and maps_all_classes.png (the maps towards every class).",
    )
    parser.add_argument("image", metavar="IMAGE")
    parser.add_argument("--target", required=True, metavar="CLASS", help=", ".join(CLASSES))
    parser.add_argument(
        "--source",
        metavar="CLASS",
        help="the cell's current class (default: the class that fits it best in these trials)",
    )
    parser.add_argument("--out", required=True, metavar="DIR")
    parser.add_argument("--segment", action="store_true", help="IMAGE is a smear: segment it")
    parser.add_argument("--cell-id", type=int, help="white-cell label id in the segmented smear")
    parser.add_argument("--rbc-diameter", type=float, help="red-cell diameter in pixels")
    parser.add_argument("--trials", type=int, default=counterfactual.DEFAULT_TRIALS)
    parser.add_argument("--strength", type=float, default=counterfactual.DEFAULT_STRENGTH)
    parser.add_argument("--guidance", type=float, default=counterfactual.DEFAULT_EDIT_GUIDANCE)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--method", choices=("noise", "invert"), default="noise")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="default", help="model name or file")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")


def _counterfactual(args):
    from pathlib import Path

    import numpy as np
    from PIL import Image

    from napari_cytodiffusion.core import counterfactual
    from napari_cytodiffusion.core.classes import canonical_class
    from napari_cytodiffusion.core.generation import to_uint8
    from napari_cytodiffusion.core.image import to_rgb_float
    from napari_cytodiffusion.core.io import read_image

    target = canonical_class(args.target)
    source = canonical_class(args.source) if args.source else None
    if args.segment != (args.cell_id is not None):
        raise UsageError("--segment and --cell-id go together: segment the smear, pick a cell.")
    rgb = to_rgb_float(read_image(args.image))
    if args.segment:
        from napari_cytodiffusion.core.segmentation import segment_smear

        found = segment_smear(rgb, args.rbc_diameter)
        site = counterfactual.labelled_cell_site(
            rgb, found.wbc_labels, args.cell_id, found.rbc_diameter
        )
    else:
        site = counterfactual.central_cell_site(rgb, args.rbc_diameter)
    model = _load_model(args.model, args.device)
    crop = site.crop(rgb, model.image_size)
    explanation = counterfactual.explain_cell(model, crop, source, args.trials, args.seed)
    edited = counterfactual.counterfactual_image(
        model,
        crop,
        target,
        explanation.source,
        args.strength,
        args.steps,
        args.guidance,
        args.method,
        args.seed,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    heat_crop = explanation.map_for(target)
    heat = site.to_image(heat_crop, rgb.shape)
    np.save(out / "heatmap_crop.npy", heat_crop)
    np.save(out / "heatmap.npy", heat)
    np.save(out / "counterfactual.npy", edited)
    Image.fromarray(to_uint8(crop)).save(out / "cell.png")
    Image.fromarray(to_uint8(edited)).save(out / "counterfactual.png")
    Image.fromarray(to_uint8(counterfactual.heat_overlay(rgb, heat))).save(out / "heatmap.png")
    figure = counterfactual.cell_maps_figure(crop, explanation, {target: edited})
    figure.savefig(out / "maps_all_classes.png")
    print(
        f"cell at ({site.centre[0]:.0f}, {site.centre[1]:.0f}): {explanation.source} -> {target} "
        f"(best fit in these trials: {explanation.predicted}); results in {out}"
    )


def _add_turing(subparsers):
    parser = subparsers.add_parser(
        "turing",
        help="blinded real-versus-synthetic test for experts",
        description="make: export a shuffled panel of N real and N synthetic cells of the same "
        "classes (DIR/panel/ for the expert, DIR/key.csv kept apart). score: score an expert's "
        "answers (item, answer = real or synthetic) against the key.",
    )
    actions = parser.add_subparsers(dest="turing_command", required=True)
    make = actions.add_parser("make", help="export a blinded panel and its key")
    make.add_argument("--real", required=True, metavar="DIR", help="class folders or splits CSV")
    make.add_argument("--n", type=int, required=True, help="real cells (as many synthetic)")
    make.add_argument("--out", required=True, metavar="DIR")
    make.add_argument("--split", choices=("train", "val", "test"), help="split of a splits CSV")
    make.add_argument("--rbc-diameter", type=float, help="red-cell diameter of the real images")
    make.add_argument("--seed", type=int, default=0, help="seeds the choice, cells and shuffle")
    make.add_argument("--steps", type=int, help="sampler steps (default: the generator's)")
    make.add_argument("--guidance", type=float, help="guidance (default: the generator's)")
    make.add_argument("--model", default="default", help="model name or file")
    make.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    score = actions.add_parser("score", help="score answers against the key")
    score.add_argument("answers", metavar="ANSWERS.csv")
    score.add_argument("key", metavar="KEY.csv")
    score.add_argument("--out", metavar="CSV", help="also write the score table here")


def _turing(args):
    from pathlib import Path

    from napari_cytodiffusion.core import turing

    if args.turing_command == "score":
        for path in (args.answers, args.key):
            if not Path(path).is_file():
                raise UsageError(f"No such file: {path}")
        answers = turing.read_csv(args.answers, ("item", "answer"))
        key = turing.read_csv(args.key, ("item", "truth", "label"))
        result = turing.score(answers, key)
        print(turing.score_text(result))
        if args.out:
            turing.write_csv(args.out, turing.score_rows(result), turing.SCORE_COLUMNS)
        return
    if args.n < 1:
        raise UsageError("--n must be at least 1.")
    if not Path(args.real).exists():
        raise UsageError(f"No such folder or file: {args.real}")
    records = turing.select_real_cells(args.real, args.n, args.seed, args.split)
    real = turing.normalise_real_cells(
        records, rbc_diameter=args.rbc_diameter, progress=_progress_bar("normalising real cells")
    )
    model = _load_model(args.model, args.device)
    labels = [r.label for r in records]
    panel = turing.make_panel(
        model,
        real,
        labels,
        args.seed,
        args.steps,
        args.guidance,
        origins=[str(r.path) for r in records],
        progress=_progress_bar("generating synthetic cells"),
    )
    folder, key = turing.export_panel(panel, args.out)
    print(f"{len(panel)} cells in {folder} (give this folder to the expert); key: {key}")


def _add_classify(subparsers):
    parser = subparsers.add_parser(
        "classify",
        help="classify white cells with the diffusion model",
        description="Classify the central cell of single-cell images, or every white cell of "
        "smear fields with --segment, by comparing class-conditional denoising errors.",
    )
    parser.add_argument("paths", nargs="+", metavar="PATH")
    parser.add_argument("--segment", action="store_true", help="PATH is a smear field")
    parser.add_argument("--model", default="default", help="registry name or model file")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--strategy", default="adaptive", choices=["adaptive", "exhaustive"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--rbc-diameter",
        type=float,
        help="red-cell diameter in pixels; by default estimated per smear, or once for a "
        "batch of three or more single-cell images (one scanner)",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per cell")


def _classify(args):
    import json

    from napari_cytodiffusion.core.analysis import (
        classify_image,
        differential_count,
        shared_rbc_diameter,
    )
    from napari_cytodiffusion.core.image import ImageError
    from napari_cytodiffusion.core.io import InputFileError, read_image

    model = _load_model(args.model, args.device)
    scale = args.rbc_diameter
    if scale is None and not args.segment and len(args.paths) >= 3:
        scale = shared_rbc_diameter(args.paths)  # one scanner: one scale for all images
    failed = 0
    for path in args.paths:
        try:
            result = classify_image(
                read_image(path),
                model,
                segment=args.segment,
                rbc_diameter=scale,
                strategy=args.strategy,
                seed=args.seed,
            )
        except (ImageError, InputFileError, ValueError) as error:
            print(f"napari-cytodiffusion classify: {path}: {error}", file=sys.stderr)
            failed += 1
            continue
        for cell, call in zip(result.cell_ids, result.calls, strict=True):
            if args.json:
                print(json.dumps({"file": str(path), "cell": cell, **call.as_dict()}), flush=True)
            else:
                where = f"cell {cell}" if cell is not None else "central cell"
                flag = "  NEEDS REVIEW" if call.needs_review else ""
                print(
                    f"{path}  {where}: {call.label} (p={call.probabilities[call.label]:.3f}, "
                    f"uncertainty {call.uncertainty:.3f}, anomaly {call.anomaly_score:.2f}){flag}"
                )
        if args.segment and not args.json:
            counts = differential_count([c.label for c in result.calls], model.classes)
            print(f"{path}: {len(result.calls)} white cells")
            print(counts.to_string(index=False, float_format="%.1f"))
    if failed:
        print(f"{failed} of {len(args.paths)} files could not be classified", file=sys.stderr)
        return USAGE_ERROR
    return 0


def _load_model(name_or_path, device):
    from napari_cytodiffusion.core.weights import load_model

    return load_model(
        name_or_path, device, progress=_progress_bar(f"downloading {name_or_path}", in_bytes=True)
    )


def _add_segment(subparsers):
    parser = subparsers.add_parser(
        "segment",
        help="find the white cells, red cells and platelets of smear images",
        description="Segment every cell of blood-smear images. Prints a summary line per image, "
        "or one JSON object per image with --json. Files that cannot be read are reported on "
        "stderr and the others still processed (exit code 2 if any failed).",
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE")
    parser.add_argument(
        "--out",
        metavar="DIR",
        help="write IMAGE_wbc_labels.tif, IMAGE_rbc_labels.tif, IMAGE_platelet_labels.tif "
        "(uint32 instance labels) and IMAGE_cells.csv (one row per cell) here",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per image")
    parser.add_argument(
        "--rbc-diameter", type=float, help="red-cell diameter in pixels (default: estimated)"
    )


def _segment(args):
    import json
    from pathlib import Path

    from napari_cytodiffusion.core.image import ImageError
    from napari_cytodiffusion.core.io import InputFileError, read_image
    from napari_cytodiffusion.core.segmentation import segment_smear

    out = Path(args.out) if args.out else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    failed = 0
    for path in args.images:
        try:
            result = segment_smear(read_image(path), rbc_diameter=args.rbc_diameter)
        except (ImageError, InputFileError, ValueError) as error:
            print(f"napari-cytodiffusion segment: {path}: {error}", file=sys.stderr)
            failed += 1
            continue
        if out is not None:
            _write_segmentation(result, out / Path(path).stem)
        counts = {f"n_{kind}": result.count(kind) for kind in ("wbc", "rbc", "platelet")}
        if args.json:
            record = {"file": str(path), **counts, "wbc_boxes": result.boxes("wbc")}
            print(json.dumps(record), flush=True)
        else:
            print(
                f"{path}: {counts['n_wbc']} white cells, {counts['n_rbc']} red cells, "
                f"{counts['n_platelet']} platelets (red-cell diameter "
                f"{result.rbc_diameter:.1f} px)",
                flush=True,
            )
    if failed:
        print(f"{failed} of {len(args.images)} images could not be segmented", file=sys.stderr)
        return USAGE_ERROR
    return 0


def _write_segmentation(result, stem):
    import tifffile

    for kind, labels in (
        ("wbc", result.wbc_labels),
        ("rbc", result.rbc_labels),
        ("platelet", result.platelet_labels),
    ):
        tifffile.imwrite(f"{stem}_{kind}_labels.tif", labels.astype("uint32"), compression="zlib")
    result.features.to_csv(f"{stem}_cells.csv", index=False)


def _progress_bar(description, in_bytes=False):
    """Return a ``progress(done, total, postfix=None)`` callback drawing a bar on stderr.

    The bar is made at the first call, when the total is known (a download's size, a task's
    steps); ``in_bytes`` shows sizes in bytes.
    """
    from tqdm import tqdm

    bars = []

    def update(done, total, postfix=None):
        if not bars:
            units = {"unit": "B", "unit_scale": True} if in_bytes else {}
            bars.append(
                tqdm(
                    total=total or None, desc=description, file=sys.stderr, mininterval=0.5, **units
                )
            )
        bar = bars[0]
        if postfix:
            bar.set_postfix_str(postfix, refresh=False)
        bar.update(done - bar.n)
        if total and done >= total:
            bar.close()

    return update


COMMANDS = {
    "segment": (_add_segment, _segment),
    "classify": (_add_classify, _classify),
    "train": (_add_train, _train),
    "models": (_add_models, _models),
    "generate": (_add_generate, _generate),
    "counterfactual": (_add_counterfactual, _counterfactual),
    "turing": (_add_turing, _turing),
}


def build_parser():
    parser = argparse.ArgumentParser(
        prog="napari-cytodiffusion",
        description="Blood-smear analysis with a class-conditional diffusion model.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add, _ in COMMANDS.values():
        add(subparsers)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    from napari_cytodiffusion.core.image import ImageError
    from napari_cytodiffusion.core.io import InputFileError

    try:
        return COMMANDS[args.command][1](args) or 0
    except (UsageError, ImageError, InputFileError, ValueError, RuntimeError) as error:
        print(f"napari-cytodiffusion {args.command}: error: {error}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
