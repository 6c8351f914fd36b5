"""Where the benchmarks find the shared data and keep their results; their ``--float32``."""

import argparse
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
RESULTS = REPO / "benchmarks" / "results"


def pbc_records(split):
    """The PBC records of one split of ``splits.csv`` (train, val or test)."""
    from napari_cytodiffusion.core.datasets import list_labelled_images

    return [r for r in list_labelled_images(DATA / "pbc" / "splits.csv") if r.split == split]


class _KeepFloat32(argparse.Action):
    """``--float32``: keep the network in float32 on a CPU that computes in bfloat16, to
    compare with the bfloat16 autocast a user's run gets there."""

    def __call__(self, parser, namespace, values, option_string=None):
        from napari_cytodiffusion.core.model.diffusion import FLOAT32_ENV

        os.environ[FLOAT32_ENV] = "1"
        setattr(namespace, self.dest, True)


def add_float32_option(parser):
    parser.add_argument(
        "--float32",
        action=_KeepFloat32,
        nargs=0,
        default=False,
        help="keep the network in float32 on a CPU that computes in bfloat16, to compare",
    )
