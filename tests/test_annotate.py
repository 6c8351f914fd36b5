"""Annotating: a person corrects the calls of a classes layer in the viewer, the corrections are
saved beside the image (atomically) and come back when the image is classified again, by the
widget and by ``classify`` / ``analyze``; reviewed cells export as a dataset ``train`` and
``adapt`` read."""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from napari_cytodiffusion.cli import main
from napari_cytodiffusion.core.annotations import (
    DELETED,
    UNKNOWN,
    Annotations,
    CellAnnotation,
    annotate_labels,
    annotations_from_table,
    begin_review,
    decode_mask,
    encode_mask,
    load_annotations,
    match_centres,
    merge_annotations,
    restorable_deletions,
    restore_deletions,
    save_annotations,
    sidecar_path,
)

SAMPLES = Path(__file__).resolve().parents[1] / "src" / "napari_cytodiffusion" / "sample_data"
CLASSES = ("lymphocyte", "monocyte", "neutrophil")


def _two_cells():
    labels = np.zeros((100, 120), np.uint32)
    labels[10:30, 10:30] = 1
    labels[50:70, 60:80] = 2
    return labels


def test_masks_survive_run_length_encoding():
    rng = np.random.default_rng(0)
    mask = np.zeros((40, 50), bool)
    mask[5:30, 8:44] = rng.random((25, 36)) > 0.4
    assert np.array_equal(decode_mask(encode_mask(mask), mask.shape), mask)


def test_annotations_apply_to_labels_by_position(tmp_path):
    painted = np.zeros((100, 120), bool)
    painted[80:95, 5:20] = True
    annotations = Annotations(
        "smear.png",
        (100, 120),
        [
            CellAnnotation((20.0, 20.0), "neutrophil", predicted="lymphocyte"),
            CellAnnotation((60.0, 70.0), DELETED, predicted="monocyte"),
            CellAnnotation((87.0, 12.0), "monocyte", added=True, mask=encode_mask(painted)),
        ],
    )
    labels, human, added = annotate_labels(_two_cells(), annotations)
    assert not (labels == 2).any()  # deleted
    assert human[1] == "neutrophil"
    (new,) = added
    assert human[new] == "monocyte" and np.array_equal(labels == new, painted)
    # Results without label images (analyze's tiles) match by centre.
    found = match_centres(np.array([[21.0, 19.0], [60.0, 71.0], [0.0, 119.0]]), annotations, 5)
    assert found == ["neutrophil", DELETED, None]
    with pytest.raises(ValueError, match="another image"):
        annotate_labels(np.zeros((10, 10), np.uint32), annotations)


def test_a_cell_beside_its_centroid_is_found_in_labels_of_any_integer_type():
    """A person's click just outside a cell's pixels still names that cell, whatever the
    labels' integer type (numpy cannot count uint64 values with bincount)."""
    for dtype in (np.uint8, np.int64, np.uint64):
        labels = _two_cells().astype(dtype)
        annotations = Annotations(
            "smear.png", (100, 120), [CellAnnotation((31.0, 20.0), "neutrophil")]
        )
        _, human, _ = annotate_labels(labels, annotations)
        assert human[1] == "neutrophil", dtype


def test_a_crash_while_saving_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    image = tmp_path / "smear.png"
    first = Annotations("smear.png", (100, 120), [CellAnnotation((20.0, 20.0), "monocyte")])
    save_annotations(first, image)
    before = sidecar_path(image).read_bytes()

    def crash(self, text, *args, **kwargs):
        with open(self, "w") as handle:
            handle.write(text[: len(text) // 2])  # half written, then the process dies
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", crash)
    second = Annotations("smear.png", (100, 120), [CellAnnotation((1.0, 1.0), "lymphocyte")])
    with pytest.raises(OSError):
        save_annotations(second, image)
    monkeypatch.undo()
    assert sidecar_path(image).read_bytes() == before
    assert load_annotations(image).cells[0].label == "monocyte"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smear.png.annotations.json"]


def test_a_damaged_sidecar_is_reported_not_used(tmp_path):
    image = tmp_path / "smear.png"
    sidecar_path(image).write_text("{not json")
    with pytest.raises(ValueError, match="move it away"):
        load_annotations(image)
    assert load_annotations(tmp_path / "other.png") is None


def test_labels_written_another_way_mean_the_class(tmp_path):
    """A hand-written or older sidecar's "Neutrophil", "IG" or "Deleted" is the class (or the
    deletion) it names, not a class of its own."""
    annotations = Annotations(
        "smear.png",
        (100, 120),
        [CellAnnotation((20.0, 20.0), " Neutrophil"), CellAnnotation((60.0, 70.0), "Deleted")],
    )
    labels, human, _ = annotate_labels(_two_cells(), annotations)
    assert human == {1: "neutrophil"} and not (labels == 2).any()
    centres = np.array([[20.0, 20.0], [60.0, 70.0]])
    assert match_centres(centres, annotations, 5) == ["neutrophil", DELETED]
    annotations.cells[0].label = "IG"
    save_annotations(annotations, tmp_path / "smear.png")
    loaded = load_annotations(tmp_path / "smear.png")
    assert [cell.label for cell in loaded.cells] == ["immature_granulocyte", DELETED]


def test_a_reloaded_tables_empty_cells_are_not_calls(tmp_path):
    """pandas reads an empty cell as NaN, which is neither a class "nan" nor a painted cell."""
    labels = _two_cells()
    table = pd.DataFrame(
        {
            "index": [1, 2],
            "label": ["lymphocyte", "monocyte"],
            "predicted": ["lymphocyte", "monocyte"],
            "annotated": ["Neutrophil", ""],
            "added": [None, False],
            "centroid_row": [19.5, 59.5],
            "centroid_col": [19.5, 69.5],
        }
    )
    table.to_csv(tmp_path / "cells.csv", index=False)
    reloaded = pd.read_csv(tmp_path / "cells.csv")
    (cell,) = annotations_from_table(reloaded, labels, "smear.png").cells
    assert (cell.label, cell.predicted, cell.added) == ("neutrophil", "lymphocyte", False)


def test_a_painted_cell_fits_labels_whose_type_is_full():
    labels = _two_cells().astype(np.uint16)
    labels[labels == 2] = np.iinfo(np.uint16).max
    painted = np.zeros(labels.shape, bool)
    painted[80:95, 5:20] = True
    cell = CellAnnotation((87.0, 12.0), "monocyte", added=True, mask=encode_mask(painted))
    out, human, (new,) = annotate_labels(labels, Annotations("smear.png", labels.shape, [cell]))
    assert new == 65536 and human[new] == "monocyte" and np.array_equal(out == new, painted)
    assert (out == 65535).sum() == (labels == 65535).sum()  # the other cells are kept


def test_a_save_stands_for_the_cells_the_layer_shows_even_once_deleted():
    """The layer's own rows replace the stored entries of its cells, a cell deleted in this
    session included (its pixels gone, its entry is still found); the rest is kept."""
    stored = Annotations(
        "smear.png",
        (100, 120),
        [
            CellAnnotation((20.0, 20.0), "neutrophil", "lymphocyte"),
            CellAnnotation((60.0, 70.0), "monocyte", "monocyte"),
            CellAnnotation((90.0, 110.0), DELETED, "lymphocyte"),  # left out of the layer
        ],
    )
    labels, _, _ = annotate_labels(_two_cells(), stored)
    table = pd.DataFrame(
        {
            "index": [1, 2],
            "label": ["neutrophil", "monocyte"],
            "predicted": ["lymphocyte", "monocyte"],
            "annotated": ["neutrophil", "monocyte"],
            "added": [False, False],
            "centroid_row": [19.5, 59.5],
            "centroid_col": [19.5, 69.5],
        }
    )
    review = begin_review(stored, table, labels)
    labels[labels == 1] = 0  # the person deletes cell 1
    table.loc[0, ["annotated", "label"]] = DELETED
    merged, _ = merge_annotations(stored, table, labels, "smear.png", review)
    assert [(c.label, c.centroid) for c in merged.cells] == [
        (DELETED, (90.0, 110.0)),
        (DELETED, (19.5, 19.5)),
        ("monocyte", (59.5, 69.5)),
    ]


def test_a_restored_deletion_is_saved_again_once_its_cell_is_gone():
    """A deletion restored as a cell of the layer is left out of the saves while the layer
    has that cell, reviewed or not, and saved again once the restore is undone."""
    deletion = CellAnnotation((59.5, 69.5), DELETED, "monocyte")
    stored = Annotations("smear.png", (100, 120), [deletion])
    labels, _, _ = annotate_labels(_two_cells(), stored)
    table = pd.DataFrame(
        {
            "index": [1],
            "label": ["lymphocyte"],
            "predicted": ["lymphocyte"],
            "annotated": [""],
            "added": [False],
            "centroid_row": [19.5],
            "centroid_col": [19.5],
        }
    )
    review = begin_review(stored, table, labels)
    assert restorable_deletions(review, table) == [deletion]
    review = restore_deletions(review, [deletion], 2)
    restored = pd.concat([table, table.assign(index=2, centroid_row=59.5, centroid_col=69.5)])
    merged, review = merge_annotations(stored, restored, _two_cells(), "smear.png", review)
    assert merged.cells == [] and restorable_deletions(review, restored) == []
    merged, _ = merge_annotations(merged, table, labels, "smear.png", review)  # undone
    assert merged.cells == [deletion]


# ---------------------------------------------------------------------------- the widget


@pytest.fixture
def annotating(make_napari_viewer, tmp_path):
    """A viewer with a smear, its classes layer (as Classify cells makes it) and the widget."""
    from PIL import Image

    from napari_cytodiffusion._widgets._annotate import AnnotateWidget

    path = tmp_path / "smear.png"
    pixels = np.empty((100, 120, 3), np.uint8)
    pixels[:] = (245, 230, 210)
    pixels[_two_cells() > 0] = (120, 70, 150)
    rows, cols = np.mgrid[:100, :120]
    for r, c in ((15, 70), (40, 30), (85, 95), (30, 105)):
        pixels[(rows - r) ** 2 + (cols - c) ** 2 < 81] = (215, 140, 140)
    Image.fromarray(pixels).save(path)
    from napari_cytodiffusion._widgets._common import layer_id

    viewer = make_napari_viewer()
    smear_id = layer_id(viewer.add_image(pixels, name="smear", rgb=True))
    features = pd.DataFrame(
        {
            "index": [1, 2],
            "label": ["lymphocyte", "monocyte"],
            "predicted": ["lymphocyte", "monocyte"],
            "annotated": ["", ""],
            "added": [False, False],
            "uncertainty": [0.5, 0.01],
            "anomaly_score": [0.0, 0.0],
            "needs_review": [True, False],
            "centroid_row": [19.5, 59.5],
            "centroid_col": [19.5, 69.5],
        }
    )
    layer = viewer.add_labels(
        _two_cells(),
        name="smear classes",
        features=features,
        metadata={
            "class": True,
            "classes": CLASSES,
            "image_size": 64,
            "rbc_diameter": 20.0,
            "source": "smear",
            "path": str(path),
            "image_id": smear_id,
            "shows": "classes",
        },
    )
    viewer.add_points(
        [[19.5, 19.5]],
        name="smear needs review",
        features={"index": [1], "label": ["lymphocyte"]},
        metadata={"image_id": smear_id, "shows": "needs review"},
    )  # Classify cells' markers of the cells to review, tied to the image as it ties them
    widget = AnnotateWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.reset_choices()
    widget._layer.value = layer
    return viewer, widget, layer, path


def _classified(viewer, path, labels, annotations=None):
    """A classes layer of the smear at ``path`` as Classify cells makes it: ``labels`` with
    ``annotations`` applied (deleted cells left out, painted ones added, reviewed ones
    called), the model calling every cell a lymphocyte."""
    from scipy import ndimage as ndi

    human, added = {}, set()
    if annotations is not None:
        labels, human, added = annotate_labels(labels, annotations)
    cells = [int(v) for v in np.unique(labels) if v]
    centres = np.array(ndi.center_of_mass(labels > 0, labels, cells)).reshape(-1, 2)
    features = pd.DataFrame(
        {
            "index": cells,
            "label": [human.get(v, "lymphocyte") for v in cells],
            "predicted": "lymphocyte",
            "annotated": [human.get(v, "") for v in cells],
            "added": [v in added for v in cells],
            "needs_review": False,
            "centroid_row": centres[:, 0],
            "centroid_col": centres[:, 1],
        }
    )
    metadata = {"class": True, "classes": CLASSES, "image_size": 64, "rbc_diameter": 20.0}
    metadata.update(source="smear", path=str(path))
    return viewer.add_labels(
        labels, name="smear classes [again]", features=features, metadata=metadata
    )


def _press(layer, key):
    (callback,) = [f for k, f in layer.keymap.items() if str(k).lower() == key]
    callback(layer)


def _click(layer, position):
    """A click (pan/zoom mode) at ``position``, in the layer's pixels as in the world."""
    from napari.utils._proxies import ReadOnlyWrapper
    from napari.utils.events import Event
    from napari.utils.interactions import mouse_press_callbacks

    event = Event(
        type_name="mouse_press",
        is_dragging=False,
        modifiers=[],
        position=position,
        view_direction=None,
        dims_displayed=[0, 1],
        button=1,
    )
    mouse_press_callbacks(layer, ReadOnlyWrapper(event, exceptions=("handled",)))


def test_review_correct_delete_paint_undo_and_save(annotating):
    from napari_cytodiffusion._widgets._common import camera

    viewer, widget, layer, path = annotating
    assert widget._counter.value == "0 of 2 cells reviewed; 1 flagged left"

    _press(layer, "n")  # the next flagged cell nobody reviewed
    assert layer.selected_label == 1
    assert tuple(camera(viewer).center[1:]) == pytest.approx((19.5, 19.5))
    _press(layer, "3")  # the third class
    assert layer.features.loc[0, ["annotated", "predicted"]].tolist() == [
        "neutrophil",
        "lymphocyte",
    ]
    assert not layer.features.loc[0, "needs_review"]
    assert widget._counter.value == "1 of 2 cells reviewed; 0 flagged left"
    ring = viewer.layers["smear needs review"].border_color[0]
    assert ring[3] == 0  # reviewed: no longer ringed
    saved = load_annotations(path)
    assert [(c.label, c.predicted) for c in saved.cells] == [("neutrophil", "lymphocyte")]

    widget.select(2)
    widget.delete_cell()
    assert not (layer.data == 2).any()
    assert {c.label for c in load_annotations(path).cells} == {"neutrophil", DELETED}
    _press(layer, "u")
    assert (layer.data == 2).sum() == 400
    assert [c.label for c in load_annotations(path).cells] == ["neutrophil"]

    widget.start_painting()
    assert layer.mode == "paint" and layer.selected_label == 3
    layer.data[80:95, 5:20] = 3
    widget._class.value = "monocyte"
    widget.add_painted_cell()
    assert layer.mode == "pan_zoom"
    row = layer.features.iloc[-1]
    assert (row["index"], row["annotated"], bool(row["added"])) == (3, "monocyte", True)
    (painted,) = [c for c in load_annotations(path).cells if c.added]
    assert decode_mask(painted.mask, (100, 120)).sum() == 225
    assert "reviewed" in " ".join(layer.name for layer in viewer.layers)

    # Reopened: the saved review applied to a fresh segmentation gives the same cells.
    labels, human, added = annotate_labels(_two_cells(), load_annotations(path))
    assert human == {1: "neutrophil", 3: "monocyte"} and added == {3}
    assert np.array_equal(labels, layer.data)


def test_a_renamed_classes_layer_keeps_its_markers_and_itself(annotating):
    """Markers are found by what they record, not by a name made from the classes layer's:
    renamed, that name would be the classes layer's own."""
    viewer, widget, layer, _ = annotating
    layer.name = "patient 7"
    widget.select(1)
    widget._class.value = "neutrophil"
    widget.set_label("neutrophil")
    assert viewer.layers["patient 7"] is layer and layer.data.any()
    assert viewer.layers["smear needs review"].border_color[0][3] == 0
    (reviewed,) = [x for x in viewer.layers if x.metadata.get("shows") == "reviewed"]
    assert len(reviewed.data) == 1


def test_cells_replaced_by_classify_begin_the_review_afresh(annotating):
    """Classify cells, run again, updates the classes layer in place: Undo cannot take back
    an edit of cells that are gone, and the counter counts the new cells."""
    viewer, widget, layer, _ = annotating
    widget.select(1)
    widget.set_label("neutrophil")
    assert widget._undo
    features = layer.features.iloc[:1].copy()
    features.loc[0, ["label", "annotated", "needs_review"]] = ["monocyte", "", True]
    labels = np.zeros_like(layer.data)
    labels[10:30, 10:30] = 1
    layer.features = features
    layer.data = labels  # as Classify cells sets them: the features first
    assert not widget._undo
    assert widget._counter.value == "0 of 1 cells reviewed; 1 flagged left"


def test_a_later_session_keeps_the_cells_deleted_and_painted_before(annotating):
    """Classify cells leaves a deleted cell out of its layer: reviewing that layer in a later
    session keeps the deletion, and replaces the painted cell's entry without losing its mask."""
    viewer, widget, layer, path = annotating
    widget.select(2)
    widget.delete_cell()
    widget.start_painting()
    layer.data[80:95, 5:20] = 3
    widget._class.value = "monocyte"
    widget.add_painted_cell()
    # Reopened and classified again.
    again = _classified(viewer, path, _two_cells(), load_annotations(path))
    assert list(again.features["index"]) == [1, 3]
    widget.reset_choices()
    widget._layer.value = again
    widget.select(1)
    widget.set_label(UNKNOWN)
    widget.select(3)
    widget.set_label("lymphocyte")
    saved = load_annotations(path)
    assert sorted((c.label, c.added) for c in saved.cells) == [
        (DELETED, False),
        ("lymphocyte", True),
        (UNKNOWN, False),
    ]
    labels, human, _ = annotate_labels(_two_cells(), saved)
    assert human == {1: UNKNOWN, 3: "lymphocyte"} and np.array_equal(labels, again.data)
    _press(again, "u")
    _press(again, "u")  # back to the review as it was loaded
    assert sorted((c.label, c.added) for c in load_annotations(path).cells) == [
        (DELETED, False),
        ("monocyte", True),
    ]


def test_a_single_cell_review_of_a_smear_keeps_the_smears_review(annotating):
    """Classified as a single-cell image, the smear shows one cell (a disc about its central
    cell): calling it replaces that cell's entry alone, and undoing brings the earlier back."""
    viewer, widget, _, path = annotating
    painted = np.zeros((100, 120), bool)
    painted[80:95, 5:20] = True
    smear_review = [
        CellAnnotation((19.5, 19.5), "neutrophil", "lymphocyte"),
        CellAnnotation((59.5, 69.5), DELETED, "monocyte"),
        CellAnnotation((87.0, 12.0), "monocyte", added=True, mask=encode_mask(painted)),
    ]
    save_annotations(Annotations(path.name, (100, 120), smear_review), path)
    rows, cols = np.ogrid[:100, :120]
    disc = ((rows - 20) ** 2 + (cols - 20) ** 2 <= 18**2).astype(np.uint32)
    single = _classified(viewer, path, disc)
    widget.reset_choices()
    widget._layer.value = single
    widget.select(1)
    widget.set_label("lymphocyte")
    saved = load_annotations(path).cells
    assert sorted(c.label for c in saved) == [DELETED, "lymphocyte", "monocyte"]
    assert [c.mask for c in saved if c.added] == [encode_mask(painted)]
    _press(single, "u")
    assert load_annotations(path).cells == smear_review


def test_a_cell_deleted_in_an_earlier_session_is_restored_where_clicked(annotating):
    """Classify cells leaves a deleted cell out of its layer: clicking its place and pressing
    Restore deleted brings it back with its outline, drops its deletions from the sidecar
    (an older one without an outline too) so that classify keeps it, and Undo deletes it
    again."""
    viewer, widget, layer, path = annotating
    widget.select(2)
    widget.delete_cell()
    (deleted,) = load_annotations(path).cells
    assert np.array_equal(decode_mask(deleted.mask, (100, 120)), _two_cells() == 2)
    saved = load_annotations(path)
    saved.cells.append(CellAnnotation((60.0, 70.0), DELETED, "monocyte"))  # an older save's
    save_annotations(saved, path)
    again = _classified(viewer, path, _two_cells(), load_annotations(path))
    widget.reset_choices()
    widget._layer.value = again
    _click(again, (64.0, 75.0))  # an empty place, on the deleted cell
    assert widget._status.value.startswith("a cell deleted here (model: monocyte)")
    widget._restore.native.click()
    assert again.selected_label == 2
    assert np.array_equal(again.data, _two_cells())
    row = again.features.iloc[-1]
    assert (row["index"], row["label"], row["predicted"], row["annotated"]) == (
        2,
        "monocyte",
        "monocyte",
        "",
    )
    assert widget._counter.value == "0 of 2 cells reviewed; 0 flagged left"
    assert load_annotations(path).cells == []
    labels, _, _ = annotate_labels(_two_cells(), load_annotations(path))
    assert np.array_equal(labels, _two_cells())  # classify keeps it
    _press(again, "u")
    assert not (again.data == 2).any() and list(again.features["index"]) == [1]
    assert [c.label for c in load_annotations(path).cells] == [DELETED, DELETED]
    widget.restore_deleted((59.5, 69.5))  # a restore undone keeps its value: a new one
    assert again.selected_label == 3 and (again.data == 3).sum() == 400
    assert load_annotations(path).cells == []


def test_a_cell_deleted_in_this_session_comes_back_as_it_was_called(annotating):
    """A cell a person called in an earlier session and deleted in this one, changes ago
    (Undo would take those back too), comes back with that call."""
    viewer, widget, _, path = annotating
    widget.select(1)
    widget.set_label("neutrophil")
    again = _classified(viewer, path, _two_cells(), load_annotations(path))
    widget.reset_choices()
    widget._layer.value = again
    widget.select(1)
    widget.delete_cell()
    widget.select(2)
    widget.set_label("monocyte")
    _click(again, (19.5, 19.5))
    widget.restore_deleted()
    assert np.array_equal(again.data, _two_cells())
    assert again.features.loc[0, ["annotated", "label"]].tolist() == ["neutrophil"] * 2
    assert sorted(c.label for c in load_annotations(path).cells) == ["monocyte", "neutrophil"]
    _press(again, "u")
    assert not (again.data == 1).any()
    assert sorted(c.label for c in load_annotations(path).cells) == [DELETED, "monocyte"]


def test_a_deletion_saved_without_its_outline_is_restored_for_the_next_run(annotating):
    """A deletion saved before outlines were kept (or written by hand) is restored without
    pixels: the layer gets its row back, and the sidecar loses the deletion, so the next
    classification segments the cell again."""
    viewer, widget, _, path = annotating
    cells = [CellAnnotation((59.5, 69.5), DELETED, "monocyte")]
    save_annotations(Annotations(path.name, (100, 120), cells), path)
    again = _classified(viewer, path, _two_cells(), load_annotations(path))
    widget.reset_choices()
    widget._layer.value = again
    widget.restore_deleted((59.5, 69.5))
    assert list(again.features["index"]) == [1, 2] and not (again.data == 2).any()
    assert load_annotations(path).cells == []
    labels, _, _ = annotate_labels(_two_cells(), load_annotations(path))
    assert np.array_equal(labels, _two_cells())


def test_restoring_where_no_cell_was_deleted_says_what_to_do(annotating, monkeypatch):
    from napari_cytodiffusion._widgets import _annotate

    errors = []
    monkeypatch.setattr(_annotate, "show_error", errors.append)
    _, widget, layer, path = annotating
    widget.restore_deleted()  # nothing clicked yet
    widget.select(2)
    widget.delete_cell()
    _click(layer, (5.0, 115.0))  # empty, but far from the deleted cell
    widget.restore_deleted()
    assert len(errors) == 2 and all(
        "click the place where the deleted cell was" in e for e in errors
    )
    assert not (layer.data == 2).any()
    assert [c.label for c in load_annotations(path).cells] == [DELETED]


def test_a_removed_layers_review_is_dropped(annotating):
    viewer, widget, layer, _ = annotating
    widget.select(1)
    widget.set_label("neutrophil")
    assert layer.unique_id in widget._reviews
    viewer.layers.remove(layer)
    assert widget._reviews == {}


def test_a_damaged_sidecar_is_not_written_over(annotating, monkeypatch):
    """A sidecar that cannot be read (a hand edit half done) is reported, never replaced."""
    from napari_cytodiffusion._widgets import _annotate

    errors = []
    monkeypatch.setattr(_annotate, "show_error", errors.append)
    _, widget, _, path = annotating
    sidecar_path(path).write_text('{"format": "napari-cytodiffusion annotations", "cells": [')
    widget.select(1)
    widget.set_label("neutrophil")
    assert widget._status.value.endswith("NOT saved") and "move it away" in errors[0]
    assert sidecar_path(path).read_text().endswith('"cells": [')


def test_a_change_whose_save_failed_is_saved_with_the_next(annotating, monkeypatch):
    """An undo whose save failed (a full disk) still counts: the next save leaves out the
    call it took back."""
    from napari_cytodiffusion._widgets import _annotate
    from napari_cytodiffusion.core import annotations

    monkeypatch.setattr(_annotate, "show_error", lambda message: None)
    _, widget, layer, path = annotating
    widget.select(1)
    widget.set_label("neutrophil")
    with monkeypatch.context() as failing:
        failing.setattr(annotations, "save_annotations", _no_space)
        _press(layer, "u")
    assert widget._status.value.endswith("NOT saved")
    assert [c.label for c in load_annotations(path).cells] == ["neutrophil"]
    widget.select(2)
    widget.set_label("monocyte")
    assert [c.label for c in load_annotations(path).cells] == ["monocyte"]


def _no_space(*args):
    raise OSError(28, "No space left on device")


def test_keys_and_clicks_follow_the_chosen_classes_layer(annotating):
    """Choosing another classes layer takes the keys and clicks off the first one, so that a
    key pressed on it does not change a cell of the layer chosen now."""
    viewer, widget, first, _ = annotating
    second = viewer.add_labels(
        np.asarray(first.data).copy(),
        name="smear classes [1]",
        features=first.features.copy(),
        metadata=dict(first.metadata),
    )
    napari_own = list(second.mouse_drag_callbacks)
    widget.reset_choices()
    widget._layer.value = second
    assert not {"1", "2", "3", "N", "U"} & {str(key) for key in first.keymap}
    assert len(first.mouse_drag_callbacks) == len(napari_own)  # the widget's clicks are off
    widget.select(2)
    _press(second, "1")
    assert second.features.loc[1, "annotated"] == "lymphocyte"
    assert list(first.features["annotated"]) == ["", ""]


def test_unbinding_keeps_a_key_someone_else_bound_since(make_napari_viewer):
    from types import SimpleNamespace

    from napari_cytodiffusion._widgets._common import bind_labelling

    layer = make_napari_viewer().add_labels(_two_cells())
    napari_own = list(layer.mouse_drag_callbacks)
    actions = SimpleNamespace(select=print, set_label=print, next_flagged=print, undo=print)
    unbind = bind_labelling(layer, CLASSES, actions)
    assert {"1", "2", "3", "N", "U"} <= {str(key) for key in layer.keymap}

    def theirs(_layer):
        return None

    layer.bind_key("2", theirs, overwrite=True)
    unbind()
    assert {str(key): f for key, f in layer.keymap.items()} == {"2": theirs}
    assert layer.mouse_drag_callbacks == napari_own


def test_actions_without_a_cell_say_what_to_do(annotating, monkeypatch):
    from napari_cytodiffusion._widgets import _annotate

    errors = []
    monkeypatch.setattr(_annotate, "show_error", errors.append)
    _, widget, layer, path = annotating
    layer.selected_label = 7  # no such cell
    widget.set_label("monocyte")
    widget.add_painted_cell()
    assert len(errors) == 2 and "Select a cell" in errors[0] and "Paint a new cell" in errors[1]
    assert not sidecar_path(path).exists()


def test_export_writes_the_reviewed_cells_as_a_dataset(annotating, tmp_path, qtbot):
    from PIL import Image

    from napari_cytodiffusion.core.datasets import list_labelled_images

    viewer, widget, layer, _ = annotating
    widget.select(1)
    widget.set_label("neutrophil")
    widget.select(2)
    widget.set_label("monocyte")
    # The cells come from the image they were classified in, whatever the names say now.
    viewer.layers["smear"].name = "field"
    viewer.add_image(np.zeros((100, 120, 3), np.uint8), name="smear", rgb=True)
    out = tmp_path / "dataset"
    assert widget.export(out) is not None  # in a worker: the viewer stays responsive
    qtbot.waitUntil(lambda: not widget._export_runner.running, timeout=30_000)
    assert "exported 2 cells" in widget._export_status.value
    assert "monocyte 1, neutrophil 1" in widget._export_status.value
    records = list_labelled_images(out, classes=CLASSES)
    assert sorted(r.label for r in records) == ["monocyte", "neutrophil"]
    assert all(r.rbc_diameter == pytest.approx(64 / 2.5, abs=0.01) for r in records)
    manifest = (out / "manifest.csv").read_text().splitlines()
    assert manifest[0].startswith("file,label,source_image,cell") and len(manifest) == 3
    # The smear's full path: smears of one name in two folders stay apart.
    path = annotating[3]
    assert all(f",{path.resolve()}," in row for row in manifest[1:])
    assert all(np.asarray(Image.open(r.path)).mean() > 100 for r in records)  # not the black one
    viewer.layers.remove("field")  # its image closed, the export says so
    errors = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("napari_cytodiffusion._widgets._annotate.show_error", errors.append)
        assert widget.export(tmp_path / "again") is None
    assert "no longer open" in errors[0]


def test_a_class_the_model_lacks_is_set_saved_and_exported(annotating, tmp_path, qtbot):
    from napari_cytodiffusion.core.datasets import list_labelled_images, unknown_classes

    _, widget, layer, path = annotating
    widget.select(1)
    widget.set_label("neutrophil")
    widget.select(2)
    widget._new_class.value = "Smudge cell"
    widget._set_new.native.click()
    assert layer.features.loc[1, "annotated"] == "smudge_cell"
    assert "smudge_cell" in widget._class.choices  # offered from now on
    assert {c.label for c in load_annotations(path).cells} == {"neutrophil", "smudge_cell"}
    out = tmp_path / "dataset"
    widget.export(out)
    qtbot.waitUntil(lambda: not widget._export_runner.running, timeout=30_000)
    # A dataset with a new class: adapt --add-classes learns it; train names it and leaves
    # it out.
    assert unknown_classes(out, CLASSES) == ["smudge_cell"]
    assert [r.label for r in list_labelled_images(out, classes=CLASSES)] == ["neutrophil"]
    _press(layer, "u")
    assert "smudge_cell" not in widget._class.choices


def test_a_cancelled_export_writes_nothing(annotating, tmp_path):
    from napari_cytodiffusion.core.annotations import export_cells
    from napari_cytodiffusion.core.progress import Cancelled

    _, widget, layer, _ = annotating
    widget.select(1)
    widget.set_label("neutrophil")

    def cancel(done, total):
        raise Cancelled()

    out = tmp_path / "dataset"
    with pytest.raises(Cancelled):
        export_cells(widget._image().data, layer.data, layer.features, out, 64, progress=cancel)
    assert not out.exists()


# ------------------------------------------------------------------ the command line


def test_classify_and_export_keep_the_persons_labels(tmp_path, capsys):
    image = tmp_path / "smear.jpg"
    shutil.copy(SAMPLES / "cbc_lymphocyte.jpg", image)
    assert main(["classify", "--segment", str(image), "--json", "--device", "cpu"]) == 0
    calls = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    first = calls[0]
    other = "monocyte" if first["label"] != "monocyte" else "neutrophil"

    from napari_cytodiffusion.core.io import read_image
    from napari_cytodiffusion.core.smear.prepare import prepare_smear
    from napari_cytodiffusion.core.smear.segmentation import segment_smear

    # Nothing annotated yet: exporting says what to do first and writes nothing.
    out = tmp_path / "dataset"
    assert main(["export-cells", str(image), "--out", str(out)]) == 2
    assert "annotate them with the Annotate cells widget" in capsys.readouterr().err
    assert not out.exists()

    pixels = read_image(image)
    white = segment_smear(prepare_smear(pixels)).table("wbc").iloc[0]
    save_annotations(
        Annotations(
            image.name,
            pixels.shape[:2],
            [CellAnnotation((white.centroid_row, white.centroid_col), other, first["label"])],
        ),
        image,
    )
    assert main(["classify", "--segment", str(image), "--json", "--device", "cpu"]) == 0
    again = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert (again[0]["label"], again[0]["predicted"], again[0]["annotated"]) == (
        other,
        first["label"],
        other,
    )
    assert (again[0]["needs_review"], again[0]["why"]) == (False, "")  # reviewed by a person
    assert main(["classify", "--segment", str(image), "--json", "--ignore-annotations"]) == 0
    ignored = json.loads(capsys.readouterr().out.splitlines()[0])
    assert (ignored["label"], ignored["annotated"]) == (first["label"], "")
    # Every record has the same keys, reviewed or not, and says where its cell is.
    assert set(ignored) == set(again[0]) == set(first)
    centre = (again[0]["centroid_row"], again[0]["centroid_col"])
    assert centre == pytest.approx((white.centroid_row, white.centroid_col), abs=1.0)

    assert main(["export-cells", str(image), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip().startswith(f"1 cells in {out}: {other} 1")
    (crop,) = (out / other).glob("*.png")
    from PIL import Image

    assert Image.open(crop).size == (128, 128)


def test_an_edit_maps_no_colours_on_the_main_thread(annotating, colour_mapping):
    """Each edit gives the classes layer a new colour map; napari would map all 65,536 values
    of 16-bit labels to colours in a Python loop for it (0.03-0.05 s). The map comes with its
    table filled."""
    viewer, widget, layer, _ = annotating
    layer.data = layer.data.astype(np.uint16)  # segmentation's labels are 16-bit
    colour_mapping.clear()
    widget.select(1)
    widget.set_label("neutrophil")
    viewer.window._qt_viewer.canvas._scene_canvas.render()
    assert colour_mapping == []
    assert np.allclose(layer.colormap.map(np.uint16(1)), layer.colormap.color_dict[1])


def test_counterfactual_numbers_cells_and_takes_the_persons_label_as_classify_does(
    tmp_path, capsys
):
    from napari_cytodiffusion.core.io import read_image
    from napari_cytodiffusion.core.smear.prepare import prepare_smear
    from napari_cytodiffusion.core.smear.segmentation import segment_smear

    image = tmp_path / "smear.jpg"
    shutil.copy(SAMPLES / "cbc_monocyte_eosinophil.jpg", image)
    pixels = read_image(image)
    first, second = segment_smear(prepare_smear(pixels)).table("wbc").iloc[:2].itertuples()
    # The first white cell deleted, the second called monocyte by a person: classify's cell 2.
    cells = [
        CellAnnotation((first.centroid_row, first.centroid_col), "deleted", ""),
        CellAnnotation((second.centroid_row, second.centroid_col), "monocyte", ""),
    ]
    save_annotations(Annotations(image.name, pixels.shape[:2], cells), image)
    argv = ["counterfactual", str(image), "--segment", "--target", "lymphocyte", "--device", "cpu"]
    argv += ["--trials", "1", "--steps", "1"]
    assert main([*argv, "--cell-id", "2", "--out", str(tmp_path / "a")]) == 0
    assert "monocyte -> lymphocyte (monocyte: a person's label" in capsys.readouterr().out
    assert main([*argv, "--cell-id", "1", "--out", str(tmp_path / "b")]) == 2
    assert "No cell with label 1" in capsys.readouterr().err  # deleted by the person
    ignoring = [*argv, "--cell-id", "1", "--out", str(tmp_path / "c"), "--ignore-annotations"]
    assert main(ignoring) == 0
    assert "the classifier's call" in capsys.readouterr().out
