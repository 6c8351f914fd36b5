"""The "Counterfactuals" widget: what would have to change for the model to call a cell X.

Pick a cell by clicking it in a labels layer of white cells (the cell id follows the layer's
selected label; with no labels layer the image is taken as a single-cell image), choose a
target class, and:

* Explain cell: adds the heat map towards the target and the counterfactual image as layers
  placed exactly over the cell in the image (a model crop scaled and translated onto it);
* All classes: a figure of the cell's maps and edits towards every class;
* Grid of all cells: a figure of the class x class mean maps over every labelled cell (or
  every plane of an image stack).

Figures open in a dock with a "Save PNG..." button.
"""

import napari
import numpy as np
from magicgui.widgets import ComboBox, FloatSpinBox, SpinBox
from qtpy.QtWidgets import QFileDialog, QPushButton, QVBoxLayout, QWidget

from napari_cytodiffusion._widgets._classify import image_path
from napari_cytodiffusion._widgets._common import (
    DockForm,
    ModelFields,
    RunRow,
    added_unselected,
    full_resolution,
    made_for,
    rbc_diameter_field,
    removed_layer,
    rgb_images,
    select_then_show,
)
from napari_cytodiffusion._widgets._grid import by_cell, layer_cells, tile_origin
from napari_cytodiffusion.core.annotations import AnnotationError
from napari_cytodiffusion.core.model import counterfactual

AUTO = "auto"


class CounterfactualWidget(DockForm):
    """Heat maps and counterfactual images for a selected cell, and class x class grids."""

    def __init__(self, napari_viewer):
        super().__init__()
        self._viewer = napari_viewer
        self._image = ComboBox(
            label="image",
            choices=lambda _: rgb_images(napari_viewer),
            tooltip="The smear, a single-cell image, a stack of cells or a grid of cells.",
        )
        self._labels = ComboBox(
            label="cells (labels)",
            choices=self._cell_layers,
            nullable=True,
            tooltip="The image's cells: by default its classes layer from Classify cells (its "
            "calls are the current classes), else its white cells from Segment cells, or a "
            "grid's tiles; none: the image is a single cell.",
        )
        self._cell_id = SpinBox(
            value=1,
            min=0,
            max=2**31 - 1,
            label="cell id",
            tooltip="The labels layer's selected cell: click a cell (select that layer first), "
            "pick one in Classify's review list, or type its id.",
        )
        self._fields = ModelFields(seed_tooltip="Seed of the noise: same seed, same maps.")
        classes = self._fields.classes()
        self._source = ComboBox(
            choices=(AUTO, *classes),
            value=AUTO,
            label="current class",
            tooltip="auto: a person's label of the cell (the image's annotations, or the "
            "layer's), else the call Classify cells made of it, else the classifier's call "
            "on the cell.",
        )
        self._target = ComboBox(
            choices=classes,
            value="monocyte" if "monocyte" in classes else classes[0],
            label="target class",
            tooltip="The class to explain and edit towards.",
        )
        self._fields.follow_classes(self._source, self._target)
        self._trials = SpinBox(
            value=counterfactual.DEFAULT_TRIALS,
            min=1,
            max=512,
            label="trials",
            tooltip="Paired noise draws per cell; more gives smoother maps.",
        )
        self._strength = FloatSpinBox(
            value=counterfactual.DEFAULT_STRENGTH,
            min=0.05,
            max=1.0,
            step=0.05,
            label="edit strength",
            tooltip="How far into the noise the edit goes: more changes the cell more.",
        )
        self._steps = SpinBox(
            value=counterfactual.DEFAULT_EDIT_STEPS,
            min=1,
            max=500,
            label="edit steps",
            tooltip="Sampler steps over the whole schedule; an edit uses its strength's share.",
        )
        self._method = ComboBox(
            choices=counterfactual.EDIT_METHODS,
            value=counterfactual.DEFAULT_EDIT_METHOD,
            label="edit method",
            tooltip="invert: run the sampler backwards under the cell's class, then forwards "
            "under the target (keeps the cell; the edit towards its own class is the cell); "
            "noise: noise the cell and redraw it (freer edits that redraw the whole cell).",
        )
        self._guidance = FloatSpinBox(
            value=counterfactual.DEFAULT_EDIT_GUIDANCE,
            min=1.0,
            max=10.0,
            step=0.5,
            label="guidance",
            tooltip="How strongly the edit follows the target class (from the cell's own "
            "class with invert, from no class with noise).",
        )
        self._rbc_diameter = rbc_diameter_field(
            "0: from the layer's metadata (rbc_diameter) or estimated from the image."
        )
        self._device, self._seed = self._fields.device, self._fields.seed
        row = RunRow("Counterfactuals", "Explain cell", "All classes", "Grid of all cells")
        self._explain, self._all_classes, self._grid = row.buttons
        self._cancel, self._status, self._runner = row.cancel, row.status, row.runner
        self._explain.tooltip = "Heat map and edit towards the target, placed over the cell."
        self._all_classes.tooltip = "A figure of the cell's maps and edits towards every class."
        self._grid.tooltip = "A figure of the mean maps over every labelled cell or plane."
        self.add(
            self._image,
            self._labels,
            self._cell_id,
            self._source,
            self._target,
            self._trials,
            self._strength,
            self._steps,
            self._method,
            self._guidance,
            self._rbc_diameter,
            *self._fields.widgets,
            row,
        )
        self._explain.changed.connect(self._start_explain)
        self._all_classes.changed.connect(self._start_all_classes)
        self._grid.changed.connect(self._start_grid)
        self._clicked_layer = None
        self._labels.changed.connect(self._watch_clicks)
        self._image.changed.connect(self._pick_cells)
        napari_viewer.layers.events.inserted.connect(self._layer_added)
        napari_viewer.layers.events.removed.connect(lambda *_: self.reset_choices())
        self.reset_choices()
        self._pick_cells()
        self._watch_clicks()

    # --- choosing the cells -------------------------------------------------------------------

    def _cell_layers(self, _=None):
        """Labels layers that number the chosen image's cells: of its shape, and no red cells,
        platelets or nuclei."""
        image = self._image.value
        if image is None:
            return []
        return [
            layer
            for layer in self._viewer.layers
            if isinstance(layer, napari.layers.Labels)
            and layer.metadata.get("cells", "white") == "white"
            and tuple(layer.data.shape) == tuple(image.data.shape[: layer.ndim])
        ]

    def _pick_cells(self, *_):
        """The chosen image's own cells: its classes layer, else its white cells, else none."""
        self._labels.reset_choices()
        image = self._image.value
        own = [layer for layer in self._labels.choices if _made_for(layer, image)]
        own.sort(key=lambda layer: "class" not in layer.metadata)
        self._labels.value = own[0] if own else None

    def _layer_added(self, event):
        self.reset_choices()
        layer, chosen = event.value, self._labels.value
        if _made_for(layer, self._image.value) and (chosen is None or "class" in layer.metadata):
            self._labels.value = layer

    # --- picking a cell ---------------------------------------------------------------------

    def _watch_clicks(self, *_):
        """Follow the chosen labels layer: clicks on it and its selected label pick the cell."""
        old = self._clicked_layer
        if old is not None:
            if self._pick in old.mouse_drag_callbacks:
                old.mouse_drag_callbacks.remove(self._pick)
            old.events.selected_label.disconnect(self._follow_selected)
        self._clicked_layer = self._labels.value
        if self._clicked_layer is not None:
            self._clicked_layer.mouse_drag_callbacks.append(self._pick)
            self._clicked_layer.events.selected_label.connect(self._follow_selected)
            self._follow_selected()

    def _follow_selected(self, *_):
        layer = self._clicked_layer
        if layer is not None and layer.selected_label:
            self._cell_id.value = int(layer.selected_label)

    def _pick(self, layer, event):
        value = layer.get_value(
            event.position,
            view_direction=event.view_direction,
            dims_displayed=event.dims_displayed,
            world=True,
        )
        if value:
            layer.selected_label = int(value)  # _follow_selected sets the cell id
            self._status.value = f"cell {int(value)} selected"

    # --- running ------------------------------------------------------------------------------

    def _request(self, all_targets=False):
        """(cell image, request, offset) for one cell, read on the main thread; None after a
        refusal. ``offset`` is where the cell image lies in the layer (a grid's tile)."""
        image, labels = self._image.value, self._labels.value
        if image is None:
            self._runner.refuse("Add or choose an image layer first.")
            return None
        cell_id = self._cell_id.value
        if "grid" in image.metadata or (labels is not None and labels.metadata.get("tiles")):
            return self._grid_cell_request(image, cell_id, all_targets)
        if labels is not None and labels.data.shape != image.data.shape[: labels.ndim]:
            self._runner.refuse(
                f"'{labels.name}' ({labels.data.shape}) is not of the shape of '{image.name}' "
                f"({image.data.shape[:2]}): choose the white cells of this image."
            )
            return None
        if labels is not None and (cell_id < 1 or not np.any(labels.data == cell_id)):
            self._runner.refuse(
                f"No cell {cell_id} in {labels.name}: click a cell in the labels layer (select "
                "that layer first) or type an existing id (0 is the background)."
            )
            return None
        try:
            annotations = None if labels is None else _saved_annotations(image)
        except AnnotationError as error:
            self._runner.refuse(str(error))
            return None
        index, plane = (cell_id, None) if labels is not None else _plane(self._viewer, image)
        request = self._explain_request(
            labels if labels is not None else image,
            index,
            all_targets,
            cell_id=cell_id if labels is not None else None,
            labels=None if labels is None else np.asarray(labels.data),
            annotations=annotations,
            rbc_diameter=self._rbc_diameter.value or _rbc_from_metadata(labels, image),
        )
        # Not read here: a large image is read in the worker, the viewer stays responsive.
        data = full_resolution(image) if plane is None else plane
        return data, request, (0, 0)

    def _grid_cell_request(self, image, cell_id, all_targets):
        """(cell, request, offset) for cell ``cell_id`` (its tile number) of a grid."""
        if "grid" not in image.metadata:
            self._runner.refuse(
                f"The tiles layer '{self._labels.value.name}' numbers the cells of a grid: "
                "choose that grid as the image."
            )
            return None
        cells = layer_cells(image)
        if not 1 <= cell_id <= len(cells):
            self._runner.refuse(
                f"No cell {cell_id} in the grid '{image.name}': its cells are 1 to "
                f"{len(cells)} (click one in its tiles layer, or type its number)."
            )
            return None
        request = self._explain_request(image, cell_id - 1, all_targets)
        return cells[cell_id - 1], request, tile_origin(image.metadata["grid"], cell_id - 1)

    def _explain_request(self, layer, index, all_targets, **where):
        """The request for the cell ``index`` of ``layer`` (by label value, or by position in
        a set of cells), with the fields' settings: its current class as chosen, else from
        its row of the layer's features (a person's call or the classifier's, which the
        status line then names)."""
        from napari_cytodiffusion.core.tasks.explain import ExplainRequest

        return ExplainRequest(
            target=self._target.value,
            source=None if self._source.value == AUTO else self._source.value,
            row=_cell_row(layer, index),
            trials=self._trials.value,
            strength=self._strength.value,
            steps=self._steps.value,
            guidance=self._guidance.value,
            method=self._method.value,
            seed=self._seed.value,
            all_targets=all_targets,
            **where,
        )

    def _known_labels(self, layer):
        """{cell: class} of the layer's 'label' feature (cells as :func:`_features_by_cell`
        keys them), for the model's classes only."""
        table = _features_by_cell(layer)
        if table is None or "label" not in table:
            return {}
        classes = set(self._target.choices)
        return {cell: name for cell, name in table["label"].items() if name in classes}

    def _start(self, job, on_result, text):
        self._runner.start(job, on_result, text=text)

    def _start_explain(self):
        picked = self._request()
        if picked is not None:
            data, request, offset = picked
            image, labels = self._image.value, self._labels.value
            job = _explain_job(data, request, self._fields.choice())
            self._runner.start(
                job,
                lambda result: self._add_layers(result, image, offset),
                text="explaining the cell",
                removed_input=lambda: removed_layer(self._viewer, image, labels),
            )

    def _start_all_classes(self):
        picked = self._request(all_targets=True)
        if picked is not None:
            data, request, _ = picked
            job = _explain_job(data, request, self._fields.choice())
            self._start(job, self._show_cell_figure, "maps towards every class")

    def _start_grid(self):
        image, labels = self._image.value, self._labels.value
        if image is None:
            self._runner.refuse("Add or choose an image layer first.")
            return
        if labels is not None and labels.metadata.get("tiles"):
            labels = None  # a grid's tiles number its cells; the grid is the set itself
        if labels is not None:
            data = full_resolution(image)  # read in the worker
        elif _is_stack(image) or "grid" in image.metadata:
            data = layer_cells(image)
        else:
            self._runner.refuse(
                "A grid needs a set of cells: a labels layer of the image's cells, a grid from "
                "Generate cells, or an image stack of single cells."
            )
            return
        try:
            annotations = None if labels is None else _saved_annotations(image)
        except AnnotationError as error:
            self._runner.refuse(str(error))
            return
        fixed = None if self._source.value == AUTO else self._source.value
        sources = fixed or self._known_labels(labels if labels is not None else image)
        options = {
            "labels": None if labels is None else np.asarray(labels.data),
            "sources": sources,
            "trials": self._trials.value,
            "seed": self._seed.value,
            "rbc_diameter": self._rbc_diameter.value or _rbc_from_metadata(labels, image),
            "annotations": annotations,
        }
        job = _grid_job(data, options, self._fields.choice())
        self._start(job, self._show_grid_figure, "mean maps over all cells")

    # --- results ------------------------------------------------------------------------------

    def _add_layers(self, result, image, offset):
        origin, step = result.placement()
        pixel = np.asarray(image.scale[-2:])
        scale = pixel * step
        translate = np.asarray(image.translate[-2:]) + pixel * (np.asarray(origin) + offset)
        maps = result.maps
        details = {
            "cell_id": result.cell_id,
            "source": maps.source,
            "target": result.target,
            "best_fit": maps.predicted,
            "source_note": result.source_note(),
            "errors": dict(zip(maps.classes, maps.errors.tolist(), strict=True)),
            "centre": result.site.centre,
            "rbc_diameter": result.site.rbc_diameter,
        }
        name = result.title()
        # Each layer is added hidden, then drawn, one step per turn of the event loop (see
        # _runner); the heat map, added last, is the one selected.
        with added_unselected(self._viewer):
            edited = self._viewer.add_image(
                result.edited,
                rgb=True,
                name=f"counterfactual {name}",
                scale=scale,
                translate=translate,
                metadata=details,
                visible=False,
            )
        yield
        edited.visible = True
        yield
        heat = result.heat_crop
        with added_unselected(self._viewer):
            heat_layer = self._viewer.add_image(
                heat,
                name=f"heat map {name}",
                scale=scale,
                translate=translate,
                colormap="magma",
                opacity=0.6,
                contrast_limits=(0.0, float(heat.max()) or 1.0),
                metadata=details,
                visible=False,
            )
        yield
        yield from select_then_show(self._viewer, heat_layer)
        self._status.value = f"done: {name} ({result.source_note()})"
        if result.field_warning():
            from napari.utils.notifications import show_warning

            self._status.value += f"; {result.field_warning()}"
            show_warning(f"Counterfactuals: {result.field_warning()}.")

    def _show_cell_figure(self, result):
        title = f"Counterfactuals: {result.maps.source} cell"
        self._show_figure(result.figure(), title, "bottom", f" ({result.source_note()})")

    def _show_grid_figure(self, grid):
        self._show_figure(grid.figure(), f"Counterfactual grid ({grid.cells} cells)", "right")

    def _show_figure(self, figure, title, area, note=""):
        dock = FigureDock(figure)
        self._viewer.window.add_dock_widget(dock, name=title, area=area, tabify=False)
        self._status.value = f"done: {title}{note}; Save PNG... in its panel"


class FigureDock(QWidget):
    """A matplotlib figure with a "Save PNG..." button."""

    def __init__(self, figure, parent=None):
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg

        super().__init__(parent)
        self.figure = figure
        self._size = figure.get_size_inches().copy()  # before the dock resizes it
        self.canvas = FigureCanvasQTAgg(figure)
        self.canvas.setMinimumSize(320, 240)
        self._save = QPushButton("Save PNG...")
        self._save.setToolTip("Save the figure as a PNG file (150 dpi).")
        self._save.clicked.connect(self._ask_and_save)
        layout = QVBoxLayout(self)
        layout.addWidget(self.canvas)
        layout.addWidget(self._save)

    def _ask_and_save(self):
        path, _ = QFileDialog.getSaveFileName(self, "Save figure", "counterfactuals.png", "*.png")
        if path:
            self.save(path)

    def save(self, path):
        from napari.utils.notifications import show_info

        # At the figure's own size: the dock may have squeezed it on screen.
        shown = self.figure.get_size_inches().copy()
        self.figure.set_size_inches(self._size, forward=False)
        self.figure.savefig(path, dpi=150)
        self.figure.set_size_inches(shown, forward=False)
        show_info(f"Figure saved to {path}")


def _is_stack(layer):
    """An RGB image stack (n, rows, cols, 3): a set of single-cell images."""
    return layer.rgb and layer.ndim == 3


def _plane(viewer, layer):
    """(index, data) of the displayed plane of an image stack; (None, None) for an image."""
    if not _is_stack(layer):
        return None, None
    axis = viewer.dims.ndim - layer.ndim
    index = int(np.clip(viewer.dims.current_step[axis], 0, layer.data.shape[0] - 1))
    return index, np.asarray(layer.data[index])


def _features(layer):
    """A layer's feature table: ``features`` for labels, ``metadata['features']`` for images."""
    table = getattr(layer, "features", None)
    if table is None or len(table) == 0:
        table = layer.metadata.get("features")
    return None if table is None or len(table) == 0 else table.copy()


def _rbc_from_metadata(*layers):
    for layer in layers:
        if layer is not None and layer.metadata.get("rbc_diameter"):
            return float(layer.metadata["rbc_diameter"])
    return None


def _saved_annotations(image):
    """A person's review saved beside the file ``image`` was opened from (None where none):
    applied as the command line applies it, it numbers the cells and gives a person's labels.

    Raises
    ------
    AnnotationError
        If the file beside the image is damaged or not an annotation file.
    """
    from napari_cytodiffusion.core.annotations import load_annotations

    path = image_path(image)
    return load_annotations(path) if path else None


def _features_by_cell(layer):
    """The layer's feature table indexed by cell (None where it has none): by label value
    (``index``) for a labels layer; by position for a set of cells (:func:`._grid.by_cell`),
    as :func:`layer_cells` and ``explain_grid`` number them."""
    table = _features(layer)
    if table is None:
        return None
    if not isinstance(layer, napari.layers.Labels):
        return by_cell(table)
    return table.set_index(table["index"].astype(int)) if "index" in table else None


def _cell_row(layer, cell):
    """The row of ``cell`` in the layer's features, as a dict (None where it has none)."""
    table = _features_by_cell(layer)
    if table is None or cell not in table.index:
        return None
    return table.loc[[cell]].iloc[0].to_dict()


def _explain_job(image, request, model_choice):
    def job(progress):
        from napari_cytodiffusion.core.tasks.explain import explain

        return explain(image, model_choice.load(progress), request, progress)

    return job


def _grid_job(data, options, model_choice):
    def job(progress):
        from napari_cytodiffusion.core.tasks.explain import explain_grid

        model = model_choice.load(progress)
        cells, labels, sources = np.asarray(data), options["labels"], options["sources"]
        if isinstance(sources, dict):  # a deleted cell's feature row outlives its pixels
            present = set(range(len(cells))) if labels is None else set(np.unique(labels).tolist())
            sources = {key: name for key, name in sources.items() if key in present}
        return explain_grid(cells, model, progress=progress, **{**options, "sources": sources})

    return job


def _made_for(layer, image):
    """Whether ``layer`` numbers the cells of ``image``: made for it by Segment or Classify
    cells, or a grid's tiles (by the image's id, whatever either is named)."""
    return made_for(layer, image) and ("tiles" in layer.metadata) == ("grid" in image.metadata)
