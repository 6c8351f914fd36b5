"""The ``napari-cytodiffusion`` command: thin wrappers around the core.

Each subcommand has a ``_add_<name>`` function that declares its arguments and a ``_<name>``
function that runs it. Heavy imports happen inside those, so ``--help`` is instant.
Problems with the user's input are reported on stderr with exit code 2, never as a traceback.
"""

import argparse
import os
import sys

USAGE_ERROR = 2
# core.devices.DEVICE_TYPES, spelled out: importing the core would slow --help.
DEVICE_HELP = "auto, cpu, cuda (or cuda:N for the N-th GPU) or mps"
MODEL_HELP = "model name (shipped or local, see `models list`) or model file"
# What a labelled dataset (train, adapt, calibrate) may be.
DATA_HELP = (
    "folder of class subfolders, a CSV (file, label), or a folder of single-cell images with "
    "its cell_labels.csv"
)


class UsageError(Exception):
    """Input the command cannot use; the message tells the user what to do."""


def _seed(text):
    """An argparse type: a seed from 0 to 2**63 - 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"{value} is not a seed from 0 to 2**63 - 1")
    return value


def _rbc_diameter(text):
    """An argparse type: a red-cell diameter in pixels (0: estimate it), refused before any
    work when implausible, not once per file."""
    from napari_cytodiffusion.core.smear.prepare import validate_rbc_diameter

    # 0 is "not given", as in the widgets: each task then estimates it its own way.
    return _checked(text, float, validate_rbc_diameter, "a number of pixels") or None


def _tile_size(text):
    """An argparse type: a tile side the segmentation accepts (see ``check_tile_size``)."""
    from napari_cytodiffusion.core.smear.segmentation import check_tile_size

    return _checked(text, int, check_tile_size, "a whole number of pixels")


def _checked(text, convert, check, what):
    """``text`` converted, then checked by the core's own check; its message on failure."""
    try:
        value = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    try:
        check(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return value


def _out_folder(text):
    """An argparse type: a folder to write into (made if missing), refused before any work
    when it, or a folder it would be made in, is a file or cannot be written."""
    from napari_cytodiffusion.core.io import folder_problem

    problem = folder_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(f"{problem}; give a folder you can write into")
    return text


def _out_file(text):
    """An argparse type: a file to write, refused before any work when it is a folder."""
    from pathlib import Path

    if Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; give the file to write")
    return text


def _device(text):
    """An argparse type: a device name the model runs on (this machine need not have it)."""
    from napari_cytodiffusion.core.devices import check_device_name

    try:
        return check_device_name(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _add_train(subparsers):
    parser = subparsers.add_parser(
        "train",
        help="train the diffusion model on labelled cells",
        description="Train the class-conditional diffusion model. DATA is a folder of class "
        "subfolders, a CSV with file, label and split columns, a folder of single-cell images "
        "with its cell_labels.csv, or a packed .npz.",
    )
    parser.add_argument("data", metavar="DATA")
    parser.add_argument("--out", required=True, metavar="MODEL", help="checkpoint to write")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace --out if it exists (not resumed)"
    )
    parser.add_argument(
        "--resolution", type=int, help="model image size in px (default: the --init model's, or 64)"
    )
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--device", type=_device, default="auto", help=DEVICE_HELP)
    parser.add_argument("--seed", type=_seed, default=0)
    parser.add_argument("--resume", metavar="CKPT", help="continue from this checkpoint")
    parser.add_argument(
        "--init",
        metavar="MODEL",
        help="fine-tune: start from the weights of this model name (e.g. default) or file; "
        "ignored with --resume",
    )
    parser.add_argument(
        "--rbc-diameter",
        type=_rbc_diameter,
        help="red-cell diameter in pixels of the training images (one scanner); by default "
        "estimated once for each scanner's images (three or more of one size), else per image",
    )
    parser.add_argument("--time-limit", type=float, help="save and stop after this many seconds")
    parser.add_argument("--channels", default="64,128,192", help="UNet channels per level")


def _train(args):
    from pathlib import Path

    from tqdm import tqdm

    from napari_cytodiffusion.core.tasks.train import TrainRequest, train_model

    try:
        channels = tuple(int(c) for c in args.channels.split(","))
    except ValueError as error:
        raise UsageError(f"--channels must be integers separated by commas: {error}") from None
    request = TrainRequest(
        data=Path(args.data),
        out=Path(args.out),
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        device=args.device,
        seed=args.seed,
        resume=Path(args.resume) if args.resume else None,
        init=args.init,
        rbc_diameter=args.rbc_diameter,
        channels=channels,
        resolution=args.resolution,
        time_limit=args.time_limit,
        overwrite=args.overwrite,
    )
    bar = _progress_bar("training")
    losses = {}
    summary = train_model(
        request,
        progress=lambda done, total: bar(done, total, losses.get("text")),
        on_loss=lambda step, loss: losses.update(text=f"step {step}, loss {loss:.4f}"),
        log=lambda message: tqdm.write(message, file=sys.stderr),  # above the bar
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

    from napari_cytodiffusion.core.model import weights

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
    elif Path(args.file).is_dir():
        raise UsageError(f"{args.file} is a folder: give the model file in it to hash.")
    elif not Path(args.file).is_file():
        raise UsageError(f"No such file: {args.file}")
    elif args.update:
        name, sha256 = weights.update_registry_hash(args.file)
        print(f"{name}: sha256 {sha256} recorded in {weights.REGISTRY_PATH}")
    else:
        print(weights.file_sha256(args.file))


def _add_generate(subparsers):
    from napari_cytodiffusion.core.model import sampling

    parser = subparsers.add_parser(
        "generate",
        help="generate synthetic cells of one class",
        description="Generate N synthetic cells of one class with the diffusion model. Writes "
        "N PNG files and metadata.csv (file, label, seed, steps, guidance, model, sampler) to "
        "DIR; a cell's seed regenerates it alone with -n 1 --seed SEED.",
    )
    parser.add_argument("--label", required=True, metavar="CLASS", help=_class_help())
    parser.add_argument("-n", type=int, default=8, help="number of cells (default 8)")
    parser.add_argument("--steps", type=int, default=sampling.DEFAULT_STEPS)
    parser.add_argument(
        "--guidance",
        type=float,
        default=sampling.DEFAULT_GUIDANCE,
        help="at least 1: 1 = the class alone, higher follows it more strictly (default "
        f"{sampling.DEFAULT_GUIDANCE})",
    )
    parser.add_argument("--sampler", choices=sampling.SAMPLERS, default=sampling.DEFAULT_SAMPLER)
    _add_model_arguments(parser)
    parser.add_argument("--out", required=True, metavar="DIR", type=_out_folder)


def _generate(args):
    from napari_cytodiffusion.core.model.generation import check_can_save, planned_cells
    from napari_cytodiffusion.core.tasks import generate as task

    model = _load_model(args.model, args.device)
    settings = {"steps": args.steps, "guidance": args.guidance, "sampler": args.sampler}
    plan = planned_cells(model, args.label, args.n, seed=args.seed, **settings)
    check_can_save(plan, args.out)  # before the work: a clash is refused now, not after it
    cells = task.generate(
        model,
        args.label,
        args.n,
        steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
        sampler=args.sampler,
        progress=_progress_bar(f"generating {args.n} {args.label}"),
    )
    from napari_cytodiffusion.core.io import exclusive_folder

    with exclusive_folder(args.out):
        path = task.save_cells(cells, args.out)
    print(f"{task.summary(cells)}: {path}")


def _add_counterfactual(subparsers):
    from napari_cytodiffusion.core.model import counterfactual

    parser = subparsers.add_parser(
        "counterfactual",
        help="what would have to change for the model to call a cell another class",
        description="Heat map of what the model would change to call the cell TARGET, and the "
        "cell edited towards TARGET. IMAGE is a single-cell image, or a smear with --segment "
        "--cell-id. Writes to DIR: heatmap.png (over the image), heatmap.npy (image pixels, "
        "NaN outside the crop), heatmap_crop.npy, cell.png, counterfactual.png/.npy (model "
        "crops) and maps_all_classes.png (the maps towards every class).",
    )
    parser.add_argument("image", metavar="IMAGE")
    parser.add_argument("--target", required=True, metavar="CLASS", help=_class_help())
    parser.add_argument(
        "--source",
        metavar="CLASS",
        help="the cell's current class (default: a person's label of it, else the classifier's "
        "call)",
    )
    parser.add_argument("--out", required=True, metavar="DIR", type=_out_folder)
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the files of an earlier run in DIR"
    )
    parser.add_argument("--segment", action="store_true", help="IMAGE is a smear: segment it")
    parser.add_argument(
        "--cell-id",
        type=int,
        help="white-cell label id in the segmented smear, as classify --segment numbers it",
    )
    parser.add_argument(
        "--ignore-annotations",
        action="store_true",
        help="with --segment, do not apply the annotations saved beside IMAGE "
        "(IMAGE.annotations.json); by default they number the cells and a person's label is "
        "the cell's current class, as in classify",
    )
    parser.add_argument("--rbc-diameter", type=_rbc_diameter, help="red-cell diameter in pixels")
    parser.add_argument("--trials", type=int, default=counterfactual.DEFAULT_TRIALS)
    parser.add_argument("--strength", type=float, default=counterfactual.DEFAULT_STRENGTH)
    parser.add_argument("--guidance", type=float, default=counterfactual.DEFAULT_EDIT_GUIDANCE)
    parser.add_argument("--steps", type=int, default=counterfactual.DEFAULT_EDIT_STEPS)
    parser.add_argument(
        "--method",
        choices=counterfactual.EDIT_METHODS,
        default=counterfactual.DEFAULT_EDIT_METHOD,
        help="invert: keep the cell, change what the target class changes (default); noise: "
        "redraw the cell from partial noise",
    )
    _add_model_arguments(parser)


def _counterfactual(args):
    from pathlib import Path

    from napari_cytodiffusion.core.annotations import load_annotations
    from napari_cytodiffusion.core.io import read_image
    from napari_cytodiffusion.core.tasks.explain import (
        EXPLANATION_FILES,
        ExplainRequest,
        explain,
        write_explanation,
    )

    if args.segment != (args.cell_id is not None):
        raise UsageError("--segment and --cell-id go together: segment the smear, pick a cell.")
    out = Path(args.out)
    _refuse_replacing([out / name for name in EXPLANATION_FILES], args.overwrite)
    image = read_image(args.image)
    annotations = None
    if args.segment and not args.ignore_annotations:
        annotations = load_annotations(args.image)
    request = ExplainRequest(
        target=args.target,
        cell_id=args.cell_id,
        segment=args.segment,
        annotations=annotations,
        source=args.source,
        trials=args.trials,
        strength=args.strength,
        steps=args.steps,
        guidance=args.guidance,
        method=args.method,
        seed=args.seed,
        rbc_diameter=args.rbc_diameter,
    )
    model = _load_model(args.model, args.device)
    result = explain(image, model, request, progress=_progress_bar("explaining the cell"))
    write_explanation(result, image, out)
    print(f"{result.summary()}; results in {out}")
    if result.field_warning():
        print(f"{args.image}: {result.field_warning()}")


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
    make.add_argument("--out", required=True, metavar="DIR", type=_out_folder)
    make.add_argument("--split", choices=("train", "val", "test"), help="split of a splits CSV")
    make.add_argument(
        "--rbc-diameter", type=_rbc_diameter, help="red-cell diameter of the real images"
    )
    make.add_argument("--steps", type=int, help="sampler steps (default: the generator's)")
    make.add_argument("--guidance", type=float, help="guidance (default: the generator's)")
    _add_model_arguments(make, seed_help="seeds the choice, cells and shuffle")
    score = actions.add_parser("score", help="score answers against the key")
    score.add_argument("answers", metavar="ANSWERS.csv")
    score.add_argument("key", metavar="KEY.csv")
    score.add_argument(
        "--out", metavar="CSV", type=_out_file, help="also write the score table here"
    )
    score.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def _turing(args):
    from pathlib import Path

    from napari_cytodiffusion.core import turing
    from napari_cytodiffusion.core.tasks.turing import (
        TuringRequest,
        make_turing_panel,
        score_turing_test,
    )

    if args.turing_command == "score":
        for path in (args.answers, args.key):
            if not Path(path).is_file():
                raise UsageError(f"No such file: {path}")
        if args.out:
            _refuse_replacing_score(Path(args.out), (args.answers, args.key), args.overwrite)
        result = score_turing_test(args.answers, args.key)
        print(turing.score_text(result))
        if args.out:
            turing.write_csv(args.out, turing.score_rows(result), turing.SCORE_COLUMNS)
        return
    if not Path(args.real).exists():
        raise UsageError(f"No such folder or file: {args.real}")
    turing.check_panel_folder(args.out)  # before the minutes of generating a panel
    request = TuringRequest(
        n=args.n,
        folder=Path(args.real),
        split=args.split,
        seed=args.seed,
        steps=args.steps,
        guidance=args.guidance,
        rbc_diameter=args.rbc_diameter,
    )
    model = _load_model(args.model, args.device)
    panel = make_turing_panel(model, request, progress=_progress_bar("building the panel"))
    from napari_cytodiffusion.core.io import exclusive_folder

    with exclusive_folder(args.out):
        folder, key = turing.export_panel(panel, args.out)
    print(f"{len(panel)} cells in {folder} (give this folder to the expert); key: {key}")


def _refuse_replacing_score(out, inputs, overwrite):
    """Refuse, before scoring, an --out that is one of the inputs (always: it would lose the
    answers or the key) or an existing file (unless ``overwrite``)."""
    if not out.exists():
        return
    for path in inputs:
        if out.samefile(path):
            raise UsageError(
                f"--out {out} is the file {path} given to score; write the score to another file."
            )
    if not overwrite:
        raise UsageError(f"{out} exists; choose another --out file, or replace it (--overwrite).")


def _add_classify(subparsers):
    parser = subparsers.add_parser(
        "classify",
        help="classify white cells with the diffusion model",
        description="Classify the central cell of single-cell images, or every white cell of "
        "smear fields with --segment, by comparing class-conditional denoising errors.",
    )
    parser.add_argument(
        "paths", nargs="+", metavar="PATH", help="an image, or a folder standing for its images"
    )
    parser.add_argument("--segment", action="store_true", help="PATH is a smear field")
    parser.add_argument("--strategy", default="adaptive", choices=["adaptive", "exhaustive"])
    parser.add_argument(
        "--rbc-diameter",
        type=_rbc_diameter,
        help="red-cell diameter in pixels; by default estimated per smear, or once for "
        "three or more single-cell images of one size (one scanner)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="one JSON object per cell on stdout; notes on an image (no white cells, unlike "
        "the training smears) go to stderr",
    )
    parser.add_argument(
        "--ignore-annotations",
        action="store_true",
        help="do not apply the annotations saved beside a smear (PATH.annotations.json); by "
        "default a person's labels are kept over the model's",
    )
    _add_model_arguments(parser)


def _classify(args):
    import json

    from napari_cytodiffusion.core.report import count_text
    from napari_cytodiffusion.core.tasks.classify import classify_files, differential_count

    model = _load_model(args.model, args.device)
    paths = _with_folder_images(args.paths)
    failed, central_calls = 0, []
    for path, result, error in classify_files(
        paths,
        model,
        segment=args.segment,
        rbc_diameter=args.rbc_diameter,
        strategy=args.strategy,
        seed=args.seed,
        use_annotations=not args.ignore_annotations,
    ):
        if error:
            print(f"napari-cytodiffusion classify: {path}: {error}", file=sys.stderr)
            failed += 1
            continue
        cells = zip(result.cell_ids, result.calls, result.annotated, result.centres, strict=True)
        for cell, call, human, centre in cells:
            if args.json:
                print(json.dumps(_call_record(path, cell, call, human, centre, result)), flush=True)
            else:
                where = f"cell {cell}" if cell is not None else "central cell"
                flag = f"  NEEDS REVIEW ({call.why})" if call.needs_review and not human else ""
                person = f"{human} (annotated; model: " if human else ""
                print(
                    f"{path}  {where}: {person}{call.label} "
                    f"(p={call.probabilities[call.label]:.3f}, uncertainty "
                    f"{call.uncertainty:.3f}, anomaly {call.anomaly_score:.2f}){flag}"
                    + (")" if human else "")
                )
        if args.segment and not args.json:
            print(f"{path}: {count_text(len(result.calls), 'white cell')}")
            # "-" where there is no rate: no leukocyte to count per (percent_text's dash).
            print(result.differential().to_string(index=False, float_format="%.1f", na_rep="-"))
        # With --json, stdout holds only cell records; what a person must know goes to stderr.
        notes = result.warnings()
        if args.json and args.segment and not result.calls:
            notes.insert(0, "no white cells found")
        for note in notes:
            print(f"{path}: {note}", file=sys.stderr if args.json else sys.stdout)
        if not args.segment:
            central_calls += result.final_labels()
    if len(central_calls) > 1 and not args.json:
        # The cells of a CellaVision-style export are one patient's: their differential.
        print(f"{count_text(len(central_calls), 'single-cell image')}:")
        counts = differential_count(central_calls, model.classes)
        print(counts.to_string(index=False, float_format="%.1f", na_rep="-"))
    if failed:
        print(f"{failed} of {len(paths)} files could not be classified", file=sys.stderr)
        return USAGE_ERROR
    return 0


def _call_record(path, cell, call, human, centre, result):
    """One cell's ``classify --json`` record: the same keys for every cell, where it is and
    the person's call beside the model's (a cell a person has called needs no more review)."""
    record = {"file": str(path), "cell": cell, **call.as_dict(), "predicted": call.label}
    record.update(annotated=human, centroid_row=float(centre[0]), centroid_col=float(centre[1]))
    record["rbc_diameter"] = round(float(result.rbc_diameter), 2)
    if human:
        record.update(label=human, needs_review=False, why="")
    return record


def _with_folder_images(paths):
    """``paths`` with each folder replaced by the image files in it (sorted); a folder without
    any stays, to be reported as unreadable with the other files. A file named twice (a.jpg
    ./a.jpg, or in its folder too) is kept once, where first named: else it would count twice."""
    from pathlib import Path

    from napari_cytodiffusion.core.io import distinct_files, folder_images

    expanded = []
    for path in map(Path, paths):
        expanded += (folder_images(path) if path.is_dir() else []) or [path]
    return distinct_files(expanded)


def _add_model_arguments(parser, seed_help=None):
    """--model, --device and --seed, the same for every command that runs the model."""
    parser.add_argument("--model", default="default", help=MODEL_HELP)
    parser.add_argument("--device", type=_device, default="auto", help=DEVICE_HELP)
    parser.add_argument("--seed", type=_seed, default=0, help=seed_help)


def _class_help():
    from napari_cytodiffusion.core.model.weights import model_classes

    return "one of the model's classes (default model: " + ", ".join(model_classes()) + ")"


def _load_model(name_or_path, device):
    from napari_cytodiffusion.core.model.weights import load_model

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
    parser.add_argument(
        "images", nargs="+", metavar="IMAGE", help="an image, or a folder standing for its images"
    )
    parser.add_argument(
        "--out",
        metavar="DIR",
        type=_out_folder,
        help="write IMAGE_wbc_labels.tif, IMAGE_rbc_labels.tif, IMAGE_platelet_labels.tif, "
        "IMAGE_nucleus_labels.tif (uint16 instance labels, uint32 past 65,535 cells; a "
        "nucleus has its white cell's label) and IMAGE_cells.csv (one row per cell) here",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the files of an earlier run in DIR (labels a person may have corrected)",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per image")
    parser.add_argument(
        "--rbc-diameter",
        type=_rbc_diameter,
        help="red-cell diameter in pixels (default: estimated)",
    )


def _segment(args):
    import contextlib
    import json
    from pathlib import Path

    from napari_cytodiffusion.core.io import InputFileError, exclusive_folder, read_image
    from napari_cytodiffusion.core.smear.image import ImageError
    from napari_cytodiffusion.core.tasks.segment import (
        segment,
        segmentation_files,
        write_segmentation,
    )

    out = Path(args.out) if args.out else None
    images = _with_folder_images(args.images)
    stems = [path.stem for path in images]
    if out is not None:
        earlier = [path for stem in stems for path in segmentation_files(out / stem)]
        _refuse_replacing(earlier, args.overwrite)
    made = out is not None and not out.exists()
    failed = 0
    with exclusive_folder(out) if out is not None else contextlib.nullcontext():
        for path, stem in zip(images, stems, strict=True):
            try:
                if out is not None and stems.count(stem) > 1:
                    raise ValueError(
                        f"another image of this call has the name {stem!r} too, and its "
                        f"results would overwrite these in {out}; segment it separately"
                    )
                result = segment(read_image(path), rbc_diameter=args.rbc_diameter)
            except (ImageError, InputFileError, ValueError) as error:
                print(f"napari-cytodiffusion segment: {path}: {error}", file=sys.stderr)
                failed += 1
                continue
            if out is not None:
                write_segmentation(result, out / stem)
            if args.json:
                print(json.dumps({"file": str(path), **result.record()}), flush=True)
            else:
                print(f"{path}: {result.summary()}", flush=True)
    if made and not any(out.iterdir()):
        out.rmdir()  # nothing was written: leave no empty folder behind
    if failed:
        print(f"{failed} of {len(images)} images could not be segmented", file=sys.stderr)
        return USAGE_ERROR
    return 0


def _refuse_replacing(paths, overwrite):
    """Refuse, before any work, to replace an earlier run's files unless ``overwrite``: a
    person may have corrected them since."""
    earlier = [path for path in paths if path.exists()]
    if earlier and not overwrite:
        raise UsageError(
            f"{earlier[0]} exists, from an earlier run, and may have been corrected since: "
            "choose another --out folder, or replace the earlier results (--overwrite)."
        )


def _add_analyze(subparsers):
    from napari_cytodiffusion.core.tasks.analyze import ANALYSIS_TILE

    parser = subparsers.add_parser(
        "analyze",
        help="segment, classify and triage whole smears, many at a time",
        description="Analyse smears of any size (images, large or pyramidal TIFFs, OME-Zarr; "
        "a folder stands for its images) on a dask.distributed cluster. Writes DIR/<smear>/: "
        "cells.csv, differential.csv, triage.json, report.html; and DIR/summary.csv. Finished "
        "smears are skipped, so a stopped run continues where it was.",
    )
    parser.add_argument("paths", nargs="+", metavar="PATH")
    parser.add_argument("--out", required=True, metavar="DIR", type=_out_folder)
    parser.add_argument("--model", default="default", help=MODEL_HELP)
    parser.add_argument(
        "--device", type=_device, default="auto", help=f"{DEVICE_HELP} (on the workers)"
    )
    parser.add_argument("--scheduler", metavar="ADDRESS", help="a running dask scheduler")
    parser.add_argument(
        "--workers", type=int, help="worker processes of the local cluster (default: cores, <= 4)"
    )
    parser.add_argument("--rbc-diameter", type=_rbc_diameter, help="red-cell diameter in pixels")
    parser.add_argument(
        "--tile-size", type=_tile_size, default=ANALYSIS_TILE, help="tile side (px, 256 or more)"
    )
    parser.add_argument("--seed", type=_seed, default=0)
    parser.add_argument(
        "--ignore-annotations",
        action="store_true",
        help="do not apply the annotations saved beside a smear (PATH.annotations.json)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace results in DIR made with other settings (a person may have corrected "
        "them); without it they are refused, while a stopped run of the same settings goes on",
    )


def _analyze(args):
    from pathlib import Path

    from tqdm import tqdm

    from napari_cytodiffusion.core.report import count_text
    from napari_cytodiffusion.core.tasks.analyze import BatchRequest, analyze_files

    if args.workers is not None and args.workers < 1:
        raise UsageError("--workers must be at least 1.")
    bar = _progress_bar("analysing tiles")

    def finished(name, analysis, error):
        # tqdm.write keeps the line above the progress bar instead of through it.
        if error is not None:
            tqdm.write(f"napari-cytodiffusion analyze: {name}: {error}", file=sys.stderr)
            return
        flagged = int(analysis.cells["needs_review"].sum())
        white = count_text(len(analysis.cells), "white cell")
        # The source's path: two smears of one file name differ only in it.
        tqdm.write(
            f"{analysis.source or name}: {analysis.decision} ({white}, {flagged} flagged) -> "
            f"{Path(args.out) / name / 'report.html'}",
            file=sys.stdout,
        )

    request = BatchRequest(
        paths=args.paths,
        out=args.out,
        model=args.model,
        device=args.device,
        scheduler=args.scheduler,
        workers=args.workers,
        rbc_diameter=args.rbc_diameter,
        ignore_annotations=args.ignore_annotations,
        tile_size=args.tile_size,
        seed=args.seed,
        overwrite=args.overwrite,
    )
    result = analyze_files(request, progress=bar, on_smear=finished)
    for name in result.skipped:
        print(f"{result.sources[name]}: finished before, skipped -> {Path(args.out) / name}")
    print(f"summary: {result.summary}")
    if result.failed:
        print(f"{len(result.failed)} smear(s) failed", file=sys.stderr)
        return USAGE_ERROR
    return 0


def _add_adapt(subparsers):
    from napari_cytodiffusion.core.model.adaptation import ADAPT_STEPS

    parser = subparsers.add_parser(
        "adapt",
        help="adapt a model to a lab's stain and scanner from a few labelled cells",
        description="Adapt a model to a lab's cells (class subfolders, 5 to 50 cells per class): "
        "a small part of it learns the lab's stain and scanner, then it is calibrated on "
        "held-back cells and saved as a named local model that every command and widget offers.",
    )
    parser.add_argument("data", metavar="DATA", help=DATA_HELP)
    parser.add_argument("--base", default="default", help="model to start from (name or file)")
    parser.add_argument("--out", required=True, metavar="NAME", help="name of the new model")
    parser.add_argument(
        "--replace", action="store_true", help="replace a local model of that name if it exists"
    )
    parser.add_argument("--steps", type=int, default=ADAPT_STEPS, help="adaptation steps")
    parser.add_argument(
        "--add-classes",
        action="store_true",
        help="subfolders or labels that are not classes of the base model become new classes",
    )
    parser.add_argument(
        "--rbc-diameter",
        type=_rbc_diameter,
        help="red-cell diameter in pixels (default: one scale for all the images, their median)",
    )
    parser.add_argument("--device", type=_device, default="auto", help=DEVICE_HELP)
    parser.add_argument("--seed", type=_seed, default=0)


def _adapt(args):
    from pathlib import Path

    from napari_cytodiffusion.core.tasks.adapt import AdaptRequest

    request = AdaptRequest(
        data=Path(args.data),
        name=args.out,
        base=args.base,
        steps=args.steps,
        add_classes=args.add_classes,
        device=args.device,
        seed=args.seed,
        rbc_diameter=args.rbc_diameter,
        replace=args.replace,
    )
    return _run_adapt(request, "adapting")


def _run_adapt(request, description):
    from tqdm import tqdm

    from napari_cytodiffusion.core.tasks.adapt import adapt_model

    result = adapt_model(
        request,
        progress=_progress_bar(description),
        # Notes and warnings on stderr above the bar, as train's: stdout keeps the summary.
        log=lambda message: tqdm.write(message, file=sys.stderr),
    )
    print("\n".join(result.summary()))
    return 0


def _add_calibrate(subparsers):
    parser = subparsers.add_parser(
        "calibrate",
        help="calibrate a model on a lab's labelled cells",
        description="Fit a model's calibration (timestep spreads, class biases, temperature, "
        "anomaly reference, review thresholds) on labelled cells, without changing its "
        "weights, and save it as a named local model.",
    )
    parser.add_argument("model", metavar="MODEL", help="model name or file")
    parser.add_argument("data", metavar="DATA", help=DATA_HELP)
    parser.add_argument(
        "--out",
        metavar="NAME",
        help="name of the calibrated model (default: MODEL-calibrated, "
        "or MODEL itself for a local model)",
    )
    parser.add_argument(
        "--replace", action="store_true", help="replace a local model of that name if it exists"
    )
    parser.add_argument(
        "--rbc-diameter",
        type=_rbc_diameter,
        help="red-cell diameter in pixels (default: one scale for all the images, their median)",
    )
    parser.add_argument("--device", type=_device, default="auto", help=DEVICE_HELP)
    parser.add_argument("--seed", type=_seed, default=0)


def _calibrate(args):
    from pathlib import Path

    from napari_cytodiffusion.core.model.weights import find_model
    from napari_cytodiffusion.core.tasks.adapt import AdaptRequest

    name = args.out
    if name is None:
        entry = find_model(args.model)
        name = entry.name if entry and entry.local else f"{Path(args.model).stem}-calibrated"
    request = AdaptRequest(
        data=Path(args.data),
        name=name,
        base=args.model,
        steps=0,
        device=args.device,
        seed=args.seed,
        rbc_diameter=args.rbc_diameter,
        replace=args.replace,
    )
    return _run_adapt(request, "calibrating")


def _add_export_cells(subparsers):
    parser = subparsers.add_parser(
        "export-cells",
        help="export annotated cells as a labelled dataset for train / adapt",
        description="Write the cells people annotated in smears (IMAGE.annotations.json, saved "
        "by the Annotate cells widget) into a class-folder dataset with a manifest.",
    )
    parser.add_argument("paths", nargs="+", metavar="IMAGE")
    parser.add_argument("--out", required=True, metavar="DIR", type=_out_folder)
    parser.add_argument("--model", default="default", help="the model the crops are made for")
    parser.add_argument("--rbc-diameter", type=_rbc_diameter, help="red-cell diameter in pixels")


def _export_cells(args):
    from napari_cytodiffusion.core.io import distinct_files
    from napari_cytodiffusion.core.model.weights import find_model, model_path
    from napari_cytodiffusion.core.tasks.annotate import export_annotated

    entry = find_model(args.model)
    if entry is not None:
        size = entry.image_size
    else:
        from napari_cytodiffusion.core.model.checkpoint import load_model_file

        size = load_model_file(model_path(args.model), "cpu").image_size
    folders = [path for path in args.paths if os.path.isdir(path)]
    if folders:  # checked, as the files are, before any cell is written
        raise UsageError(
            f"{folders[0]} is a folder: give the annotated smears' image files "
            f"(e.g. {os.path.join(folders[0], '*.jpg')})."
        )
    missing = [path for path in args.paths if not os.path.isfile(path)]
    if missing:
        raise ValueError(f"No such file: {', '.join(missing)}")
    totals = {}
    for path in distinct_files(args.paths):  # named twice, a smear's cells would count twice
        written = export_annotated(path, args.out, size, rbc_diameter=args.rbc_diameter)
        if not written:
            print(f"{path}: no annotations (annotate it with the Annotate cells widget first)")
        for name, count in written.items():
            totals[name] = totals.get(name, 0) + count
    if not totals:
        raise ValueError(
            "None of the images has annotated cells: annotate them with the Annotate cells "
            "widget first (it saves IMAGE.annotations.json beside each image)."
        )
    counts = ", ".join(f"{name} {count}" for name, count in sorted(totals.items()))
    print(f"{sum(totals.values())} cells in {args.out}: {counts}")
    return 0


# The progress bars drawing now: closed when the command ends (see _run), so that an error
# is not glued to one and followed by a stale one.
_open_bars = []


def _close_bars():
    while _open_bars:
        _open_bars.pop().close()


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
            _open_bars.append(bars[0])
        bar = bars[0]
        if postfix:
            bar.set_postfix_str(postfix, refresh=False)
        bar.update(done - bar.n)
        if total and done >= total:
            bar.close()
            # By identity: tqdm compares bars by their screen position.
            _open_bars[:] = [other for other in _open_bars if other is not bar]

    return update


COMMANDS = {
    "segment": (_add_segment, _segment),
    "classify": (_add_classify, _classify),
    "train": (_add_train, _train),
    "models": (_add_models, _models),
    "generate": (_add_generate, _generate),
    "counterfactual": (_add_counterfactual, _counterfactual),
    "turing": (_add_turing, _turing),
    "analyze": (_add_analyze, _analyze),
    "adapt": (_add_adapt, _adapt),
    "calibrate": (_add_calibrate, _calibrate),
    "export-cells": (_add_export_cells, _export_cells),
}


def build_parser():
    parser = argparse.ArgumentParser(
        prog="napari-cytodiffusion",
        description="Blood-smear analysis with a class-conditional diffusion model.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add, _ in COMMANDS.values():
        add(subparsers)
    _add_debug(parser, default=False)
    return parser


def _add_debug(parser, default):
    """``--debug`` before or after the command's name (``segment ... --debug``): its
    subcommands' flag leaves the default to the main parser's unless given."""
    parser.add_argument(
        "--debug",
        action="store_true",
        default=default,
        help="show the full traceback of an error (for bugs)",
    )
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                _add_debug(subparser, default=argparse.SUPPRESS)


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except BrokenPipeError:
        # The reader went away (``| head``): stop quietly, as other command-line tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (UsageError, ValueError, RuntimeError, OSError, MemoryError) as error:
        if args.debug:
            raise
        print(f"napari-cytodiffusion {args.command}: error: {_describe(error)}", file=sys.stderr)
        return USAGE_ERROR


def _run(args):
    """Run the command; its progress bars are closed however it ends, so that what is printed
    next (an error, "interrupted") has a line of its own, after them."""
    try:
        return COMMANDS[args.command][1](args) or 0
    finally:
        _close_bars()


def _describe(error):
    """One line a user can act on, for the errors a user can cause."""
    if isinstance(error, MemoryError):
        return "not enough memory for this request; ask for less (fewer cells, a smaller image)."
    if (
        isinstance(error, OSError)
        and error.filename
        and not str(error).startswith(("No such", "Cannot read"))
    ):
        return f"{error.filename}: {error.strerror or error}"
    return str(error).splitlines()[0] if str(error) else type(error).__name__
