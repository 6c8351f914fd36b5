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
    # Removing the grid takes its tiles with it; the next grid's tiles are named after it.
    viewer.layers.remove(grid)
    assert [layer.name for layer in viewer.layers] == ["smear"]
    widget._run.native.click()
    qtbot.waitUntil(lambda: len(viewer.layers) == 3, timeout=60_000)
    qtbot.waitUntil(lambda: not widget._runner.running, timeout=10_000)
    assert [layer.name for layer in viewer.layers][1:] == [grid.name, tiles.name]


def test_cancel_within_a_second_adds_no_layer(make_napari_viewer, qtbot, cancel_latency):
    viewer, widget = _widget(make_napari_viewer, 64, 200)
    widget._run.native.click()
    qtbot.waitUntil(lambda: widget._runner._state["done"] > 0, timeout=60_000)
    assert cancel_latency(widget) < 1.0
    assert len(viewer.layers) == 0
    assert widget._status.value == "cancelled"


def test_the_classes_follow_the_chosen_model(make_napari_viewer, tmp_path, monkeypatch):
    """A model adapted with a class of its own (blast) offers it in Generate, Counterfactuals
    and the Turing test once chosen; a choice still offered stays."""
    from napari_cytodiffusion._widgets._common import MODEL_FILE
    from napari_cytodiffusion._widgets._counterfactual import CounterfactualWidget
    from napari_cytodiffusion._widgets._turing import TuringWidget
    from napari_cytodiffusion.core.model import weights

    adapted = tmp_path / "lab-blast.pt"
    adapted.write_bytes(b"")
    default = weights.model_classes("default")
    classes = {str(adapted): (*default, "blast")}
    original = weights.model_classes
    monkeypatch.setattr(weights, "model_classes", lambda name: classes.get(name) or original(name))
    viewer, generate = _widget(make_napari_viewer, 1, 1)
    explain, turing = CounterfactualWidget(viewer), TuringWidget(viewer)
    combos = (generate._label, explain._target, explain._source, turing._layer_class)
    for widget in (generate, explain, turing):
        widget._fields.model.value = MODEL_FILE
        widget._fields.file.value = adapted
    assert [combo.choices[-1] for combo in combos] == ["blast"] * 4
    assert explain._source.choices[0] == "auto" and generate._label.value == "eosinophil"
    generate._fields.model.value = "default"
    assert generate._label.choices == default
