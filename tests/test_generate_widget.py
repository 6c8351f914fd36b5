"""The "Generate cells" widget: a grid of cells named by class beside the smear, labelled by
class and seed on hover, and a cancel adds nothing."""

import numpy as np

from napari_cytodiffusion._widgets._generate import GenerateWidget
from napari_cytodiffusion._widgets._grid import layer_cells


def _widget(make_napari_viewer, count, steps):
    viewer = make_napari_viewer()
    widget = GenerateWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget._label.value = "eosinophil"
    widget._count.value = count
    widget._steps.value = steps
    widget._seed.value = 11
    widget._device.value = "cpu"
    return viewer, widget


def test_generates_a_grid_beside_the_smear(make_napari_viewer, qtbot):
    viewer, widget = _widget(make_napari_viewer, 2, 2)
    smear = viewer.add_image(np.zeros((300, 400, 3), np.uint8), rgb=True, name="smear")
    smear.metadata["rbc_diameter"] = 25.6  # a crop then spans 64 smear pixels: scale 1
    widget._run.native.click()
    qtbot.waitUntil(lambda: len(viewer.layers) == 3, timeout=60_000)
    qtbot.waitUntil(lambda: not widget._runner.running, timeout=10_000)
    grid, tiles = viewer.layers[1], viewer.layers[2]
    assert grid.name == "synthetic eosinophil" and tiles.name == "synthetic eosinophil tiles"
    assert grid.rgb and grid.ndim == 2 and viewer.dims.ndim == 2  # no slider on the smear
    assert grid.translate[1] > 400 and grid.translate[0] == 0  # right of the smear
    np.testing.assert_allclose(grid.scale, [1.0, 1.0])
    cells = layer_cells(grid)
    assert cells.shape == (2, 64, 64, 3) and np.ptp(cells) > 0.2
    features = grid.metadata["features"]
    assert list(features["seed"]) == [11, 12]
    assert set(features["label"]) == {"eosinophil"} and set(features["steps"]) == {2}
    # Hovering a tile shows its class and seed.
    status = str(tiles.get_status(tiles.data_to_world((32, 64 + 4 + 32)), world=True))
    assert "eosinophil" in status and "seed: 12" in status
    assert widget._status.value.startswith("done: 2 eosinophil cells in")


def test_cancel_within_a_second_adds_no_layer(make_napari_viewer, qtbot, cancel_latency):
    viewer, widget = _widget(make_napari_viewer, 64, 200)
    widget._run.native.click()
    qtbot.waitUntil(lambda: widget._runner._state["done"] > 0, timeout=60_000)
    assert cancel_latency(widget) < 1.0
    assert len(viewer.layers) == 0
    assert widget._status.value == "cancelled"
