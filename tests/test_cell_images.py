"""Classifying a folder of single-cell images: the task and the Classify cell images widget."""

import shutil

import numpy as np
import pandas as pd
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

    errors = []
    monkeypatch.setattr("napari.utils.notifications.show_error", errors.append)
    viewer, widget = images_widget
    widget._run.native.click()
    (tmp_path / "notes.txt").write_text("no images here")
    widget._folder.value = tmp_path
    widget._status.value = "done: 3 images, 1 to review"  # an earlier run's
    widget._run.native.click()
    assert errors[0] == "Choose the folder of single-cell images to classify."
    assert "no image files" in errors[1]
    assert widget._status.value == f"not started: {errors[1]}"
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


def _call(label, flagged):
    """The model's sure call ``label``, flagged as uncertain where ``flagged``."""
    from napari_cytodiffusion.core.classes import CLASSES
    from napari_cytodiffusion.core.model.classifier import CellCall

    probabilities = {name: float(name == label) for name in CLASSES}
    why = "uncertain" if flagged else ""
    return CellCall(label, probabilities, 0.5 * flagged, 0.0, flagged, 10, why=why)


def test_an_image_a_person_has_called_needs_no_more_review():
    """As ``classify --json`` says it: the table every face shows (the grid's features, its
    CSV, the count to review) does not flag an image a person has called."""
    from pathlib import Path

    from napari_cytodiffusion.core.classes import CLASSES
    from napari_cytodiffusion.core.tasks.classify import CellImages

    calls = [_call("neutrophil", True), _call("lymphocyte", True)]
    crops = np.zeros((2, 64, 64, 3), np.float32)
    paths = [Path("a.png"), Path("b.png")]
    images = CellImages(paths, calls, crops, [30.0] * 2, CLASSES, [], [""] * 2, ["monocyte", ""])
    table = images.table()
    assert list(table["needs_review"]) == [False, True]
    assert list(table["why"]) == ["", "uncertain"]
    assert list(table["label"]) == ["monocyte", "lymphocyte"]


def test_a_damaged_table_of_calls_is_refused_before_any_work(tmp_path):
    from napari_cytodiffusion.core.annotations import AnnotationError
    from napari_cytodiffusion.core.tasks.classify import classify_files

    (tmp_path / "cell_labels.csv").write_text("name,class\na.png,monocyte\n")
    files = classify_files([tmp_path / "a.png", tmp_path / "b.png"], model=None)
    with pytest.raises(AnnotationError) as refused:
        next(files)  # no image classified, no model used
    message = str(refused.value)
    assert message.startswith(f"{tmp_path / 'cell_labels.csv'} lacks the column(s)")
    assert message.endswith("fix it, or move it aside to classify without them.")


# The calls the stand-in for the task gives a folder's images in turn: (class, flagged).
FAKE_CALLS = (("eosinophil", False), ("lymphocyte", False), ("neutrophil", True))


@pytest.fixture
def fake_task(images_widget, monkeypatch):
    """The widget with a stand-in for classify_cell_images: each readable image gets the next
    of FAKE_CALLS, and the person's calls of its folder, as the task gives them. Returns the
    viewer, the widget and the paths of each run."""
    from types import SimpleNamespace

    from napari_cytodiffusion.core.annotations import load_folder_labels
    from napari_cytodiffusion.core.classes import CLASSES
    from napari_cytodiffusion.core.io import InputFileError, read_image
    from napari_cytodiffusion.core.tasks import classify

    runs = []

    def classify_cell_images(paths, model, **_):
        runs.append(list(paths))
        readable, failed = [], []
        for path in paths:
            try:
                read_image(path)
                readable.append(path)
            except InputFileError as error:
                failed.append((path, str(error)))
        calls = [_call(*FAKE_CALLS[i % len(FAKE_CALLS)]) for i in range(len(readable))]
        n = len(readable)
        return classify.CellImages(
            readable,
            calls,
            np.zeros((n, 64, 64, 3), np.float32),
            [30.0] * n,
            CLASSES,
            failed,
            [""] * n,
            [load_folder_labels(path.parent).get(path.name, "") for path in readable],
        )

    viewer, widget = images_widget
    model = SimpleNamespace(image_size=64, classes=CLASSES)
    monkeypatch.setattr(widget._fields, "choice", lambda: SimpleNamespace(load=lambda _: model))
    monkeypatch.setattr(classify, "classify_cell_images", classify_cell_images)
    return viewer, widget, runs


def _images(folder, *names):
    from PIL import Image

    folder.mkdir(exist_ok=True)
    for name in names:
        Image.new("RGB", (16, 16), (200, 150, 150)).save(folder / name)
    return folder


def _classify(widget, qtbot, folder):
    widget._folder.value = folder
    widget._run.native.click()
    qtbot.waitUntil(lambda: not widget._runner.running, timeout=60_000)


def test_widget_counts_only_images_nobody_has_called_to_review(fake_task, qtbot, tmp_path):
    from napari_cytodiffusion.core.annotations import save_folder_labels

    viewer, widget, _ = fake_task
    folder = _images(tmp_path / "cells", "a.png", "b.png", "c.png")
    save_folder_labels(folder, {"c.png": "monocyte"})  # the flagged one
    _classify(widget, qtbot, folder)
    assert widget._status.value == "done: 3 images, 0 to review"
    tiles, rings = widget.tiles_layer, viewer.layers["cells cells needs review"]
    assert not tiles.features["needs_review"].any() and len(rings.data) == 0
    widget.export_csv(tmp_path / "calls.csv")
    exported = pd.read_csv(tmp_path / "calls.csv", keep_default_na=False)
    assert list(exported.loc[2, ["needs_review", "why"]]) == [False, ""]

    # Model's call: the model's flag is back; a person's call takes it away again.
    widget.select(3)
    widget.set_label("")
    assert list(tiles.features.loc[2, ["needs_review", "why"]]) == [True, "uncertain"]
    assert len(rings.data) == 1 and widget._flagged.count() == 1
    widget.set_label("basophil")
    assert list(tiles.features.loc[2, ["needs_review", "why"]]) == [False, ""]
    assert len(rings.data) == 0 and widget._flagged.count() == 0
    # The grid's own table, what Counterfactuals reads of a tile, follows the calls.
    grid_table = widget._grid.metadata["features"]
    assert list(grid_table.iloc[2][["label", "annotated", "needs_review"]]) == [
        "basophil",
        "basophil",
        False,
    ]


def test_a_refused_or_empty_run_leaves_no_earlier_result_on_screen(
    fake_task, qtbot, tmp_path, monkeypatch
):
    errors = []
    monkeypatch.setattr("napari.utils.notifications.show_error", errors.append)
    viewer, widget, runs = fake_task
    _classify(widget, qtbot, _images(tmp_path / "cells", "a.png", "b.png", "c.png"))
    assert widget._export.enabled and widget._flagged.count() == 1

    # A damaged table of a person's calls: refused before any work, saying what to do.
    damaged = _images(tmp_path / "damaged", "a.png")
    (damaged / "cell_labels.csv").write_text("name,class\na.png,monocyte\n")
    _classify(widget, qtbot, damaged)
    assert len(runs) == 1 and widget._status.value == f"not started: {errors[-1]}"
    assert "cell_labels.csv lacks the column(s)" in errors[-1]
    assert errors[-1].endswith("fix it, or move it aside to classify without them.")

    # No image could be read: the earlier result is no longer listed, reviewed or exported.
    unreadable = tmp_path / "unreadable"
    unreadable.mkdir()
    (unreadable / "a.png").write_bytes(b"not an image")
    _classify(widget, qtbot, unreadable)
    assert widget._status.value.startswith("done: no image could be classified (a.png: ")
    assert widget._summary.rowCount() == 0 and widget._flagged.count() == 0
    assert not widget._export.enabled and not widget._set.enabled
    assert widget.tiles_layer is None
    tiles = viewer.layers["cells cells tiles"]
    assert not {"1", "N", "U"} & {str(key) for key in tiles.keymap}


def test_the_review_rings_go_with_their_grid(fake_task, qtbot, tmp_path):
    viewer, widget, _ = fake_task
    _classify(widget, qtbot, _images(tmp_path / "cells", "a.png", "b.png", "c.png"))
    assert [layer.name for layer in viewer.layers][-1] == "cells cells needs review"
    viewer.layers.remove("cells cells")
    assert len(viewer.layers) == 0


def test_an_image_named_twice_in_a_folder_counts_once(fake_task, qtbot, tmp_path):
    """A link to an image of the folder is that image: as the command line counts it."""
    _, widget, runs = fake_task
    folder = _images(tmp_path / "cells", "a.png", "b.png")
    (folder / "z_link.png").symlink_to(folder / "a.png")
    _classify(widget, qtbot, folder)
    assert [path.name for path in runs[-1]] == ["a.png", "b.png"]
    assert widget._status.value.startswith("done: 2 images")
