"""The "Counterfactuals" widget: what would have to change for the model to call a cell X.

Pick a cell by clicking it in a labels layer of white cells (or type its id; with no labels
layer the image is taken as a single-cell image), choose a target class, and:

* Explain cell: adds the heat map towards the target and the counterfactual image as layers
  placed exactly over the cell in the image (a 64-px crop scaled and translated onto it);
* All classes: a figure of the cell's maps and edits towards every class;
* Grid of all cells: a figure of the class x class mean maps over every labelled cell (or
  every plane of an image stack).

Figures open in a dock with a "Save PNG..." button.
"""

import napari
import numpy as np
from magicgui.widgets import (
    ComboBox,
    Container,
    FloatSpinBox,
    Label,
    LineEdit,
    PushButton,
    SpinBox,
    create_widget,
)
from qtpy.QtWidgets import QFileDialog, QPushButton, QVBoxLayout, QWidget

from napari_cytodiffusion._widgets._common import (
    available_devices,
    failure_reporter,
    load_shared_model,
    show_cancelled,
)
from napari_cytodiffusion._widgets._runner import TaskRunner
from napari_cytodiffusion.core import counterfactual
from napari_cytodiffusion.core.classes import CLASSES

AUTO = "auto"


class CounterfactualWidget(Container):
    """Heat maps and counterfactual images for a selected cell, and class x class grids."""

    def __init__(self, napari_viewer):
        super().__init__()
        self._viewer = napari_viewer
        self._image = create_widget(annotation=napari.layers.Image, label="image")
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
        self._source = ComboBox(
            choices=(AUTO, *CLASSES),
            value=AUTO,
            label="current class",
            tooltip="auto: the labels layer's 'label' feature for this cell if there is one, "
            "else the class that fits the cell best in these trials.",
        )
        self._target = ComboBox(choices=CLASSES, value="monocyte", label="target class")
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
        self._guidance = FloatSpinBox(
            value=counterfactual.DEFAULT_EDIT_GUIDANCE,
            min=1.0,
            max=10.0,
            step=0.5,
            label="guidance",
        )
        self._seed = SpinBox(value=0, min=0, max=2**31 - 1, label="seed")
        self._rbc_diameter = FloatSpinBox(
            value=0.0,
            min=0.0,
            max=1000.0,
            step=0.5,
            label="red-cell diameter (px)",
            tooltip="0: from the layer's metadata (rbc_diameter) or estimated from the image.",
        )
        self._model = LineEdit(value="default", label="model", tooltip="model name or file")
        self._device = ComboBox(choices=available_devices(), value="auto", label="device")
        self._explain = PushButton(text="Explain cell")
        self._all_classes = PushButton(text="All classes")
        self._grid = PushButton(text="Grid of all cells")
        self._cancel = PushButton(text="Cancel")
        self._buttons = Container(
            widgets=[self._explain, self._all_classes, self._grid],
            layout="horizontal",
            labels=False,
        )
        self._status = Label(value="")
        self.extend(
            [
                self._image,
                self._labels,
                self._cell_id,
                self._source,
                self._target,
                self._trials,
                self._strength,
                self._guidance,
                self._seed,
                self._rbc_diameter,
                self._model,
                self._device,
                self._buttons,
                self._cancel,
                self._status,
            ]
        )
        self._runner = TaskRunner(self._buttons, self._cancel, "Counterfactuals")
        self._explain.changed.connect(self._start_explain)
        self._all_classes.changed.connect(self._start_all_classes)
        self._grid.changed.connect(self._start_grid)
        self._cancel.changed.connect(lambda: show_cancelled(self._runner, self._status))
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

    def _request(self, for_one_cell):
        """What the worker needs, read on the main thread; None (after a message) if unusable."""
        from napari.utils.notifications import show_error

        image = self._image.value
        if image is None:
            show_error("Add or choose an image layer first.")
            return None
        labels = self._labels.value
        if labels is not None and for_one_cell and not np.any(labels.data == self._cell_id.value):
            show_error(
                f"No cell {self._cell_id.value} in {labels.name}: click a cell in the labels "
                "layer (select that layer first) or type an existing id."
            )
            return None
        plane = _current_plane(self._viewer, image)
        return {
            "image": np.asarray(image.data[plane] if plane is not None else image.data),
            "labels": None if labels is None else np.asarray(labels.data),
            "features": _features(labels) if labels is not None else _features(image),
            "cell_id": self._cell_id.value,
            "source": None if self._source.value == AUTO else self._source.value,
            "target": self._target.value,
            "trials": self._trials.value,
            "strength": self._strength.value,
            "guidance": self._guidance.value,
            "seed": self._seed.value,
            "rbc_diameter": self._rbc_diameter.value or _rbc_from_metadata(labels, image),
            "model": self._model.value,
            "device": self._device.value,
            "layer": image,
            "stack": image.data if _is_stack(image) and labels is None else None,
        }

    def _start(self, job, on_result, text):
        request = self._request(for_one_cell=job is not _grid_job)
        if request is None:
            return
        self._status.value = text
        self._runner.start(
            lambda progress: job(request, progress), on_result, failure_reporter(self._status)
        )

    def _start_explain(self):
        self._start(_explain_job, self._add_layers, "explaining the cell ...")

    def _start_all_classes(self):
        self._start(_all_classes_job, self._show_figure, "maps towards every class ...")

    def _start_grid(self):
        self._start(_grid_job, self._show_figure, "mean maps over all cells ...")

    # --- results ------------------------------------------------------------------------------

    def _add_layers(self, result):
        request, site, explanation, edited = (
            result["request"],
            result["site"],
            result["explanation"],
            result["edited"],
        )
        layer = request["layer"]
        origin, step = site.placement(edited.shape[0])
        scale = np.asarray(layer.scale[-2:]) * step
        translate = np.asarray(layer.translate[-2:]) + np.asarray(layer.scale[-2:]) * origin
        what = f"cell {request['cell_id']}" if request["labels"] is not None else "cell"
        name = f"{what} {explanation.source} -> {request['target']}"
        details = {
            "cell_id": request["cell_id"],
            "source": explanation.source,
            "target": request["target"],
            "best_fit": explanation.predicted,
            "errors": dict(zip(explanation.classes, explanation.errors.tolist(), strict=True)),
            "centre": site.centre,
            "rbc_diameter": site.rbc_diameter,
        }
        self._viewer.add_image(
            edited,
            rgb=True,
            name=f"counterfactual {name}",
            scale=scale,
            translate=translate,
            metadata=details,
        )
        heat = explanation.map_for(request["target"])
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
        self._status.value = (
            f"{name}: maps added (best fit in these trials: {explanation.predicted})"
        )

    def _show_figure(self, result):
        figure, title, area = result
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


def _current_plane(viewer, layer):
    """Index of the displayed plane of an image stack; None if the layer is not a stack."""
    if not _is_stack(layer):
        return None
    axis = viewer.dims.ndim - layer.ndim
    return int(np.clip(viewer.dims.current_step[axis], 0, layer.data.shape[0] - 1))


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


def _label_of(features, index):
    """The 'label' feature of the cell with this index, if the table has one."""
    if features is None or "label" not in features or "index" not in features:
        return None
    rows = features[features["index"] == index]
    return str(rows["label"].iloc[0]) if len(rows) and rows["label"].iloc[0] in CLASSES else None


def _cell(request):
    """(site, rgb) of the requested cell: a labelled cell, or the image's central cell."""
    from napari_cytodiffusion.core.image import to_rgb_float

    rgb = to_rgb_float(request["image"])
    if request["labels"] is not None:
        site = counterfactual.labelled_cell_site(
            rgb, request["labels"], request["cell_id"], request["rbc_diameter"]
        )
    else:
        site = _single_cell_site(rgb, request["rbc_diameter"])
    return site, rgb


def _single_cell_site(rgb, rbc_diameter, size=64):
    """A model-sized image is taken as a crop already (generated or exported cells)."""
    if rgb.shape[:2] == (size, size):
        return counterfactual.model_crop_site(size)
    return counterfactual.central_cell_site(rgb, rbc_diameter)


def _explain_job(request, progress):
    model = load_shared_model(request["model"], request["device"])
    site, rgb = _cell(request)
    crop = site.crop(rgb, model.image_size)
    source = request["source"] or _label_of(request["features"], request["cell_id"])
    explanation = counterfactual.explain_cell(
        model, crop, source, request["trials"], request["seed"], progress
    )
    edited = counterfactual.counterfactual_image(
        model,
        crop,
        request["target"],
        explanation.source,
        request["strength"],
        guidance=request["guidance"],
        seed=request["seed"],
        progress=progress,
    )
    return {"request": request, "site": site, "explanation": explanation, "edited": edited}


def _all_classes_job(request, progress):
    model = load_shared_model(request["model"], request["device"])
    site, rgb = _cell(request)
    crop = site.crop(rgb, model.image_size)
    source = request["source"] or _label_of(request["features"], request["cell_id"])
    explanation = counterfactual.explain_cell(
        model, crop, source, request["trials"], request["seed"], progress
    )
    edits = {}
    for target in model.classes:
        edits[target] = counterfactual.counterfactual_image(
            model,
            crop,
            target,
            explanation.source,
            request["strength"],
            guidance=request["guidance"],
            seed=request["seed"],
            progress=progress,
        )
    figure = counterfactual.cell_maps_figure(crop, explanation, edits)
    return figure, f"Counterfactuals: {explanation.source} cell", "bottom"


def _grid_job(request, progress):
    model = load_shared_model(request["model"], request["device"])
    crops, sources = _cell_set(request, model.image_size)
    grid, counts, mean_crops = counterfactual.mean_map_grid(
        model, crops, sources, request["trials"], request["seed"], progress
    )
    figure = counterfactual.grid_figure(grid, counts, mean_crops, model.classes)
    return figure, f"Counterfactual grid ({len(crops)} cells)", "right"


def _cell_set(request, size):
    """Crops and current classes of every labelled cell, or of every plane of a stack."""
    from napari_cytodiffusion.core.image import to_rgb_float

    features = request["features"]
    fixed = request["source"]
    if request["labels"] is not None:
        rgb = to_rgb_float(request["image"])
        ids = np.unique(request["labels"])
        ids = ids[ids > 0]
        if not len(ids):
            raise ValueError("The labels layer holds no cells.")
        rbc = request["rbc_diameter"]
        crops, sources = [], []
        for cell_id in ids:
            site = counterfactual.labelled_cell_site(rgb, request["labels"], cell_id, rbc)
            rbc = site.rbc_diameter  # estimate once for the whole image
            crops.append(site.crop(rgb, size))
            sources.append(fixed or _label_of(features, int(cell_id)))
        return np.stack(crops), sources
    if request["stack"] is None:
        raise ValueError(
            "A grid needs a set of cells: a labels layer of the image's cells, or an image "
            "stack of single cells."
        )
    crops, sources = [], []
    for index, plane in enumerate(np.asarray(request["stack"])):
        rgb = to_rgb_float(plane)
        crops.append(_single_cell_site(rgb, request["rbc_diameter"], size).crop(rgb, size))
        sources.append(fixed or _label_of(features, index))
    return np.stack(crops), sources
