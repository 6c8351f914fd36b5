"""Where the benchmarks find the shared data and keep their results."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
RESULTS = REPO / "benchmarks" / "results"


def pbc_records(split):
    """The PBC records of one split of ``splits.csv`` (train, val or test)."""
    from napari_cytodiffusion.core.datasets import list_labelled_images

    return [r for r in list_labelled_images(DATA / "pbc" / "splits.csv") if r.split == split]
