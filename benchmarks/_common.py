"""Where the benchmarks find the shared data and keep their results."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
RESULTS = REPO / "benchmarks" / "results"


def pbc_records(split):
    """The PBC records of one split of ``splits.csv`` (train, val or test)."""
    from napari_cytodiffusion.core.datasets import list_labelled_images

    return [r for r in list_labelled_images(DATA / "pbc" / "splits.csv") if r.split == split]


def keep_float32():
    """Keep the network in float32 on a CPU that computes in bfloat16 (``--float32``), to
    compare with the bfloat16 autocast a user's run gets there."""
    import os

    from napari_cytodiffusion.core.model.diffusion import FLOAT32_ENV

    os.environ[FLOAT32_ENV] = "1"


def network_precision(device="cpu"):
    """What the network computes in on ``device``, for the results files."""
    import torch

    from napari_cytodiffusion.core.model.diffusion import network_dtype

    bfloat16 = network_dtype(torch.device(device)) == torch.bfloat16
    return "bfloat16 autocast" if bfloat16 else "float32"
