"""The "Turing test" widget: a blinded panel answered with buttons and keys, then scored."""

import csv

import numpy as np
import pandas as pd

from napari_cytodiffusion._widgets._turing import TEST_LAYER, TuringWidget


def _real_cells():
    crops = np.full((3, 64, 64, 3), 0.9, np.float32)
    crops[:, 16:48, 16:48] = [0.4, 0.2, 0.6]
    return crops


def _widget(make_napari_viewer, tmp_path, count):
    viewer = make_napari_viewer()
    widget = TuringWidget(viewer)
    viewer.window.add_dock_widget(widget)
    features = pd.DataFrame({"index": [0, 1, 2], "label": ["platelet", "platelet", "basophil"]})
    layer = viewer.add_image(_real_cells(), rgb=True, name="real", metadata={"features": features})
    widget._source.value = "image layer"
    widget._layer.value = layer
    widget._count.value = count
    widget._steps.value = 1
    widget._device.value = "cpu"
    if tmp_path is not None:
        widget._out.value = tmp_path
    return viewer, widget


def _build(widget, qtbot):
    """Press Build and wait until the test runs and the run has ended: the Build button is
    off until the work's last signal arrives, which on a loaded machine comes a while after
    the panel is shown (a click then does nothing)."""
    widget._build.native.click()
    qtbot.waitUntil(lambda: widget.testing, timeout=60_000)
    qtbot.waitUntil(lambda: not widget._runner.running, timeout=60_000)


def test_blinded_panel_answered_with_buttons_and_keys(make_napari_viewer, qtbot, tmp_path):
    viewer, widget = _widget(make_napari_viewer, tmp_path, 2)
    _build(widget, qtbot)
    assert TEST_LAYER in viewer.layers and viewer.layers[TEST_LAYER].data.shape == (64, 64, 3)
    assert "cell 1 of 4" in widget._progress.value
    key = widget._panel.key
    press = viewer.window._qt_viewer._key_map_handler.press_key  # what a key press does
    widget._real.native.click()
    press("S")
    assert "cell 3 of 4" in widget._progress.value
    assert list(tmp_path.iterdir()) == []  # nothing, and no key, written before the end
    (dock,) = [
        d for d in viewer.window._wrapped_dock_widgets.values() if d.widget() is widget.native
    ]
    dock.hide()  # a hidden panel takes no answers from the keys
    press("R")
    assert "cell 3 of 4" in widget._progress.value
    dock.show()
    press("R")
    widget._synthetic.native.click()
    assert not widget.testing
    press("R")  # unbound again after the test: nothing happens

    answers_file = next(tmp_path.glob("turing_answers_*.csv"))
    answers = list(csv.DictReader(open(answers_file)))
    assert [a["answer"] for a in answers] == ["real", "synthetic", "real", "synthetic"]
    assert [a["truth"] for a in answers] == [row["truth"] for row in key]
    assert all(float(a["seconds"]) >= 0 for a in answers)
    correct = sum(a["answer"] == a["truth"] for a in answers)
    score = list(csv.DictReader(open(next(tmp_path.glob("turing_score_*.csv")))))
    assert score[0]["group"] == "overall" and int(score[0]["correct"]) == correct
    assert len(list(csv.DictReader(open(next(tmp_path.glob("turing_key_*.csv")))))) == 4
    assert f"({correct}/4)" in widget._result.value


def test_the_real_cells_keep_their_classes(make_napari_viewer, qtbot, tmp_path):
    _, widget = _widget(make_napari_viewer, tmp_path, 3)
    _build(widget, qtbot)
    labels = sorted(row["label"] for row in widget._panel.key)
    assert labels == ["basophil"] * 2 + ["platelet"] * 4


def test_needs_a_results_folder(make_napari_viewer, monkeypatch):
    errors = []
    monkeypatch.setattr("napari.utils.notifications.show_error", errors.append)
    _, widget = _widget(make_napari_viewer, None, 2)
    widget._build.native.click()
    assert not widget._runner.running and "results folder" in errors[-1]
    widget._out.value = __file__  # a file: the answers could not be saved at the end
    widget._build.native.click()
    assert not widget._runner.running and errors[-1].startswith("Cannot write into")


def test_too_few_real_cells_is_reported_not_raised(
    make_napari_viewer, qtbot, tmp_path, monkeypatch
):
    errors = []
    monkeypatch.setattr("napari.utils.notifications.show_error", errors.append)
    viewer, widget = _widget(make_napari_viewer, tmp_path, 5)
    widget._build.native.click()
    qtbot.waitUntil(lambda: not widget._runner.running, timeout=30_000)
    assert widget._progress.value.startswith("failed") and not widget.testing
    assert "Asked for 5 real cells but layer 'real' holds 3" in errors[-1]
    assert TEST_LAYER not in viewer.layers


def test_cancel_within_a_second_starts_no_test(make_napari_viewer, qtbot, tmp_path, cancel_latency):
    viewer, widget = _widget(make_napari_viewer, tmp_path, 3)
    widget._steps.value = 200  # generating the synthetic cells: the long part
    widget._build.native.click()
    qtbot.waitUntil(lambda: widget._runner._state["done"] > 250, timeout=60_000)
    assert cancel_latency(widget) < 1.0
    assert widget._progress.value == "cancelled" and not widget.testing
    assert TEST_LAYER not in viewer.layers


def test_the_test_goes_on_when_its_layer_is_removed(make_napari_viewer, qtbot, tmp_path):
    viewer, widget = _widget(make_napari_viewer, tmp_path, 1)
    _build(widget, qtbot)
    viewer.layers.remove(TEST_LAYER)
    widget._real.native.click()
    assert "cell 2 of 2" in widget._progress.value
    np.testing.assert_array_equal(viewer.layers[TEST_LAYER].data, widget._panel.images[1])


def test_a_test_can_be_ended_early_and_closing_the_panel_ends_it(
    make_napari_viewer, qtbot, tmp_path
):
    """End test saves and scores the answers so far; closing the panel mid-test ends the test
    too, so that R and S are given back and no hidden panel goes on taking answers."""
    viewer, widget = _widget(make_napari_viewer, tmp_path, 2)
    _build(widget, qtbot)
    widget._real.native.click()
    widget._end.native.click()
    assert not widget.testing and widget._progress.value == "ended: 1 of 4 answers"
    (answers_file,) = tmp_path.glob("turing_answers_*.csv")
    assert len(list(csv.DictReader(open(answers_file)))) == 1
    assert "R" not in {str(key) for key in viewer.keymap}

    _build(widget, qtbot)
    assert "R" in {str(key) for key in viewer.keymap}
    (dock,) = [
        d for d in viewer.window._wrapped_dock_widgets.values() if d.widget() is widget.native
    ]
    viewer.window.remove_dock_widget(dock)  # what the panel's close button does
    assert not widget.testing and widget._progress.value == "ended: 0 of 4 answers; nothing saved"
    assert "R" not in {str(key) for key in viewer.keymap}
    assert len(list(tmp_path.glob("turing_answers_*.csv"))) == 1


def test_closing_the_panel_while_it_is_built_starts_no_test(make_napari_viewer, qtbot, tmp_path):
    viewer, widget = _widget(make_napari_viewer, tmp_path, 3)
    widget._steps.value = 200  # generating the synthetic cells: long enough to close midway
    widget._build.native.click()
    qtbot.waitUntil(lambda: widget._runner._state["done"] > 0, timeout=60_000)
    (dock,) = [
        d for d in viewer.window._wrapped_dock_widgets.values() if d.widget() is widget.native
    ]
    viewer.window.remove_dock_widget(dock)
    qtbot.waitUntil(lambda: not widget._runner.running, timeout=10_000)
    assert not widget.testing and TEST_LAYER not in viewer.layers
    assert "R" not in {str(key) for key in viewer.keymap}


def test_a_later_test_is_shown_beside_what_was_opened_since(make_napari_viewer, qtbot, tmp_path):
    viewer, widget = _widget(make_napari_viewer, tmp_path, 1)
    _build(widget, qtbot)
    widget.end_test()
    smear = viewer.add_image(np.zeros((300, 400, 3), np.uint8), rgb=True, name="smear")
    assert viewer.layers[TEST_LAYER].translate[1] < 400  # now under the smear
    _build(widget, qtbot)
    layer = viewer.layers[TEST_LAYER]
    assert layer.translate[1] > smear.extent.world[1][1]  # right of the smear, not on it
    assert viewer.layers[-1] is layer and layer.visible
    np.testing.assert_array_equal(layer.data, widget._panel.images[0])


def test_the_key_names_the_layer_and_its_planes_or_tiles(make_napari_viewer, qtbot, tmp_path):
    from napari_cytodiffusion._widgets._grid import tile

    viewer, widget = _widget(make_napari_viewer, tmp_path, 2)

    def real_origins():
        _build(widget, qtbot)
        origins = sorted(row["origin"] for row in widget._panel.key if row["truth"] == "real")
        widget.end_test()
        return origins

    assert real_origins() == ["layer 'real', plane 1", "layer 'real', plane 2"]
    grid, _, layout = tile(_real_cells())
    features = pd.DataFrame({"index": [0, 1, 2], "label": ["platelet"] * 3})
    layer = viewer.add_image(
        grid, rgb=True, name="synthetic platelet", metadata={"features": features, "grid": layout}
    )
    widget._layer.value = layer
    assert real_origins() == [
        "layer 'synthetic platelet', tile 1",
        "layer 'synthetic platelet', tile 2",
    ]
