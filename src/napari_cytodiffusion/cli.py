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
            bar = _terminal_bar(len(records), "normalising cells")
            pack_cells(records, pack, args.resolution, args.rbc_diameter, progress=bar)
    bar = _terminal_bar(args.steps, "training")
    summary = training.train(
        pack,
        args.out,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        device=args.device,
        seed=args.seed,
        resume=args.resume,
        channels=[int(c) for c in args.channels.split(",")],
        image_size=args.resolution,
        time_limit=args.time_limit,
        progress=lambda step, total, loss: bar(step, total, f"loss {loss:.4f}"),
        log=lambda message: print(message, file=sys.stderr),
    )
    print(f"step {summary['step']} saved to {args.out} ({summary['seconds']:.0f} s)")


def _terminal_bar(total, description):
    """Return a progress callback drawing a tqdm bar on stderr."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc=description, file=sys.stderr, mininterval=1.0)

    def update(done, _total=None, postfix=None):
        bar.n = done
        if postfix:
            bar.set_postfix_str(postfix, refresh=False)
        bar.refresh() if done >= bar.total else bar.update(0)

    return update


COMMANDS = {"train": (_add_train, _train)}


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
