"""Classify cells after a review of the widget: layers tied by what they record, the model's
own thresholds, reruns that update, and errors told plainly."""

import numpy as np
import pytest

EOSINOPHIL = "eosinophil/EO_135534.jpg"


@pytest.fixture
def classify_widget(make_napari_viewer):
    from napari_cytodiffusion._widgets._classify import ClassifyWidget

    viewer = make_napari_viewer()
    widget = ClassifyWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget._device.value = "cpu"
    return viewer, widget


@pytest.fixture
def classify_calls(monkeypatch):
    """The keyword arguments of every core ``classify`` call the widget makes."""
    from napari_cytodiffusion.core.tasks import classify as task

    calls, classify = [], task.classify

    def recorded(image, model, **options):
        calls.append(options)
        return classify(image, model, **options)

    monkeypatch.setattr(task, "classify", recorded)
    return calls


def _cell(viewer, path, name="cell"):
    from napari_cytodiffusion.core.io import read_image

    return viewer.add_image(read_image(path), name=name, rgb=True)


def _classify_now(widget, qtbot):
    widget._run.native.click()
    qtbot.waitUntil(lambda: not widget._runner.running, timeout=120_000)


def _white_cells(viewer, image, labels):
    """A white-cell layer as Segment cells makes it for ``image``."""
    from napari_cytodiffusion._widgets._common import layer_id

    segmented = {"source": image.name, "image_id": layer_id(image), "cells": "white"}
    return viewer.add_labels(labels, name=f"{image.name} white cells", metadata=segmented)


def _disc(shape, centre, radius, value=1, labels=None):
    labels = np.zeros(shape, np.int64) if labels is None else labels
    rows, cols = np.ogrid[: shape[0], : shape[1]]
    labels[(rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius**2] = value
    return labels


def test_a_layer_of_another_kind_is_never_removed_for_a_result(make_napari_viewer):
    from napari_cytodiffusion._widgets._common import update_or_add

    viewer = make_napari_viewer()
    theirs = viewer.add_labels(np.ones((4, 4), np.uint8), name="x needs review")
    markers = update_or_add(viewer, "points", np.zeros((1, 2)), "x needs review", {}, {})
    assert viewer.layers["x needs review"] is theirs and markers.name == "x needs review [1]"


def test_review_markers_stay_with_a_renamed_classes_layer(classify_widget, pbc_dir, qtbot):
    from napari.layers import Labels

    from napari_cytodiffusion._widgets._common import review_markers

    viewer, widget = classify_widget
    _cell(viewer, pbc_dir / EOSINOPHIL)
    # Analyze smear's markers of this image, under the name Classify gives its own.
    theirs = viewer.add_points([[5.0, 5.0]], name="cell needs review", metadata={"source": "cell"})
    widget._single.value = True
    _classify_now(widget, qtbot)
    classes = widget.class_layer
    markers = review_markers(viewer, classes)
    assert markers.name == "cell needs review [1]"
    classes.name = "patient 7 results"
    widget._uncertainty.value = 0.0  # every cell flagged
    assert isinstance(viewer.layers["patient 7 results"], Labels)
    assert widget.class_layer in viewer.layers and len(viewer.layers) == 5
    assert len(markers.data) == 1 and review_markers(viewer, classes) is markers
    assert theirs.data.tolist() == [[5.0, 5.0]]


def test_white_cells_of_another_image_of_the_same_name_are_not_picked(classify_widget):
    from napari_cytodiffusion._widgets._classify import NO_LABELS, ClassifyWidget

    viewer, widget = classify_widget
    first = viewer.add_image(np.zeros((40, 50, 3), np.uint8), name="field", rgb=True)
    white = _white_cells(viewer, first, np.zeros((40, 50), np.uint16))
    widget._image.value = first
    assert widget._labels.value is white
    viewer.layers.remove(first)
    # Another smear, of the same name and size (field.jpg of another folder).
    second = viewer.add_image(np.ones((40, 50, 3), np.uint8), name="field", rgb=True)
    widget._image.value = second
    assert white in widget._labels.choices and widget._labels.value == NO_LABELS
    assert ClassifyWidget(viewer)._labels.value == NO_LABELS  # docked after it, too


def test_review_thresholds_are_the_chosen_models_own_and_exact(
    classify_widget, pbc_dir, qtbot, classify_calls, default_model
):
    from napari_cytodiffusion._widgets._common import MODEL_FILE

    viewer, widget = classify_widget
    _cell(viewer, pbc_dir / EOSINOPHIL)
    widget._single.value = True
    assert widget._uncertainty.native.text() == widget._anomaly.native.text() == "calibrated"
    _classify_now(widget, qtbot)
    # The first run is flagged by the model's calibrated thresholds, not the boxes' defaults.
    (options,) = classify_calls
    assert options["uncertainty_threshold"] is None and options["anomaly_threshold"] is None
    exact = default_model.calibration["uncertainty_threshold"]  # 0.11767
    assert widget._uncertainty.value == round(exact, 2) == 0.12
    # A cell between the exact threshold and the box's rounded one is flagged, as on the
    # command line, and its reason is told again for the thresholds now set.
    features = widget.class_layer.features
    features.loc[0, ["uncertainty", "anomaly_score", "domain_shift", "size_ratio"]] = [
        0.119,
        -50.0,
        np.nan,
        np.nan,
    ]
    widget.class_layer.features = features
    widget._anomaly.value = 50.0  # the person's anomaly threshold; the uncertainty stays exact
    features = widget.class_layer.features
    assert features["needs_review"].tolist() == [True] and features["why"].tolist() == ["uncertain"]
    widget._uncertainty.value = 0.13
    features = widget.class_layer.features
    assert features["needs_review"].tolist() == [False] and features["why"].tolist() == [""]
    # Another model: its own thresholds again, whatever was set for this one.
    widget._fields.model.value = MODEL_FILE
    assert widget._uncertainty.native.text() == widget._anomaly.native.text() == "calibrated"
    assert [threshold.for_run() for threshold in widget._thresholds] == [None, None]
    assert widget.class_layer.features["why"].tolist() == ["uncertain"]  # its model's again


def test_a_cell_a_person_called_has_no_reasons_left(classify_widget, pbc_dir, qtbot):
    viewer, widget = classify_widget
    _cell(viewer, pbc_dir / EOSINOPHIL)
    widget._single.value = True
    _classify_now(widget, qtbot)
    widget._uncertainty.value = 0.0
    assert widget.class_layer.features["why"][0].startswith("uncertain")
    features = widget.class_layer.features
    features.loc[0, "annotated"] = "eosinophil"
    widget.class_layer.features = features
    widget._uncertainty.value = 0.01
    assert widget.class_layer.features[["needs_review", "why"]].values.tolist() == [[False, ""]]


def test_single_cell_image_ignores_the_white_cells_and_a_smear_keeps_the_sidecar(
    classify_widget, pbc_dir, qtbot, tmp_path, classify_calls
):
    import shutil

    from napari_cytodiffusion.core.annotations import (
        Annotations,
        CellAnnotation,
        save_annotations,
    )

    viewer, widget = classify_widget
    path = tmp_path / "cell.jpg"
    shutil.copy(pbc_dir / EOSINOPHIL, path)
    save_annotations(
        Annotations("cell.jpg", (160, 160), [CellAnnotation((80.0, 80.0), "monocyte")]), path
    )
    (image,) = viewer.open(path)
    labels = _disc((160, 160), (80, 80), 30)
    labels[5:25, 5:25] = 2
    white = _white_cells(viewer, image, labels)
    widget.reset_choices()
    widget._image.value = image
    assert widget._labels.value is white
    widget._single.value = True
    assert not widget._labels.enabled
    _classify_now(widget, qtbot)
    assert classify_calls[-1]["labels"] is None and classify_calls[-1]["annotations"] is None
    assert list(widget.class_layer.features["index"]) == [1]  # the central cell only
    assert widget.class_layer.features["annotated"].tolist() == [""]  # as on the command line
    widget._single.value = False
    _classify_now(widget, qtbot)
    features = widget.class_layer.features
    assert classify_calls[-1]["annotations"] is not None
    assert list(features["index"]) == [1, 2] and features["annotated"].tolist() == ["monocyte", ""]


def test_running_again_updates_the_earlier_layers(classify_widget, pbc_dir, qtbot):
    viewer, widget = classify_widget
    _cell(viewer, pbc_dir / EOSINOPHIL)
    widget._single.value = True
    _classify_now(widget, qtbot)
    uncertainty, markers = viewer.layers["cell uncertainty"], viewer.layers["cell needs review"]
    uncertainty.visible, markers.visible = True, False
    widget.class_layer.name = "mine"
    classes = widget.class_layer
    _classify_now(widget, qtbot)
    assert widget._status.value.startswith("done: 1 white cell")
    # Updated in place: napari makes a full garbage collection whenever a layer is removed.
    assert widget.class_layer is classes
    assert [layer.name for layer in viewer.layers] == [
        "cell",
        "mine",
        "cell uncertainty",
        "cell needs review",
    ]
    assert viewer.layers["mine"] is widget.class_layer and widget.class_layer.visible
    assert viewer.layers["cell uncertainty"] is uncertainty and uncertainty.visible
    assert viewer.layers["cell needs review"] is markers and not markers.visible


def test_an_image_of_another_shape_gets_one_classes_layer(classify_widget, pbc_dir, qtbot):
    """The earlier classes layer cannot take cells of another shape: it is replaced, not
    left to be found (and passed over) by every later run."""
    viewer, widget = classify_widget
    image = _cell(viewer, pbc_dir / EOSINOPHIL)
    widget._single.value = True
    _classify_now(widget, qtbot)
    image.data = image.data[:150, :150]
    for _ in range(2):
        _classify_now(widget, qtbot)
        assert widget._status.value.startswith("done: 1 white cell")
        classes = [layer for layer in viewer.layers if layer.metadata.get("shows") == "classes"]
        assert classes == [widget.class_layer] and widget.class_layer.data.shape == (150, 150)


def test_a_run_without_white_cells_clears_the_earlier_result(classify_widget, pbc_dir, qtbot):
    viewer, widget = classify_widget
    image = _cell(viewer, pbc_dir / EOSINOPHIL)
    widget._single.value = True
    widget._uncertainty.value = 0.0  # the cell is flagged: the list has a row
    _classify_now(widget, qtbot)
    assert widget._flagged.count() == 1 and widget._summary.rowCount() == 8
    empty = viewer.add_labels(np.zeros((160, 160), np.uint16), name="no cells")
    widget._single.value = False
    widget.reset_choices()
    widget._labels.value = empty
    _classify_now(widget, qtbot)
    assert widget._status.value == (
        "done: no white cells found; the earlier result is no longer listed or exported"
    )
    assert widget.class_layer is None and not widget._export.enabled
    assert widget._flagged.count() == 0 and widget._summary.rowCount() == 0
    assert image in viewer.layers


def test_cell_ids_beyond_16_bits_are_numbered_from_one(classify_widget, pbc_dir, qtbot):
    viewer, widget = classify_widget
    image = _cell(viewer, pbc_dir / EOSINOPHIL)
    painted = viewer.add_labels(_disc((160, 160), (80, 80), 30, value=70_000), name="painted")
    widget.reset_choices()
    widget._image.value, widget._labels.value = image, painted
    _classify_now(widget, qtbot)
    assert widget._status.value.startswith("done: 1 white cell")
    layer = widget.class_layer
    assert layer.data.dtype == np.uint16 and layer.data[80, 80] == 1
    assert layer.features[["index", "original_index"]].values.tolist() == [[1, 70_000]]
    uncertainty = viewer.layers["cell uncertainty"].data[80, 80]
    assert uncertainty == pytest.approx(layer.features["uncertainty"][0])


def test_an_error_while_showing_the_result_leaves_no_layer(
    classify_widget, pbc_dir, qtbot, monkeypatch
):
    from napari_cytodiffusion._widgets import _classify

    def broken(*_):
        raise RuntimeError("broken table")

    viewer, widget = classify_widget
    _cell(viewer, pbc_dir / EOSINOPHIL)
    widget._single.value = True
    monkeypatch.setattr(_classify, "show_differential", broken)
    with qtbot.capture_exceptions() as raised:
        _classify_now(widget, qtbot)
    assert [str(error) for _, error, _ in raised] == ["broken table"]
    assert widget._status.value == "failed while showing the result: broken table"
    assert [layer.name for layer in viewer.layers] == ["cell"]
    assert widget.class_layer is None and not widget._export.enabled
    # Run again after a run that worked: its classes layer stays, the new one goes.
    monkeypatch.undo()
    _classify_now(widget, qtbot)
    shown = [layer.name for layer in viewer.layers]
    earlier = widget.class_layer
    monkeypatch.setattr(_classify, "show_differential", broken)
    with qtbot.capture_exceptions() as raised:
        _classify_now(widget, qtbot)
    assert len(raised) == 1 and [layer.name for layer in viewer.layers] == shown
    assert viewer.layers["cell classes"] is earlier


def test_a_failed_export_says_why(classify_widget, tmp_path, monkeypatch):
    import pandas as pd

    from napari_cytodiffusion._widgets import _classify

    errors = []
    monkeypatch.setattr(_classify, "show_error", errors.append)
    viewer, widget = classify_widget
    features = pd.DataFrame({"index": [1], "label": ["monocyte"]})
    widget.class_layer = viewer.add_labels(np.zeros((4, 4), np.int32), features=features)
    for path, reason in (
        (
            tmp_path / "missing" / "cells.csv",
            f"Cannot save file into a non-existent directory: '{tmp_path / 'missing'}'",
        ),
        (tmp_path, "Is a directory"),
    ):
        widget.export_csv(path)
        assert errors.pop() == f"Could not export the cells to {path}: {reason}."
        assert widget._status.value == f"export failed: {reason}"
    assert list(tmp_path.iterdir()) == []


def test_an_edit_saved_while_classifying_shows_in_the_result(
    classify_widget, classify_calls, monkeypatch, tmp_path, qtbot
):
    """A person who labels a cell in Annotate cells while Classify cells runs on its image
    sees the label in the result (classified again with it), not the cell as unreviewed."""
    import shutil
    from pathlib import Path

    from napari_cytodiffusion.core.annotations import (
        Annotations,
        CellAnnotation,
        load_annotations,
        save_annotations,
    )
    from napari_cytodiffusion.core.tasks import classify as task

    samples = Path(__file__).resolve().parents[1] / "src" / "napari_cytodiffusion" / "sample_data"
    path = tmp_path / "field.jpg"
    shutil.copy(samples / "cbc_monocyte_eosinophil.jpg", path)
    viewer, widget = classify_widget
    (image,) = viewer.open(str(path), plugin="napari")
    widget._image.value = image
    recorded = task.classify

    def edited_meanwhile(data, model, **options):
        result = recorded(data, model, **options)
        if load_annotations(path) is None:  # the first run: a person labels its first cell
            row = result.table().iloc[0]
            cell = CellAnnotation((row.centroid_row, row.centroid_col), "basophil")
            save_annotations(Annotations(path.name, data.shape[:2], [cell]), path)
        return result

    monkeypatch.setattr(task, "classify", edited_meanwhile)
    _classify_now(widget, qtbot)
    assert len(classify_calls) == 2
    assert classify_calls[0]["annotations"] is None
    assert classify_calls[1]["annotations"] == load_annotations(path)
    table = widget.class_layer.features
    assert table["annotated"].tolist()[0] == "basophil" and table["label"].iloc[0] == "basophil"
