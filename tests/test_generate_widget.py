"""The "Generate cells" widget: a stack layer named by class, and a cancel adds nothing."""

import numpy as np

from napari_cytodiffusion._widgets._generate import GenerateWidget


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


def test_generates_a_stack_layer_named_by_class(make_napari_viewer, qtbot):
    viewer, widget = _widget(make_napari_viewer, 2, 2)
    widget._run.native.click()
    qtbot.waitUntil(lambda: len(viewer.layers) == 1, timeout=60_000)
    qtbot.waitUntil(lambda: not widget._runner.running, timeout=10_000)
    layer = viewer.layers[0]
    assert layer.name == "synthetic eosinophil"
    assert layer.rgb and layer.data.shape == (2, 64, 64, 3)
    features = layer.metadata["features"]
    assert list(features["index"]) == [0, 1]
    assert list(features["seed"]) == [11, 12]
    assert set(features["label"]) == {"eosinophil"} and set(features["steps"]) == {2}
    assert "2 eosinophil cells in" in widget._status.value
    assert np.ptp(layer.data) > 0.2


def test_cancel_adds_no_layer(make_napari_viewer, qtbot):
    viewer, widget = _widget(make_napari_viewer, 64, 200)
    widget._run.native.click()
    qtbot.waitUntil(lambda: widget._runner._state["done"] > 0, timeout=60_000)
    widget._cancel.native.click()
    qtbot.waitUntil(lambda: not widget._runner.running, timeout=10_000)
    assert len(viewer.layers) == 0
    assert widget._status.value == "cancelled"
