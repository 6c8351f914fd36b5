"""The classify command line and the Classify widget, on real PBC images."""

import json

import numpy as np
import pytest

from napari_cytodiffusion.cli import main

EOSINOPHIL = "eosinophil/EO_135534.jpg"
JSON_KEYS = {
    "file",
    "cell",
    "label",
    "probabilities",
    "uncertainty",
    "anomaly_score",
    "needs_review",
    "unet_evals",
    "seconds",
}


def test_cli_prints_one_json_object_per_cell_and_reports_bad_files(pbc_dir, tmp_path, capsys):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    code = main(["classify", str(pbc_dir / EOSINOPHIL), str(broken), "--json", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 2
    lines = [json.loads(line) for line in out.strip().splitlines()]
    assert len(lines) == 1 and set(lines[0]) == JSON_KEYS
    assert lines[0]["label"] == "eosinophil" and lines[0]["cell"] is None
    assert set(lines[0]["probabilities"]) == {
        "basophil",
        "eosinophil",
        "erythroblast",
        "immature_granulocyte",
        "lymphocyte",
        "monocyte",
        "neutrophil",
        "platelet",
    }
    assert "broken.png" in err and "Traceback" not in err


def test_cli_refuses_a_grayscale_image(tmp_path, capsys):
    from PIL import Image

    gray = tmp_path / "gray.png"
    Image.fromarray(np.full((64, 64), 128, np.uint8)).save(gray)
    assert main(["classify", str(gray)]) == 2
    assert "grayscale" in capsys.readouterr().err


@pytest.fixture
def classify_widget(make_napari_viewer):
    from napari_cytodiffusion._widgets._classify import ClassifyWidget

    viewer = make_napari_viewer()
    widget = ClassifyWidget(viewer)
    viewer.window.add_dock_widget(widget)
    return viewer, widget


def test_widget_adds_class_uncertainty_and_review_layers(classify_widget, pbc_dir, qtbot, tmp_path):
    from napari_cytodiffusion.core.io import read_image

    viewer, widget = classify_widget
    image = viewer.add_image(read_image(pbc_dir / EOSINOPHIL), name="cell", rgb=True)
    widget.reset_choices()
    widget._image.value = image
    widget._single.value = True
    widget._device.value = "cpu"
    widget._run.native.click()
    qtbot.waitUntil(lambda: widget.class_layer is not None, timeout=120_000)
    qtbot.waitUntil(lambda: not widget._runner.running, timeout=10_000)

    names = [layer.name for layer in viewer.layers]
    assert names == ["cell", "cell classes", "cell uncertainty", "cell needs review"]
    features = widget.class_layer.features
    assert list(features["index"]) == [1] and features["label"][0] == "eosinophil"
    assert widget.class_layer.data[80, 80] == 1  # the central cell carries label 1
    uncertainty = viewer.layers["cell uncertainty"].data
    assert uncertainty[80, 80] == pytest.approx(features["uncertainty"][0])
    assert widget._summary.item(1, 0).text() == "eosinophil"
    assert widget._summary.item(1, 1).text() == "1"

    # Thresholds apply to the result without running the model again.
    widget._uncertainty.value = 0.0
    assert bool(widget.class_layer.features["needs_review"][0])
    assert len(viewer.layers["cell needs review"].data) == 1
    assert widget._flagged.count() == 1

    csv = tmp_path / "cells.csv"
    widget.export_csv(csv)
    assert csv.read_text().splitlines()[0].startswith("index,label,p_basophil")


def test_widget_refuses_a_grayscale_layer_and_adds_nothing(classify_widget, monkeypatch):
    from napari_cytodiffusion._widgets import _classify

    errors = []
    monkeypatch.setattr(_classify, "show_error", errors.append)
    viewer, widget = classify_widget
    viewer.add_image(np.zeros((50, 50)), name="gray")
    widget.reset_choices()
    widget._run.native.click()
    assert errors and "RGB" in errors[0]
    assert [layer.name for layer in viewer.layers] == ["gray"]


def test_cancel_stops_the_work_and_adds_no_layer(classify_widget, pbc_dir, qtbot):
    from napari_cytodiffusion.core.io import read_image

    viewer, widget = classify_widget
    image = viewer.add_image(read_image(pbc_dir / EOSINOPHIL), name="cell", rgb=True)
    widget.reset_choices()
    widget._image.value = image
    widget._single.value = True
    widget._strategy.value = "exhaustive"  # long enough to cancel midway
    widget._run.native.click()
    widget._cancel.native.click()
    qtbot.waitUntil(lambda: not widget._runner.running, timeout=30_000)
    assert widget.class_layer is None
    assert [layer.name for layer in viewer.layers] == ["cell"]
