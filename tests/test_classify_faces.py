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
    "domain_shift",
    "softness",
    "size_ratio",
    "needs_review",
    "why",
    "unet_evals",
    "seconds",
    "predicted",
    "annotated",
    "centroid_row",
    "centroid_col",
    "rbc_diameter",
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
    assert 25 < lines[0]["rbc_diameter"] < 33  # the scale its crop was cut at
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


def test_cli_says_when_an_image_is_softer_than_the_training_images(pbc_dir, tmp_path, capsys):
    from PIL import Image
    from scipy import ndimage as ndi

    from napari_cytodiffusion.core.io import read_image

    # Defocused by about 1.5 model pixels: the cell is scored on the low band of its errors,
    # and still flagged, and the user must hear that the image, not the cell, is the problem,
    # and what to do about it.
    soft = tmp_path / "soft.png"
    image = read_image(pbc_dir / EOSINOPHIL).astype(np.float32)
    Image.fromarray(ndi.gaussian_filter(image, (1.7, 1.7, 0)).round().astype(np.uint8)).save(soft)
    assert main(["classify", str(pbc_dir / EOSINOPHIL), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "unlike the training smears" not in out and "smear field" not in out
    assert main(["classify", str(soft), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "NEEDS REVIEW (" in out and "unlike the training smears" in out
    assert f"{soft}: this smear is unlike the training smears" in out and "check the focus" in out


def test_cli_says_when_a_single_cell_image_is_a_smear_field(pbc_dir, tmp_path, capsys):
    from PIL import Image

    from napari_cytodiffusion.core.io import read_image

    # Four by four PBC fields, about 22 red cells across: the central cell alone is rarely
    # what its user wants, so the command says how to classify every white cell.
    field = tmp_path / "field.png"
    Image.fromarray(np.tile(read_image(pbc_dir / EOSINOPHIL), (4, 4, 1))).save(field)
    assert main(["classify", str(field), "--device", "cpu", "--rbc-diameter", "29"]) == 0
    out = capsys.readouterr().out
    assert "central cell:" in out
    assert f"{field}: this image is about" in out and "--segment" in out


def test_cli_refuses_a_grayscale_image(tmp_path, capsys):
    from PIL import Image

    gray = tmp_path / "gray.png"
    Image.fromarray(np.full((64, 64), 128, np.uint8)).save(gray)
    assert main(["classify", str(gray)]) == 2
    assert "grayscale" in capsys.readouterr().err


def test_cli_differential_of_a_field_shows_no_nan(capsys):
    from napari_cytodiffusion._sample_data import sample_path

    # The sample's one white cell: a differential with at most one leukocyte, where the
    # classes counted apart (platelet, erythroblast) may have no rate per 100 to show.
    image = sample_path("cbc_lymphocyte")
    assert main(["classify", "--segment", str(image), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert f"{image}: 1 white cell\n" in out
    percents = [row.split()[2] for row in out.split("in_differential\n")[1].splitlines()[:8]]
    assert all(p == "-" or float(p) >= 0 for p in percents) and "nan" not in out.lower()


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
    # Added hidden, shown a step later; the uncertainty stays hidden until asked for.
    assert viewer.layers["cell needs review"].visible and widget.class_layer.visible
    assert not viewer.layers["cell uncertainty"].visible
    features = widget.class_layer.features
    assert list(features["index"]) == [1] and features["label"][0] == "eosinophil"
    assert widget.class_layer.data[80, 80] == 1  # the central cell carries label 1
    uncertainty = viewer.layers["cell uncertainty"].data
    assert uncertainty[80, 80] == pytest.approx(features["uncertainty"][0])
    assert widget._summary.item(1, 0).text() == "eosinophil"
    assert widget._summary.item(1, 1).text() == "1"
    assert widget._device_used.value in ("ran on: cpu (bfloat16)", "ran on: cpu (float32)")

    # Thresholds apply to the result without running the model again.
    widget._uncertainty.value = 0.0
    assert bool(widget.class_layer.features["needs_review"][0])
    markers = viewer.layers["cell needs review"]
    assert len(markers.data) == 1
    assert widget._flagged.count() == 1
    # The markers move in place (no new layer), red again even where Annotate hid a ring.
    markers.border_color = [[1.0, 0.0, 0.0, 0.0]]
    widget._update_review()  # what a changed threshold calls
    assert viewer.layers["cell needs review"] is markers and len(viewer.layers) == 4
    assert len(markers.data) == 1 and markers.border_color[0].tolist() == [1, 0, 0, 1]
    # A cell a person has called needs no more review, whatever the thresholds.
    features = widget.class_layer.features
    features.loc[0, "annotated"] = "eosinophil"
    widget.class_layer.features = features
    widget._update_review()
    assert not widget.class_layer.features["needs_review"][0]
    assert len(markers.data) == 0 and widget._flagged.count() == 0
    # A person's correction (Annotate cells writes the layer's features) is counted at once.
    features.loc[0, ["annotated", "label"]] = "monocyte"
    widget.class_layer.features = features
    counts = {
        widget._summary.item(r, 0).text(): widget._summary.item(r, 1).text() for r in range(8)
    }
    assert counts["eosinophil"] == "0" and counts["monocyte"] == "1"

    csv = tmp_path / "cells.csv"
    widget.export_csv(csv)
    header = csv.read_text().splitlines()[0]
    assert header.startswith("index,label,predicted,annotated,added,p_basophil")


def test_export_csv_is_atomic(classify_widget, tmp_path, monkeypatch):
    """A failed export leaves the earlier file as it was, and no partial file; the person is
    told why, with no traceback."""
    import pandas as pd

    from napari_cytodiffusion._widgets import _classify

    errors = []
    monkeypatch.setattr(_classify, "show_error", errors.append)
    viewer, widget = classify_widget
    features = pd.DataFrame({"index": [1, 2], "label": ["monocyte", "lymphocyte"]})
    widget.class_layer = viewer.add_labels(np.zeros((4, 4), np.int32), features=features)
    csv = tmp_path / "cells.csv"
    csv.write_text("an earlier export\n")
    write = pd.DataFrame.to_csv

    def disk_full(table, path, **options):
        write(table.head(1), path, **options)  # part of the table, then the disk fills
        raise OSError("No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_csv", disk_full)
    widget.export_csv(csv)
    assert errors == [f"Could not export the cells to {csv}: No space left on device."]
    assert widget._status.value == "export failed: No space left on device"
    assert csv.read_text() == "an earlier export\n"
    assert [path.name for path in tmp_path.iterdir()] == ["cells.csv"]
    monkeypatch.setattr(pd.DataFrame, "to_csv", write)
    widget.export_csv(csv)
    assert csv.read_text().splitlines() == ["index,label", "1,monocyte", "2,lymphocyte"]


def test_a_multiscale_image_is_classified_at_full_resolution(classify_widget, pbc_dir, qtbot):
    """Not at its smallest level, which is what np.asarray of multiscale data gives."""
    from napari_cytodiffusion.core.io import read_image

    viewer, widget = classify_widget
    full = read_image(pbc_dir / EOSINOPHIL)
    image = viewer.add_image([full, full[::2, ::2]], multiscale=True, rgb=True, name="cell")
    widget.reset_choices()
    widget._image.value = image
    widget._single.value = True
    widget._device.value = "cpu"
    widget._run.native.click()
    qtbot.waitUntil(lambda: not widget._runner.running, timeout=120_000)
    assert widget.class_layer.data.shape == full.shape[:2]
    assert widget.class_layer.features["label"][0] == "eosinophil"


def test_a_banner_says_when_the_smear_is_unlike_the_training_smears(
    classify_widget, pbc_dir, qtbot
):
    from napari_cytodiffusion._sample_data import sample_path
    from napari_cytodiffusion.core.io import read_image

    viewer, widget = classify_widget
    widget._device.value = "cpu"
    field = viewer.add_image(read_image(sample_path("cbc_lymphocyte")), name="field", rgb=True)
    widget.reset_choices()
    widget._image.value = field
    assert widget._banner.native.isHidden()
    widget._run.native.click()
    qtbot.waitUntil(lambda: not widget._runner.running, timeout=120_000)
    # Another lab's smear: the banner says so and what to do; the status keeps the counts.
    assert not widget._banner.native.isHidden()
    assert widget._banner.value.startswith("This smear is unlike the training smears")
    assert widget._banner.value.endswith("review them or adapt the model")
    assert widget._status.value.startswith("done: 1 white cell") and "unlike" not in (
        widget._status.value
    )
    # A PBC cell is of the training smears: the banner goes.
    cell = viewer.add_image(read_image(pbc_dir / EOSINOPHIL), name="cell", rgb=True)
    widget._image.value = cell
    widget._single.value = True
    widget._run.native.click()
    qtbot.waitUntil(lambda: not widget._runner.running, timeout=120_000)
    assert widget._banner.native.isHidden() and widget._banner.value == ""


def test_white_cells_are_offered_only_from_layers_that_fit_the_image(classify_widget):
    from napari_cytodiffusion._widgets._classify import NO_LABELS, ClassifyWidget
    from napari_cytodiffusion._widgets._common import layer_id

    viewer, widget = classify_widget
    smear = viewer.add_image(np.zeros((40, 50, 3), np.uint8), name="smear", rgb=True)
    other = viewer.add_image(np.zeros((30, 30, 3), np.uint8), name="other", rgb=True)
    drawn = viewer.add_labels(np.zeros((40, 50), np.uint32), name="drawn by hand")
    viewer.add_labels(np.zeros((30, 30), np.uint32), name="other's cells")
    viewer.add_labels(
        np.zeros((40, 50), np.uint32), name="red", metadata={"source": "smear", "cells": "red"}
    )
    viewer.add_labels(np.zeros((40, 50), np.uint32), name="classes", metadata={"class": True})
    segmented = {"source": "smear", "image_id": layer_id(smear), "cells": "white"}
    white = viewer.add_labels(np.zeros((40, 50), np.uint32), name="white", metadata=segmented)
    widget._image.value = smear
    assert set(widget._labels.choices) == {white, NO_LABELS, drawn}
    assert widget._labels.value is white  # Segment cells' white cells for this image
    docked_later = ClassifyWidget(viewer)  # opened after Segment cells ran
    assert docked_later._image.value is smear and docked_later._labels.value is white
    widget._image.value = other
    assert set(widget._labels.choices) == {NO_LABELS, viewer.layers["other's cells"]}
    assert widget._labels.value == NO_LABELS


def test_widget_refuses_a_grayscale_layer_and_adds_nothing(classify_widget, monkeypatch):
    from napari_cytodiffusion._widgets import _classify

    errors = []
    monkeypatch.setattr(_classify, "show_error", errors.append)
    viewer, widget = classify_widget
    viewer.add_image(np.zeros((50, 50)), name="gray")
    uncertainty = viewer.add_image(np.zeros((50, 50)), name="smear uncertainty")
    widget.reset_choices()
    assert widget._image.choices == ()  # a grey image is no smear to choose
    widget._run.native.click()
    assert errors == [
        "'gray' is not an RGB colour image; Classify needs the colour image of "
        "the smear: open it as RGB."
    ]
    smear = viewer.add_image(np.zeros((50, 50, 3), np.uint8), name="smear", rgb=True)
    assert widget._image.choices == (smear,)
    viewer.layers.remove(smear)  # the smear gone: no fall-back to a result layer
    assert widget._image.value is None and uncertainty not in widget._image.choices
    assert [layer.name for layer in viewer.layers] == ["gray", "smear uncertainty"]


def test_cancel_stops_the_work_within_a_second_and_adds_no_layer(
    classify_widget, pbc_dir, qtbot, cancel_latency
):
    from napari_cytodiffusion.core.io import read_image

    viewer, widget = classify_widget
    image = viewer.add_image(read_image(pbc_dir / EOSINOPHIL), name="cell", rgb=True)
    widget.reset_choices()
    widget._image.value = image
    widget._single.value = True
    widget._device.value = "cpu"
    widget._strategy.value = "exhaustive"  # long enough to cancel midway
    widget._run.native.click()
    # Into the network calls (the bar's last 85 %), where a cancel waits for the current one.
    qtbot.waitUntil(lambda: widget._runner._state["done"] > 200, timeout=60_000)
    assert cancel_latency(widget) < 1.0
    assert widget.class_layer is None and widget._status.value == "cancelled"
    assert [layer.name for layer in viewer.layers] == ["cell"]


def test_cli_classifies_the_images_of_a_folder(pbc_dir, tmp_path, capsys):
    import shutil

    folder, empty = tmp_path / "cells", tmp_path / "empty"
    folder.mkdir(), empty.mkdir()
    shutil.copy(pbc_dir / EOSINOPHIL, folder / "b.jpg")
    shutil.copy(pbc_dir / EOSINOPHIL, folder / "a.jpg")
    (folder / "notes.txt").write_text("not an image")
    code = main(["classify", str(folder), str(empty), "--json", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 2  # the empty folder is reported, the others classified
    files = [json.loads(line)["file"] for line in out.strip().splitlines()]
    assert files == [str(folder / "a.jpg"), str(folder / "b.jpg")]
    assert "a folder with no image files" in err and "1 of 3 files" in err


def test_cli_json_of_a_smear_without_white_cells_says_so_on_stderr(tmp_path, capsys):
    from PIL import Image

    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((300, 300, 3), (230, 220, 210), np.uint8)).save(blank)
    args = ["classify", "--segment", "--json", "--rbc-diameter", "30", "--device", "cpu"]
    assert main([*args, str(blank)]) == 0
    out, err = capsys.readouterr()
    assert out == ""  # stdout holds cell records only, for scripts
    assert f"{blank}: no white cells found" in err


def test_cli_json_tells_of_a_soft_image_on_stderr(pbc_dir, tmp_path, capsys):
    from PIL import Image
    from scipy import ndimage as ndi

    from napari_cytodiffusion.core.io import read_image

    soft = tmp_path / "soft.png"
    image = read_image(pbc_dir / EOSINOPHIL).astype(np.float32)
    Image.fromarray(ndi.gaussian_filter(image, (1.7, 1.7, 0)).round().astype(np.uint8)).save(soft)
    assert main(["classify", str(soft), "--json", "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    assert set(json.loads(out)) == JSON_KEYS
    assert f"{soft}: this smear is unlike the training smears" in err


def test_cli_classifies_a_file_named_twice_once(tmp_path, monkeypatch, capsys):
    import shutil

    from napari_cytodiffusion._sample_data import sample_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "more").mkdir()
    shutil.copy(sample_path("pbc_lymphocyte"), "more/a.jpg")
    named = ["more/a.jpg", "./more/a.jpg", str(tmp_path / "more" / "a.jpg"), "more"]
    assert main(["classify", *named, "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.count("central cell:") == 1
    assert "single-cell image" not in out  # no differential of one image counted four times
