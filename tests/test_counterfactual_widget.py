"""The "Counterfactuals" widget: click a cell, get maps placed over it; grids as figures."""

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from napari_cytodiffusion._widgets._counterfactual import CounterfactualWidget, FigureDock
from napari_cytodiffusion.core.model.generation import generate_cells
from napari_cytodiffusion.core.smear.crops import REFERENCE_BACKGROUND, crop_placement

PIXEL = 0.5  # world units per image pixel, to check that layer scales compose
RBC = 51.2  # red-cell diameter in image pixels: 2 image pixels per crop pixel


@pytest.fixture(scope="module")
def cells(default_model):
    return generate_cells(default_model, ["neutrophil", "lymphocyte"], steps=3, seed=5).images


def _smear(cell):
    """A 'smear' holding one cell, twice the model's scale, and its labels (cell id 5)."""
    image = np.broadcast_to(REFERENCE_BACKGROUND, (200, 240, 3)).copy()
    image[40:168, 60:188] = cell.repeat(2, axis=0).repeat(2, axis=1)
    rows, cols = np.ogrid[:200, :240]
    labels = (((rows - 104) ** 2 + (cols - 124) ** 2) < 30**2).astype(np.uint16) * 5
    return image, labels


def _widget(make_napari_viewer, **values):
    viewer = make_napari_viewer()
    widget = CounterfactualWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget._trials.value = 4
    widget._device.value = "cpu"
    for name, value in values.items():
        getattr(widget, f"_{name}").value = value
    return viewer, widget


def test_click_a_cell_and_get_maps_over_it(make_napari_viewer, qtbot, cells):
    image, labels = _smear(cells[0])
    viewer, widget = _widget(make_napari_viewer, rbc_diameter=RBC, target="eosinophil")
    viewer.add_image(image, name="smear", scale=(PIXEL, PIXEL), translate=(10, 20))
    labels_layer = viewer.add_labels(labels, name="cells", scale=(PIXEL, PIXEL), translate=(10, 20))
    widget._image.value = viewer.layers["smear"]
    widget._labels.value = labels_layer
    click = SimpleNamespace(
        position=(10 + 104 * PIXEL, 20 + 124 * PIXEL), view_direction=None, dims_displayed=[0, 1]
    )
    for callback in labels_layer.mouse_drag_callbacks:
        callback(labels_layer, click)
    assert widget._cell_id.value == 5

    widget._explain.native.click()
    qtbot.waitUntil(lambda: len(viewer.layers) == 4, timeout=60_000)
    qtbot.waitUntil(lambda: not widget._runner.running, timeout=10_000)
    edited, heat = viewer.layers[2], viewer.layers[3]
    assert edited.name.startswith("counterfactual cell 5") and edited.name.endswith("-> eosinophil")
    assert heat.name.startswith("heat map cell 5") and heat.data.shape == (64, 64)
    assert edited.rgb and edited.data.shape == (64, 64, 3)
    (row0, col0), step = crop_placement(heat.metadata["centre"], RBC, 64)
    assert heat.metadata["centre"] == (pytest.approx(104, abs=0.5), pytest.approx(124, abs=0.5))
    for layer in (edited, heat):
        np.testing.assert_allclose(layer.scale, [PIXEL * step] * 2)
        np.testing.assert_allclose(layer.translate, [10 + PIXEL * row0, 20 + PIXEL * col0])
    # The crop's centre pixel lands on the cell's centre in world coordinates.
    centre_world = np.asarray(heat.translate) + np.asarray(heat.scale) * 31.5
    np.testing.assert_allclose(centre_world, [10 + 104 * PIXEL, 20 + 124 * PIXEL], atol=0.5 * PIXEL)
    assert heat.metadata["target"] == "eosinophil" and set(heat.metadata["errors"]) >= {"monocyte"}


def test_the_images_own_cells_are_chosen_and_only_they_are_offered(make_napari_viewer):
    """Opened after Segment and Classify cells: the smear's classes layer (its calls are the
    cells' classes), else its white cells; never red cells, another image's labels or a map.
    The layers are the smear's by its id, whatever either is renamed to."""
    from napari_cytodiffusion._widgets._common import layer_id

    viewer = make_napari_viewer()
    smear = viewer.add_image(np.zeros((40, 50, 3), np.uint8), name="smear", rgb=True)
    viewer.add_image(np.zeros((40, 50)), name="smear uncertainty")
    shape, mine = (40, 50), {"source": "smear", "image_id": layer_id(smear)}
    viewer.add_labels(np.zeros(shape, np.uint16), name="red", metadata={**mine, "cells": "red"})
    white = viewer.add_labels(
        np.zeros(shape, np.uint16), name="white", metadata={**mine, "cells": "white"}
    )
    viewer.add_labels(np.zeros((30, 30), np.uint16), name="another image's cells")
    smear.name, white.name = "renamed smear", "renamed cells"
    widget = CounterfactualWidget(viewer)
    assert widget._image.choices == (smear,)
    assert set(widget._labels.choices) == {None, white}
    assert widget._labels.value is white
    classes = viewer.add_labels(
        np.zeros(shape, np.uint16), name="classes", metadata={**mine, "class": True}
    )
    assert widget._labels.value is classes
    # Another image opened under the smear's first name lends it none of them.
    other = viewer.add_image(np.zeros((40, 50, 3), np.uint8), name="smear", rgb=True)
    widget._image.value = other
    assert widget._labels.value is None
    widget._image.value = smear
    assert widget._labels.value is classes
    widget._labels.value = white  # a person's choice stands when another layer is added
    drawn = viewer.add_labels(np.zeros(shape, np.uint16), name="drawn by hand")
    assert widget._labels.value is white and drawn in widget._labels.choices


def test_a_grid_gets_its_own_tiles_when_two_grids_have_one_size(make_napari_viewer, cells):
    from napari_cytodiffusion._widgets._grid import add_grid, add_tiles, tile

    viewer = make_napari_viewer()
    features = pd.DataFrame({"index": [0, 1], "label": ["neutrophil", "lymphocyte"]})
    tiled = tile(cells)
    grids = {}
    for name in ("first", "second"):
        grid = add_grid(viewer, tiled, name, features)
        grids[name] = (grid, add_tiles(viewer, grid, tiled, features))
    grids["first"][0].name = "renamed"  # the grid's tiles stay its own
    widget = CounterfactualWidget(viewer)
    for grid, tiles in grids.values():
        widget._image.value = grid
        assert widget._labels.value is tiles


def test_a_missing_cell_is_explained_before_any_work(make_napari_viewer, cells, monkeypatch):
    errors = []
    monkeypatch.setattr("napari.utils.notifications.show_error", errors.append)
    image, labels = _smear(cells[0])
    viewer, widget = _widget(make_napari_viewer)
    widget._image.value = viewer.add_image(image)
    labels_layer = viewer.add_labels(labels)
    widget._labels.value = labels_layer
    labels_layer.selected_label = 5  # the cell id follows the layer's selected cell
    assert widget._cell_id.value == 5
    for cell_id in (9, 0):
        widget._status.value = "done: cell 5 neutrophil -> monocyte"  # an earlier run's
        widget._cell_id.value = cell_id
        widget._explain.native.click()
        assert not widget._runner.running and f"No cell {cell_id}" in errors[-1]
        assert widget._status.value.startswith(f"not started: No cell {cell_id}")
    assert viewer.add_labels(labels[:100]) not in widget._labels.choices  # another image's


def test_grid_of_a_stack_of_cells_as_a_figure(make_napari_viewer, qtbot, cells, tmp_path):
    viewer, widget = _widget(make_napari_viewer, trials=2)
    # A row past the stack's planes (of a cell deleted since) names no cell: passed over.
    features = pd.DataFrame({"index": [0, 1, 7], "label": ["neutrophil", "lymphocyte", "monocyte"]})
    widget._image.value = viewer.add_image(cells, rgb=True, metadata={"features": features})
    widget._grid.native.click()
    qtbot.waitUntil(lambda: not widget._runner.running, timeout=60_000)
    docks = [d for d in viewer.window.dock_widgets.values() if isinstance(d, FigureDock)]
    assert len(docks) == 1 and "2 cells" in widget._status.value
    titles = [text.get_text() for axis in docks[0].figure.axes for text in [axis.yaxis.label]]
    assert any(t.startswith("neutrophil\n(n=1)") for t in titles)
    docks[0].save(tmp_path / "grid.png")
    assert (tmp_path / "grid.png").stat().st_size > 10_000
    assert len(viewer.layers) == 1


def test_all_classes_figure_for_a_single_cell_image(make_napari_viewer, qtbot, cells):
    viewer, widget = _widget(make_napari_viewer, trials=2, strength=0.1)
    widget._image.value = viewer.add_image(cells[1], rgb=True)
    widget._all_classes.native.click()
    qtbot.waitUntil(lambda: not widget._runner.running, timeout=120_000)
    docks = [d for d in viewer.window.dock_widgets.values() if isinstance(d, FigureDock)]
    assert len(docks) == 1
    assert len(docks[0].figure.axes) == 2 * 9


def test_cancel_within_a_second_adds_no_layer(make_napari_viewer, qtbot, cells, cancel_latency):
    viewer, widget = _widget(make_napari_viewer, trials=400, source="neutrophil")
    widget._image.value = viewer.add_image(cells[0], rgb=True)
    widget._explain.native.click()
    qtbot.waitUntil(lambda: widget._runner._state["done"] > 0, timeout=60_000)
    assert cancel_latency(widget) < 1.0
    assert len(viewer.layers) == 1 and widget._status.value == "cancelled"


def test_cells_removed_while_a_cell_is_explained_get_no_layers(make_napari_viewer, qtbot, cells):
    image, labels = _smear(cells[0])
    viewer, widget = _widget(make_napari_viewer, rbc_diameter=RBC, trials=8)
    widget._image.value = viewer.add_image(image, name="smear")
    widget._labels.value = labels_layer = viewer.add_labels(labels, name="cells")
    widget._cell_id.value = 5
    widget._explain.native.click()
    viewer.layers.remove(labels_layer)
    qtbot.waitUntil(lambda: not widget._runner.running, timeout=60_000)
    assert [layer.name for layer in viewer.layers] == ["smear"]
    assert widget._status.value.startswith("cancelled: 'cells' was removed")


def test_a_cell_of_a_generated_grid_is_explained_over_its_tile(
    make_napari_viewer, qtbot, cells, monkeypatch
):
    from napari_cytodiffusion._widgets._grid import add_grid, add_tiles, tile

    errors = []
    monkeypatch.setattr("napari.utils.notifications.show_error", errors.append)
    viewer, widget = _widget(make_napari_viewer, trials=2, steps=4, source="lymphocyte")
    features = pd.DataFrame({"index": [0, 1], "label": ["neutrophil", "lymphocyte"]})
    tiled = tile(cells)
    grid = add_grid(viewer, tiled, "synthetic", features)
    tiles = add_tiles(viewer, grid, tiled, features)
    widget._image.value = grid
    widget._labels.value = tiles
    tiles.selected_label = 2  # what clicking the second cell does
    widget._explain.native.click()
    qtbot.waitUntil(lambda: not widget._runner.running, timeout=60_000)
    heat = viewer.layers[-1]
    assert heat.name == "heat map cell lymphocyte -> monocyte"
    np.testing.assert_allclose(heat.translate, np.asarray(grid.translate) + [0, 64 + 4])
    widget._cell_id.value = 3
    widget._explain.native.click()
    assert not widget._runner.running and "No cell 3 in the grid" in errors[-1]


def _explained_requests(monkeypatch):
    """The requests the widget sends to the core's explain / explain_grid: each run stops
    there (a cancel), after the model is loaded."""
    from napari_cytodiffusion.core.progress import Cancelled
    from napari_cytodiffusion.core.tasks import explain

    sent = []

    def capture(*args, **options):
        sent.append((args, options))
        raise Cancelled()

    monkeypatch.setattr(explain, "explain", capture)
    monkeypatch.setattr(explain, "explain_grid", capture)
    return sent


def test_a_tile_of_a_cell_images_grid_has_its_own_call(
    make_napari_viewer, qtbot, cells, monkeypatch
):
    """Classify cell images numbers its table from 1, Generate from 0: either way, tile n is
    the grid's row n - 1, for one cell and for the grid of all cells."""
    from napari_cytodiffusion._widgets._grid import add_grid, add_tiles, tile

    sent = _explained_requests(monkeypatch)
    viewer, widget = _widget(make_napari_viewer, trials=2)
    for first in (1, 0):  # Classify cell images' numbering, then Generate's
        features = pd.DataFrame(
            {"index": [first, first + 1], "label": ["eosinophil", "lymphocyte"]}
        )
        tiled = tile(cells)
        grid = add_grid(viewer, tiled, f"from {first}", features)
        tiles = add_tiles(viewer, grid, tiled, features)
        widget._image.value, widget._labels.value = grid, tiles
        for number, label in ((1, "eosinophil"), (2, "lymphocyte")):
            tiles.selected_label = number
            widget._explain.native.click()
            qtbot.waitUntil(lambda: not widget._runner.running, timeout=60_000)
            assert sent[-1][0][2].row["label"] == label
        widget._grid.native.click()
        qtbot.waitUntil(lambda: not widget._runner.running, timeout=60_000)
        assert sent[-1][1]["sources"] == {0: "eosinophil", 1: "lymphocyte"}


def test_a_classified_cell_starts_from_its_call_or_a_persons_label(
    make_napari_viewer, qtbot, cells, monkeypatch
):
    """The classes layer's row of the cell goes to the core (which says where the class came
    from), not its label as a class given; the image's annotations go with it."""
    sent = _explained_requests(monkeypatch)
    image, labels = _smear(cells[0])
    viewer, widget = _widget(make_napari_viewer, rbc_diameter=RBC)
    widget._image.value = viewer.add_image(image, name="smear")
    row = {"index": 5, "label": "monocyte", "predicted": "neutrophil", "annotated": "monocyte"}
    classes = viewer.add_labels(labels, name="classes", features=pd.DataFrame([row]))
    widget._labels.value = classes
    widget._cell_id.value = 5
    widget._explain.native.click()
    qtbot.waitUntil(lambda: not widget._runner.running, timeout=60_000)
    request = sent[-1][0][2]
    assert request.source is None and request.row == row
    assert request.annotations is None  # an image made in memory has none


def test_the_images_annotations_are_applied_as_the_command_line_applies_them(
    make_napari_viewer, qtbot, cells, tmp_path, monkeypatch
):
    """A cell a person deleted is refused with the core's message; their label of a cell is
    its current class, and the status line says so."""
    from PIL import Image

    from napari_cytodiffusion.core.annotations import Annotations, CellAnnotation, save_annotations

    errors = []
    monkeypatch.setattr("napari.utils.notifications.show_error", errors.append)
    image, labels = _smear(cells[0])
    path = tmp_path / "smear.png"
    Image.fromarray((image * 255).round().astype(np.uint8)).save(path)
    viewer, widget = _widget(make_napari_viewer, rbc_diameter=RBC, trials=1, steps=1)
    (smear,) = viewer.open(str(path))
    widget._image.value = smear
    widget._labels.value = viewer.add_labels(labels, name="white cells")
    widget._cell_id.value = 5
    for label in ("deleted", "monocyte"):
        cell = CellAnnotation((104, 124), label)
        save_annotations(Annotations(path.name, labels.shape, [cell]), path)
        widget._explain.native.click()
        qtbot.waitUntil(lambda: not widget._runner.running, timeout=60_000)
    assert "No cell with label 5: a person deleted it" in errors[-1]
    assert "smear.png.annotations.json" in errors[-1]
    assert "(monocyte: a person's label" in widget._status.value
    assert len(viewer.layers) == 4  # the smear, its cells, and one result's two layers

    path.with_name("smear.png.annotations.json").write_text("{damaged")
    widget._explain.native.click()
    assert not widget._runner.running and widget._status.value.startswith("not started:")
    assert "cannot be read as annotations" in errors[-1]
