"""The Segment widget docked in a real viewer, run on the bundled sample field."""

import time

import numpy as np

PLUGIN = "napari-cytodiffusion"


def open_sample_and_dock(viewer):
    viewer.open_sample(PLUGIN, "cbc_monocyte_eosinophil")
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment cells")
    return viewer.layers["cbc_monocyte_eosinophil"], widget


def test_segment_adds_labelled_layers_with_features(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    image, widget = open_sample_and_dock(viewer)
    assert widget._image.value is image
    widget._run.native.click()  # the user presses Segment
    qtbot.waitUntil(lambda: not widget.runner.running, timeout=60000)

    white = viewer.layers["cbc_monocyte_eosinophil white cells"]
    red = viewer.layers["cbc_monocyte_eosinophil red cells"]
    platelets = viewer.layers["cbc_monocyte_eosinophil platelets"]
    assert type(white).__name__ == "Labels" and type(red).__name__ == "Labels"
    assert type(platelets).__name__ == "Points"
    assert white.visible and red.visible and platelets.visible  # added hidden, then shown
    assert white.data.shape == image.data.shape[:2]
    labels = [v for v in np.unique(white.data) if v]
    assert len(labels) == 2
    assert sorted(white.features["index"]) == labels
    for column in (
        "area",
        "equivalent_diameter",
        "centroid_row",
        "bbox_max_col",
        "cell_type",
        "mean_r",
        "nucleus_fraction",
    ):
        assert column in white.features.columns
    assert sorted(red.features["index"]) == [v for v in np.unique(red.data) if v]
    assert "white cells" in widget._summary.value
    # Hovering a white cell shows its features in the status bar.
    row = white.features.iloc[0]
    status = white.get_status((row.centroid_row, row.centroid_col), world=True)
    assert "nucleus_fraction" in str(status)

    assert "cbc_monocyte_eosinophil nuclei" not in viewer.layers  # only when asked for

    widget._nuclei.value = True
    red.opacity, platelets.visible = 0.8, False  # the person's settings
    widget._run.native.click()  # a second run replaces the layers' data instead of adding more
    qtbot.waitUntil(lambda: not widget.runner.running, timeout=60000)
    assert len(viewer.layers) == 5
    # The same layers, updated in place: what the person set stays.
    assert viewer.layers["cbc_monocyte_eosinophil white cells"] is white
    assert viewer.layers["cbc_monocyte_eosinophil red cells"] is red and red.opacity == 0.8
    assert viewer.layers["cbc_monocyte_eosinophil platelets"] is platelets
    assert not platelets.visible
    assert len(platelets.features) == len(platelets.data)
    nuclei = viewer.layers["cbc_monocyte_eosinophil nuclei"]
    inside = nuclei.data > 0
    assert nuclei.visible and nuclei.contour == 1 and 0 < inside.sum() < (white.data > 0).sum()
    assert (nuclei.data[inside] == white.data[inside]).all()  # each with its cell's label
    assert set(np.unique(nuclei.data[inside])) == set(labels)
    widget._nuclei.value = False
    widget._run.native.click()  # nuclei no longer asked for: their layer goes
    qtbot.waitUntil(lambda: not widget.runner.running, timeout=60000)
    assert "cbc_monocyte_eosinophil nuclei" not in viewer.layers and len(viewer.layers) == 4
    widget._nuclei.value = True
    widget._run.native.click()
    qtbot.waitUntil(lambda: not widget.runner.running, timeout=60000)
    nuclei = viewer.layers["cbc_monocyte_eosinophil nuclei"]
    assert viewer.layers.selection.active is white
    # Classify cells offers the white cells, never their nuclei (or the red cells).
    _, classify = viewer.window.add_plugin_dock_widget(PLUGIN, "Classify cells")
    assert white in classify._labels.choices and nuclei not in classify._labels.choices

    # Renamed, the image and its layers stay tied by the image's id, not their names.
    image.name, white.name, nuclei.name = "field 1", "my cells", "my nuclei"
    classify._pick_segmented()
    assert classify._labels.value is white
    widget._nuclei.value = False
    widget._run.native.click()
    qtbot.waitUntil(lambda: not widget.runner.running, timeout=60000)
    assert viewer.layers["my cells"] is white and white.metadata["source"] == "field 1"
    assert "my nuclei" not in viewer.layers  # not asked for: it goes, whatever its name
    assert len(viewer.layers) == 4


def test_cancel_stops_quickly_and_adds_nothing(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "cbc_monocyte_eosinophil")
    image = viewer.layers[0]
    mosaic = np.tile(image.data, (4, 4, 1))  # 1920 x 2560: several seconds of work
    big = viewer.add_image(mosaic, name="mosaic", rgb=True)
    from napari_cytodiffusion._widgets._segment import SegmentWidget

    widget = SegmentWidget(viewer)
    worker = widget.start(big)
    assert worker is not None
    qtbot.waitUntil(
        lambda: widget.runner._state["total"] > 0 or not widget.runner.running, timeout=30000
    )
    qtbot.wait(300)
    cancelled_at = time.perf_counter()
    widget._cancel.native.click()
    qtbot.waitUntil(lambda: not widget.runner.running, timeout=5000)
    assert time.perf_counter() - cancelled_at < 1.5
    assert [layer.name for layer in viewer.layers] == ["cbc_monocyte_eosinophil", "mosaic"]


def test_an_image_removed_while_it_is_segmented_gets_no_layers(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    image, widget = open_sample_and_dock(viewer)
    assert widget.start(image) is not None
    viewer.layers.remove(image)  # the person closes the image while the work runs
    qtbot.waitUntil(lambda: not widget.runner.running, timeout=120_000)
    assert len(viewer.layers) == 0
    assert widget._summary.value == (
        "cancelled: 'cbc_monocyte_eosinophil' was removed while it ran; nothing added"
    )
