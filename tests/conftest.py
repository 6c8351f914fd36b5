"""Shared fixtures: where the real data lives, and the shipped model loaded once."""

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _require(path):
    if not path.exists():
        pytest.skip(f"needs the shared data set at {path}, which is absent on this machine")
    return path


@pytest.fixture(scope="session")
def pbc_dir():
    """PBC single-cell images with splits.csv (skips when ../shared/data is absent)."""
    return _require(SHARED_DATA / "pbc")


@pytest.fixture(scope="session")
def cbc_dir():
    """CBC smear fields with VOC boxes (skips when ../shared/data is absent)."""
    return _require(SHARED_DATA / "cbc")


@pytest.fixture(scope="session")
def wbc_masks_dir():
    """WBC segmentation data set 1 with masks (skips when ../shared/data is absent)."""
    return _require(SHARED_DATA / "segmentation_wbc_dataset1")


@pytest.fixture(scope="session")
def default_model():
    """The shipped default diffusion model on the CPU, loaded once per test session."""
    from napari_cytodiffusion.core.model.weights import load_model

    return load_model("default", device="cpu")


@pytest.fixture
def float32_network(monkeypatch):
    """The network in float32 even on a CPU that computes in bfloat16.

    For tests of exact algorithmic identities (a replay equals its live run): in bfloat16 a
    cell's errors move by up to about 0.3 % with the other cells of its batch.
    """
    from napari_cytodiffusion.core.model.diffusion import FLOAT32_ENV

    monkeypatch.setenv(FLOAT32_ENV, "1")


@pytest.fixture(scope="session")
def synthetic_rbc_diameter():
    """Red-cell diameter (px) of the images of ``synthetic_cells_dir``."""
    return 18.0


@pytest.fixture(scope="session")
def synthetic_cells_dir(tmp_path_factory, synthetic_rbc_diameter):
    """A tiny folder of class subfolders with drawn cells (nucleus size differs by class).

    For training tests that need no data set.
    """
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("synthetic_cells")
    rng = np.random.default_rng(0)
    rows, cols = np.mgrid[:96, :96]
    for label, nucleus_radius in (("lymphocyte", 12), ("neutrophil", 6)):
        (root / label).mkdir()
        for i in range(6):
            image = np.empty((96, 96, 3))
            image[:] = (0.96, 0.9, 0.82)
            for r, c in rng.uniform(0, 96, (6, 2)):
                red_cell = (rows - r) ** 2 + (cols - c) ** 2 < (synthetic_rbc_diameter / 2) ** 2
                image[red_cell] = (0.85, 0.55, 0.55)
            r, c = 48 + rng.uniform(-3, 3, 2)
            image[(rows - r) ** 2 + (cols - c) ** 2 < 16**2] = (0.8, 0.7, 0.8)
            image[(rows - r) ** 2 + (cols - c) ** 2 < nucleus_radius**2] = (0.45, 0.25, 0.6)
            Image.fromarray((image * 255).astype(np.uint8)).save(root / label / f"{label}_{i}.png")
    return root


@pytest.fixture
def colour_mapping(monkeypatch):
    """The value counts napari's label colour maps map to colours in their Python loop (a
    65,536-value table for 16-bit labels), recorded as it happens."""
    from napari.utils.colormaps import DirectLabelColormap

    mapped = []
    original = DirectLabelColormap._map_without_cache
    monkeypatch.setattr(
        DirectLabelColormap,
        "_map_without_cache",
        lambda self, values: mapped.append(len(values)) or original(self, values),
    )
    return mapped


@pytest.fixture
def cancel_latency(qtbot):
    """Press a widget's Cancel; returns the seconds until its work has stopped."""
    import time

    def press(widget):
        started = time.perf_counter()
        widget._cancel.native.click()
        qtbot.waitUntil(lambda: not widget._runner.running, timeout=30_000)
        seconds = time.perf_counter() - started
        print(f"cancel latency, {type(widget).__name__}: {seconds:.2f} s")  # shown with -s
        return seconds

    return press


@pytest.fixture(scope="session")
def phone_dir():
    """Phone-camera smear fields with YOLO white-cell boxes (skips when absent)."""
    return _require(SHARED_DATA / "wbc_smartphone_pig")
