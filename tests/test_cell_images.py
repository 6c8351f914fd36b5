"""Classifying a folder of single-cell images: the task and the Classify cell images widget."""

import shutil

import numpy as np
import pytest

# PBC val cells of three classes (val: not the test split).
CELLS = {
    "a_eosinophil.jpg": "eosinophil/EO_10781.jpg",
    "b_lymphocyte.jpg": "lymphocyte/LY_100275.jpg",
    "c_neutrophil.jpg": "neutrophil/BNE_105060.jpg",
}


@pytest.fixture
def cell_folder(pbc_dir, tmp_path):
    """Three PBC cells, an unreadable image and a text file in one folder."""
    folder = tmp_path / "export"
    folder.mkdir()
    for name, source in CELLS.items():
        shutil.copy(pbc_dir / source, folder / name)
    (folder / "d_broken.png").write_bytes(b"not an image")
    (folder / "notes.txt").write_text("not an image either")
    return folder


def test_each_image_is_called_as_it_would_be_alone(cell_folder, default_model):
    from napari_cytodiffusion.core.io import folder_images, read_image
    from napari_cytodiffusion.core.tasks.classify import classify, classify_cell_images

    ticks = []
    result = classify_cell_images(
        folder_images(cell_folder), default_model, progress=lambda d, t: ticks.append(d / t)
    )
    assert [path.name for path in result.paths] == list(CELLS)
    assert [call.label for call in result.calls] == ["eosinophil", "lymphocyte", "neutrophil"]
    assert [path.name for path, _ in result.failed] == ["d_broken.png"]
    assert "Cannot read" in result.failed[0][1]
    assert len(set(result.rbc_diameters)) == 1  # one scanner, one shared scale
    assert ticks == sorted(ticks) and ticks[-1] == 1.0

    alone = classify(
        read_image(cell_folder / "b_lymphocyte.jpg"),
        default_model,
        segment=False,
        rbc_diameter=result.rbc_diameters[1],
    )
    assert alone.calls[0].probabilities == pytest.approx(result.calls[1].probabilities)
    np.testing.assert_array_equal(alone.crops[0], result.crops[1])

    table = result.table()
    assert list(table["index"]) == [1, 2, 3]
    assert list(table.columns[:3]) == ["index", "file", "label"]
    assert table["file"][2] == str(cell_folder / "c_neutrophil.jpg")
    counts = result.differential().set_index("class")["count"]
    assert counts["eosinophil"] == counts["lymphocyte"] == counts["neutrophil"] == 1


def test_a_persons_calls_in_the_folder_are_kept_over_the_models(cell_folder, default_model, capsys):
    import json

    from napari_cytodiffusion.cli import main
    from napari_cytodiffusion.core.annotations import save_folder_labels
    from napari_cytodiffusion.core.datasets import list_labelled_images
    from napari_cytodiffusion.core.io import folder_images
    from napari_cytodiffusion.core.tasks.classify import classify_cell_images

    labels = save_folder_labels(cell_folder, {"b_lymphocyte.jpg": "monocyte"})
    result = classify_cell_images(folder_images(cell_folder), default_model)
    assert result.annotated == ["", "monocyte", ""]
    table = result.table()
    assert list(table["label"]) == ["eosinophil", "monocyte", "neutrophil"]
    assert table["predicted"][1] == "lymphocyte"
    counts = result.differential().set_index("class")["count"]
    assert counts["monocyte"] == 1 and counts["lymphocyte"] == 0

    assert main(["classify", str(cell_folder / "b_lymphocyte.jpg"), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert (record["label"], record["predicted"]) == ("monocyte", "lymphocyte")

    # Without --json, the folder's differential follows the calls (the person's where given).
    assert main(["classify", str(cell_folder)]) == 2  # the broken image is reported
    out = capsys.readouterr().out
    differential = out.split("3 single-cell images:\n")[1].splitlines()
    counts = {row.split()[0]: int(row.split()[1]) for row in differential[1:]}
    assert counts["monocyte"] == counts["eosinophil"] == counts["neutrophil"] == 1
    assert counts["lymphocyte"] == 0

    # The table, and the folder that holds it, are a labelled dataset as they are (what
    # adapt and train read).
    # Artefacts and unknown cells are left out of it.
    save_folder_labels(
        cell_folder, {"a_eosinophil.jpg": "artefact", "b_lymphocyte.jpg": "monocyte"}
    )
    for data in (labels, cell_folder):
        records = list_labelled_images(data)
        assert [(r.path.name, r.label) for r in records] == [("b_lymphocyte.jpg", "monocyte")]


def test_a_crash_while_saving_calls_leaves_the_previous_table(tmp_path, monkeypatch):
    import csv

    from napari_cytodiffusion.core.annotations import load_folder_labels, save_folder_labels

    save_folder_labels(tmp_path, {"a.png": "neutrophil"})
    real_writer = csv.writer

    def crashing_writer(handle):
        writer = real_writer(handle)
        writer.writerow(("file", "label"))
        raise OSError("disk full")

    monkeypatch.setattr(csv, "writer", crashing_writer)
    with pytest.raises(OSError, match="disk full"):
        save_folder_labels(tmp_path, {"a.png": "monocyte", "b.png": "basophil"})
    assert load_folder_labels(tmp_path) == {"a.png": "neutrophil"}
    assert [p.name for p in tmp_path.iterdir()] == ["cell_labels.csv"]  # no partial file left


@pytest.fixture
def images_widget(make_napari_viewer):
    from napari_cytodiffusion._widgets._cell_images import CellImagesWidget

    viewer = make_napari_viewer()
    widget = CellImagesWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget._fields.device.value = "cpu"
    return viewer, widget


def test_widget_shows_the_cells_as_a_grid_called_and_flagged(
    images_widget, cell_folder, qtbot, tmp_path, monkeypatch
):
    from napari.utils.colormaps.standardize_color import transform_color

    from napari_cytodiffusion._widgets import _common
    from napari_cytodiffusion._widgets._classify import NOT_CELL_COLOUR, UNREVIEWED_ALPHA
    from napari_cytodiffusion.core.report import class_colours

    viewer, widget = images_widget
    widget._folder.value = cell_folder
    widget._run.native.click()
    qtbot.waitUntil(lambda: not widget._runner.running, timeout=120_000)

    assert [layer.name for layer in viewer.layers] == [
        "export cells",
        "export cells tiles",
        "export cells needs review",
    ]
    grid, tiles, review = viewer.layers
    assert grid.rgb and grid.data.shape[0] == 2 * 64 + 4  # 3 tiles in 2 rows of 2
    features = tiles.features
    assert list(features["label"]) == ["eosinophil", "lymphocyte", "neutrophil"]
    assert features["file"][0].endswith("a_eosinophil.jpg")
    # Each tile is outlined in its call's colour.
    expected = transform_color(class_colours(("eosinophil",))["eosinophil"])[0]
    expected[3] = UNREVIEWED_ALPHA  # opaque once a person has called it
    np.testing.assert_allclose(tiles.colormap.map(1), expected, atol=1e-6)
    flagged = int(features["needs_review"].sum())
    assert len(review.data) == flagged and widget._flagged.count() == flagged
    assert widget._summary.item(1, 0).text() == "eosinophil"
    assert widget._summary.item(1, 1).text() == "1"
    assert "3 images" in widget._status.value and "d_broken.png" in widget._status.value

    csv = tmp_path / "calls.csv"
    widget.export_csv(csv)
    lines = csv.read_text().splitlines()
    assert lines[0].startswith("index,file,label,predicted,annotated,p_basophil")
    assert len(lines) == 4

    # A person calls the lymphocyte a monocyte: saved in the folder at once, drawn opaque in
    # the monocyte colour, counted as a monocyte; "Model's call" takes it back.
    assert widget._review.value == "reviewed 0 of 3"
    widget.select(2)
    widget.set_label("monocyte")
    assert (features := tiles.features)["label"][1] == "monocyte"
    assert features["annotated"][1] == "monocyte" and features["predicted"][1] == "lymphocyte"
    saved = (cell_folder / "cell_labels.csv").read_text().splitlines()
    assert saved == ["file,label", "b_lymphocyte.jpg,monocyte"]
    monocyte = transform_color(class_colours(("monocyte",))["monocyte"])[0]
    np.testing.assert_allclose(tiles.colormap.map(2), monocyte, atol=1e-6)
    rows = {widget._summary.item(r, 0).text(): widget._summary.item(r, 1).text() for r in range(8)}
    assert rows["monocyte"] == "1" and rows["lymphocyte"] == "0"
    assert widget._review.value.startswith("reviewed 1 of 3")
    widget.set_label("")
    assert tiles.features["label"][1] == "lymphocyte"
    assert (cell_folder / "cell_labels.csv").read_text().splitlines() == ["file,label"]

    # Key 1 on the tiles layer gives the selected tile the first class.
    widget.select(3)
    (key_1,) = [f for k, f in tiles.keymap.items() if str(k) == "1"]
    key_1(tiles)
    assert tiles.features["annotated"][2] == "basophil"

    # Artefact: grey, out of the differential, saved; U takes it back, and then the basophil.
    widget.select(1)
    widget._artefact.native.click()
    assert tiles.features["label"][0] == "artefact"
    grey = transform_color(NOT_CELL_COLOUR)[0]
    np.testing.assert_allclose(tiles.colormap.map(1), grey, atol=1e-6)
    rows = {widget._summary.item(r, 0).text(): widget._summary.item(r, 1).text() for r in range(8)}
    assert rows["eosinophil"] == "0" and rows["basophil"] == "1"
    saved = (cell_folder / "cell_labels.csv").read_text().splitlines()
    assert saved == ["file,label", "a_eosinophil.jpg,artefact", "c_neutrophil.jpg,basophil"]
    (key_u,) = [f for k, f in tiles.keymap.items() if str(k) == "U"]
    key_u(tiles)
    assert tiles.features["label"][0] == "eosinophil"
    key_u(tiles)
    assert list(tiles.features["annotated"]) == ["", "", ""]
    assert (cell_folder / "cell_labels.csv").read_text().splitlines() == ["file,label"]
    assert widget._review.value.startswith("reviewed 0 of 3")

    # N centres and selects each tile to review in turn, then starts again.
    flagged = list(features.loc[features["needs_review"], "index"])
    tiles.selected_label = 0
    visited = []
    for _ in range(len(flagged) + 1):
        widget.next_flagged()
        visited.append(int(tiles.selected_label))
    if flagged:
        assert visited == [*flagged, flagged[0]]
    else:
        assert widget._review.value == "no flagged tile left to review"

    # New class: one the model lacks, in a colour of its own, counted and saved; artefact is
    # not a class name.
    errors = []
    monkeypatch.setattr(_common, "show_error", errors.append)
    widget.select(2)
    widget._new_class.value = "Blast"
    widget._set_new.native.click()
    assert tiles.features["label"][1] == "blast" and "blast" in widget._class.choices
    assert "blast" in widget._legend.value
    model_classes = widget._shown[1]
    blast = transform_color(class_colours((*model_classes, "blast"))["blast"])[0]
    np.testing.assert_allclose(tiles.colormap.map(2), blast, atol=1e-6)
    table = widget._summary
    rows = {table.item(r, 0).text(): table.item(r, 1).text() for r in range(table.rowCount())}
    assert rows["blast"] == "1" and rows["lymphocyte"] == "0"
    saved = (cell_folder / "cell_labels.csv").read_text().splitlines()
    assert saved == ["file,label", "b_lymphocyte.jpg,blast"]
    widget._new_class.value = "Artefact"
    widget._set_new.native.click()
    assert "Artefact button" in errors[-1] and tiles.features["label"][1] == "blast"


def _keys(layer):
    return {str(key) for key in layer.keymap}


def test_an_earlier_grid_no_longer_labels_the_newest(images_widget, cell_folder, qtbot):
    """Keys and clicks act on the grid shown last: an earlier grid's tiles, still in the
    viewer, must not give a class to a tile of the newest grid (and write it to its folder)."""
    viewer, widget = images_widget
    widget._folder.value = cell_folder
    for _ in range(2):
        widget._run.native.click()
        qtbot.waitUntil(lambda: not widget._runner.running, timeout=120_000)
    first, newest = viewer.layers["export cells tiles"], widget.tiles_layer
    assert newest is not first
    assert {"1", "N", "U"} <= _keys(newest)
    assert not {"1", "N", "U"} & _keys(first)
    assert len(first.mouse_drag_callbacks) < len(newest.mouse_drag_callbacks)


def test_widget_refuses_a_folder_without_images_and_adds_nothing(
    images_widget, tmp_path, monkeypatch
):
    from PIL import Image

    from napari_cytodiffusion._widgets import _cell_images

    errors = []
    monkeypatch.setattr(_cell_images, "show_error", errors.append)
    viewer, widget = images_widget
    widget._run.native.click()
    (tmp_path / "notes.txt").write_text("no images here")
    widget._folder.value = tmp_path
    widget._run.native.click()
    assert errors[0] == "Choose the folder of single-cell images to classify."
    assert "no image files" in errors[1]
    # A class-folder dataset: the message says where its images are.
    (tmp_path / "lymphocyte").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "lymphocyte" / "a.png")
    widget._run.native.click()
    assert errors[2].endswith("its subfolders lymphocyte hold images: choose one of them.")
    assert len(viewer.layers) == 0 and not widget._runner.running


def test_cancel_stops_the_folder_within_a_second_and_adds_no_layer(
    images_widget, cell_folder, qtbot, cancel_latency
):
    viewer, widget = images_widget
    widget._folder.value = cell_folder
    widget._strategy.value = "exhaustive"  # long enough to cancel midway
    widget._run.native.click()
    qtbot.waitUntil(lambda: widget._runner._state["done"] > 300, timeout=60_000)
    assert cancel_latency(widget) < 1.0
    assert widget.tiles_layer is None and widget._status.value == "cancelled"
    assert len(viewer.layers) == 0


def test_a_folder_unlike_the_training_smears_gets_a_banner_saying_what_to_do():
    from types import SimpleNamespace

    from napari_cytodiffusion.core.tasks.classify import CellImages

    def cells(*shifts):
        calls = [SimpleNamespace(domain_shift=shift) for shift in shifts]
        return CellImages([], calls, None, [], (), [], [], [])

    assert cells(0.4, float("nan"), 0.9).folder_warning() == ""
    text = cells(2.6, 2.6, 0.5).folder_warning()
    assert text.startswith("2 of 3 images are unlike the training smears")
    assert "adapt the model to this folder" in text
