"""The "Counterfactuals" widget: what would have to change for the model to call a cell X.

Pick a cell by clicking it in a labels layer of white cells (or type its id; with no labels
layer the image is taken as a single-cell image), choose a target class, and:

* Explain cell: adds the heat map towards the target and the counterfactual image as layers
  placed exactly over the cell in the image (a model crop scaled and translated onto it);
* All classes: a figure of the cell's maps and edits towards every class;
* Grid of all cells: a figure of the class x class mean maps over every labelled cell (or
  every plane of an image stack).

Figures open in a dock with a "Save PNG..." button.
"""

import napari
import numpy as np
from magicgui.widgets import ComboBox, Container, FloatSpinBox, SpinBox, create_widget
from qtpy.QtWidgets import QFileDialog, QPushButton, QVBoxLayout, QWidget

from napari_cytodiffusion._widgets._common import ModelFields, RunRow, rbc_diameter_field
from napari_cytodiffusion.core.model import counterfactual

AUTO = "auto"


class CounterfactualWidget(Container):
    """Heat maps and counterfactual images for a selected cell, and class x class grids."""

    def __init__(self, napari_viewer):
        super().__init__()
        self._viewer = napari_viewer
        self._image = create_widget(
            annotation=napari.layers.Image,
            label="image",
            options={"tooltip": "The smear, a single-cell image, or a stack of cells"},
        )
        self._labels = create_widget(
            annotation=napari.layers.Labels | None,
            label="cells (labels)",
            options={"tooltip": "White-cell labels of the image; none: a single-cell image"},
        )
        self._cell_id = SpinBox(
            value=0,
            min=0,
            max=2**31 - 1,
            label="cell id",
            tooltip="Click a cell in the labels layer (select that layer first) or type its id.",
        )
        self._fields = ModelFields(seed_tooltip="Seed of the noise: same seed, same maps.")
        classes = self._fields.classes()
        self._source = ComboBox(
            choices=(AUTO, *classes),
            value=AUTO,
            label="current class",
            tooltip="auto: the labels layer's 'label' feature for this cell if there is one, "
            "else the class that fits the cell best in these trials.",
        )
        self._target = ComboBox(
            choices=classes,
            value="monocyte" if "monocyte" in classes else classes[0],
            label="target class",
            tooltip="The class to explain and edit towards.",
        )
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
            value="noise",
            label="edit method",
            tooltip="noise: noise the cell and redraw it (visible edits); invert: run the "
            "sampler backwards from the cell first (keeps more of the cell).",
        )
        self._guidance = FloatSpinBox(
            value=counterfactual.DEFAULT_EDIT_GUIDANCE,
            min=1.0,
            max=10.0,
            step=0.5,
            label="guidance",
            tooltip="How strongly the edit follows the target class.",
        )
        self._rbc_diameter = rbc_diameter_field(
            "0: from the layer's metadata (rbc_diameter) or estimated from the image."
        )
        self._model, self._device, self._seed = self._fields.widgets
        row = RunRow("Counterfactuals", "Explain cell", "All classes", "Grid of all cells")
        self._explain, self._all_classes, self._grid = row.buttons
        self._cancel, self._status, self._runner = row.cancel, row.status, row.runner
        self._explain.tooltip = "Heat map and edit towards the target, placed over the cell."
        self._all_classes.tooltip = "A figure of the cell's maps and edits towards every class."
        self._grid.tooltip = "A figure of the mean maps over every labelled cell or plane."
        self.extend(
            [
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
            ]
        )
        self._explain.changed.connect(self._start_explain)
        self._all_classes.changed.connect(self._start_all_classes)
        self._grid.changed.connect(self._start_grid)
        self._clicked_layer = None
        self._labels.changed.connect(self._watch_clicks)
        for event in (napari_viewer.layers.events.inserted, napari_viewer.layers.events.removed):
            event.connect(lambda *_: self.reset_choices())
        self.reset_choices()
        self._watch_clicks()

    # --- picking a cell ---------------------------------------------------------------------

    def _watch_clicks(self, *_):
        if (
            self._clicked_layer is not None
            and self._pick in self._clicked_layer.mouse_drag_callbacks
        ):
            self._clicked_layer.mouse_drag_callbacks.remove(self._pick)
        self._clicked_layer = self._labels.value
        if self._clicked_layer is not None:
            self._clicked_layer.mouse_drag_callbacks.append(self._pick)

    def _pick(self, layer, event):
        value = layer.get_value(
            event.position,
            view_direction=event.view_direction,
            dims_displayed=event.dims_displayed,
            world=True,
        )
        if value:
            self._cell_id.value = int(value)
            self._status.value = f"cell {int(value)} selected"

    # --- running ------------------------------------------------------------------------------

    def _request(self, all_targets=False):
        """(image, request) for one cell, read on the main thread; None after a message."""
        from napari.utils.notifications import show_error

        from napari_cytodiffusion.core.tasks.explain import ExplainRequest

        image, labels = self._image.value, self._labels.value
        if image is None:
            show_error("Add or choose an image layer first.")
            return None
        cell_id = self._cell_id.value
        if labels is not None and (cell_id < 1 or not np.any(labels.data == cell_id)):
            show_error(
                f"No cell {cell_id} in {labels.name}: click a cell in the labels layer (select "
                "that layer first) or type an existing id (0 is the background)."
            )
            return None
        index, plane = (cell_id, None) if labels is not None else _plane(self._viewer, image)
        source = None if self._source.value == AUTO else self._source.value
        if source is None:
            layer = labels if labels is not None else image
            source = self._known_labels(layer).get(index)
        request = ExplainRequest(
            target=self._target.value,
            cell_id=cell_id if labels is not None else None,
            labels=None if labels is None else np.asarray(labels.data),
            source=source,
            trials=self._trials.value,
            strength=self._strength.value,
            steps=self._steps.value,
            guidance=self._guidance.value,
            method=self._method.value,
            seed=self._seed.value,
            rbc_diameter=self._rbc_diameter.value or _rbc_from_metadata(labels, image),
            all_targets=all_targets,
        )
        data = np.asarray(image.data) if plane is None else plane
        return data, request

    def _known_labels(self, layer):
        """{index: class} of the layer's 'label' feature, for the model's classes only."""
        classes = set(self._target.choices)
        return {
            index: name
            for index, name in _labels_by_index(_features(layer)).items()
            if name in classes
        }

    def _start(self, job, on_result, text):
        self._status.value = text
        self._runner.start(job, on_result)

    def _start_explain(self):
        picked = self._request()
        if picked is not None:
            job = _explain_job(*picked, self._fields.choice())
            self._start(job, self._add_layers, "explaining the cell ...")

    def _start_all_classes(self):
        picked = self._request(all_targets=True)
        if picked is not None:
            job = _explain_job(*picked, self._fields.choice())
            self._start(job, self._show_cell_figure, "maps towards every class ...")

    def _start_grid(self):
        from napari.utils.notifications import show_error

        image, labels = self._image.value, self._labels.value
        if image is None:
            show_error("Add or choose an image layer first.")
            return
        data = np.asarray(image.data) if labels is not None or _is_stack(image) else None
        if data is None:
            show_error(
                "A grid needs a set of cells: a labels layer of the image's cells, or an image "
                "stack of single cells."
            )
            return
        fixed = None if self._source.value == AUTO else self._source.value
        sources = fixed or self._known_labels(labels if labels is not None else image)
        options = {
            "labels": None if labels is None else np.asarray(labels.data),
            "sources": sources,
            "trials": self._trials.value,
            "seed": self._seed.value,
            "rbc_diameter": self._rbc_diameter.value or _rbc_from_metadata(labels, image),
        }
        job = _grid_job(data, options, self._fields.choice())
        self._start(job, self._show_grid_figure, "mean maps over all cells ...")

    # --- results ------------------------------------------------------------------------------

    def _add_layers(self, result):
        image = self._image.value
        origin, step = result.placement()
        pixel = np.asarray(image.scale[-2:])
        scale = pixel * step
        translate = np.asarray(image.translate[-2:]) + pixel * origin
        maps = result.maps
        details = {
            "cell_id": result.cell_id,
            "source": maps.source,
            "target": result.target,
            "best_fit": maps.predicted,
            "errors": dict(zip(maps.classes, maps.errors.tolist(), strict=True)),
            "centre": result.site.centre,
            "rbc_diameter": result.site.rbc_diameter,
        }
        name = result.title()
        self._viewer.add_image(
            result.edited,
            rgb=True,
            name=f"counterfactual {name}",
            scale=scale,
            translate=translate,
            metadata=details,
        )
        heat = result.heat_crop
        self._viewer.add_image(
            heat,
            name=f"heat map {name}",
            scale=scale,
            translate=translate,
            colormap="magma",
            opacity=0.6,
            contrast_limits=(0.0, float(heat.max()) or 1.0),
            metadata=details,
        )
        self._status.value = f"{name}: maps added (best fit in these trials: {maps.predicted})"

    def _show_cell_figure(self, result):
        self._show_figure(result.figure(), f"Counterfactuals: {result.maps.source} cell", "bottom")

    def _show_grid_figure(self, grid):
        self._show_figure(grid.figure(), f"Counterfactual grid ({grid.cells} cells)", "right")

    def _show_figure(self, figure, title, area):
        dock = FigureDock(figure)
        self._viewer.window.add_dock_widget(dock, name=title, area=area, tabify=False)
        self._status.value = f"{title}: figure added (Save PNG... in its panel)"


class FigureDock(QWidget):
    """A matplotlib figure with a "Save PNG..." button."""

    def __init__(self, figure, parent=None):
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg

        super().__init__(parent)
        self.figure = figure
        self.canvas = FigureCanvasQTAgg(figure)
        self.canvas.setMinimumSize(320, 240)
        self._save = QPushButton("Save PNG...")
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

        self.figure.savefig(path, dpi=150)
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


def _labels_by_index(features):
    """{index: class} from a feature table's 'index' and 'label' columns (empty if absent)."""
    if features is None or "label" not in features or "index" not in features:
        return {}
    return {
        int(i): str(label) for i, label in zip(features["index"], features["label"], strict=True)
    }


def _explain_job(image, request, model_choice):
    def job(progress):
        from napari_cytodiffusion.core.tasks.explain import explain

        return explain(image, model_choice.load(), request, progress)

    return job


def _grid_job(data, options, model_choice):
    def job(progress):
        from napari_cytodiffusion.core.tasks.explain import explain_grid

        return explain_grid(data, model_choice.load(), progress=progress, **options)

    return job
