"""The Classify widget: diffusion classification of every white cell of the open smear.

Adds, all at once when the work is done: a Labels layer coloured by class (per-cell results
in its ``features``, shown on hover), an uncertainty layer (each cell filled with its
uncertainty, with a colour bar) and markers on the cells that need review. The dock shows the
legend, the differential count and the flagged cells; clicking one centres the view on it.
"""

from pathlib import Path

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FloatSpinBox,
    Label,
    LineEdit,
    PushButton,
    SpinBox,
)
from napari.layers import Image, Labels
from napari.utils.notifications import show_error, show_info
from qtpy.QtWidgets import QFileDialog, QListWidget, QTableWidget, QTableWidgetItem

from napari_cytodiffusion._widgets._common import available_devices, load_shared_model
from napari_cytodiffusion._widgets._runner import TaskRunner
from napari_cytodiffusion.core.classes import CLASSES

# Colour-blind-friendly class colours (Okabe-Ito and Tol), one per class in CLASSES order.
CLASS_COLOURS = dict(
    zip(
        CLASSES,
        ("#0072B2", "#E69F00", "#CC79A7", "#D55E00", "#56B4E9", "#009E73", "#F0E442", "#999999"),
        strict=True,
    )
)
NO_LABELS = "(segment the image first)"


class ClassifyWidget(Container):
    """Classify the white cells of a smear (or the central cell of a single-cell image)."""

    def __init__(self, napari_viewer):
        super().__init__()
        self._viewer = napari_viewer
        self._image = ComboBox(label="image", choices=self._image_layers)
        self._labels = ComboBox(
            label="white cells",
            choices=self._labels_layers,
            tooltip="A Labels layer of white cells (from Segment cells); without one the "
            "image is segmented first.",
        )
        self._single = CheckBox(
            text="single-cell image (classify the central cell)",
            tooltip="For PBC / CellaVision-style images centred on one cell.",
        )
        self._model = LineEdit(value="default", label="model", tooltip="registry name or file")
        self._device = ComboBox(label="device", choices=available_devices(), value="auto")
        self._device_used = Label(value="")
        self._strategy = ComboBox(label="strategy", choices=["adaptive", "exhaustive"])
        self._seed = SpinBox(label="seed", value=0, min=0, max=2**31 - 1)
        self._uncertainty = FloatSpinBox(
            label="review if uncertainty >", value=0.12, min=0.0, max=1.0, step=0.01
        )
        self._anomaly = FloatSpinBox(
            label="review if anomaly score >", value=2.2, min=-10.0, max=100.0, step=0.1
        )
        self._run = PushButton(text="Classify")
        self._cancel = PushButton(text="Cancel")
        self._export = PushButton(text="Export CSV…", enabled=False)
        self._legend = Label(value=_legend_html())
        self._summary = QTableWidget(len(CLASSES), 3)
        self._summary.setHorizontalHeaderLabels(["class", "count", "%"])
        self._summary.verticalHeader().setVisible(False)
        self._flagged = QListWidget()
        self._flagged.setToolTip("Cells that need review; click one to centre the view on it.")
        self._flagged.currentRowChanged.connect(self._go_to_flagged)
        self.extend(
            [
                self._image,
                self._labels,
                self._single,
                self._model,
                self._device,
                self._device_used,
                self._strategy,
                self._seed,
                self._uncertainty,
                self._anomaly,
                Container(widgets=[self._run, self._cancel], layout="horizontal", labels=False),
                self._legend,
                self._export,
            ]
        )
        self.native.layout().addWidget(self._summary)
        self.native.layout().addWidget(self._flagged)
        self._runner = TaskRunner(self._run, self._cancel, "Classifying cells")
        self._run.changed.connect(self._start)
        self._export.changed.connect(self._ask_export_path)
        self._uncertainty.changed.connect(self._update_review)
        self._anomaly.changed.connect(self._update_review)
        self.class_layer = None
        self._review_layer = None
        self._thresholds_from_model = False
        self._flagged_rows = []
        for event in (napari_viewer.layers.events.inserted, napari_viewer.layers.events.removed):
            event.connect(lambda *_: self.reset_choices())

    def _image_layers(self, _=None):
        return [layer for layer in self._viewer.layers if isinstance(layer, Image)]

    def _labels_layers(self, _=None):
        layers = [layer for layer in self._viewer.layers if isinstance(layer, Labels)]
        return [NO_LABELS] + [layer for layer in layers if "class" not in layer.metadata]

    def _start(self):
        image = self._image.value
        if image is None:
            show_error("Open a smear image first: Classify works on an RGB image layer.")
            return
        if not image.rgb:
            show_error(
                f"'{image.name}' is not an RGB colour image; blood-smear classification needs "
                "the colour image of the smear."
            )
            return
        labels_layer = None if self._labels.value == NO_LABELS else self._labels.value
        settings = {
            "model": self._model.value.strip() or "default",
            "device": self._device.value,
            "segment": not self._single.value,
            "labels": None if labels_layer is None else np.asarray(labels_layer.data),
            "rbc_diameter": (labels_layer.metadata.get("rbc_diameter") if labels_layer else None),
            "strategy": self._strategy.value,
            "seed": self._seed.value,
            "uncertainty_threshold": self._uncertainty.value,
            "anomaly_threshold": self._anomaly.value,
        }
        data = np.asarray(image.data)
        self._runner.start(
            lambda progress: self._work(data, settings, progress),
            lambda result: self._show(image, labels_layer, result),
        )

    def _work(self, data, settings, progress):
        """Runs in the worker thread: load the model (once) and classify."""
        from napari_cytodiffusion.core.analysis import classify_image

        model = load_shared_model(settings["model"], settings["device"], progress)
        result = classify_image(
            data,
            model,
            segment=settings["segment"],
            labels=settings["labels"],
            rbc_diameter=settings["rbc_diameter"],
            strategy=settings["strategy"],
            seed=settings["seed"],
            uncertainty_threshold=settings["uncertainty_threshold"],
            anomaly_threshold=settings["anomaly_threshold"],
            progress=progress,
        )
        return model, result

    def _show(self, image, labels_layer, outcome):
        """Main thread: turn the result into layers and the summary, all at once."""
        model, result = outcome
        self._device_used.value = f"ran on: {model.device}"
        if not self._thresholds_from_model:
            # Start from the thresholds calibrated with the model; the user may change them.
            self._thresholds_from_model = True
            calibration = model.calibration or {}
            self._uncertainty.value = calibration.get(
                "uncertainty_threshold", self._uncertainty.value
            )
            self._anomaly.value = calibration.get("anomaly_threshold", self._anomaly.value)
        if not result.calls:
            show_info("No white cells were found in this image; nothing to classify.")
            return
        table = result.table()
        labels = _cell_labels(image, labels_layer, result)
        if result.cell_ids == [None]:
            table["index"] = 1  # the single cell is label 1 of its disc
        name = image.name
        placement = {"scale": image.scale[:2], "translate": image.translate[:2]}
        colours = {None: "transparent", 0: "transparent"}
        colours.update(
            {
                int(i): CLASS_COLOURS.get(c, "white")
                for i, c in zip(table["index"], table["label"], strict=True)
            }
        )
        self.class_layer = self._viewer.add_labels(
            labels,
            name=f"{name} classes",
            features=table,
            colormap=_direct_colormap(colours),
            metadata={"class": True, "rbc_diameter": result.rbc_diameter, "model": model.name},
            opacity=0.5,
            **placement,
        )
        uncertainty = _fill(labels, table["index"], table["uncertainty"])
        layer = self._viewer.add_image(
            uncertainty,
            name=f"{name} uncertainty",
            colormap="inferno",
            contrast_limits=(0.0, 1.0),
            opacity=0.6,
            blending="additive",
            visible=False,
            **placement,
        )
        layer.colorbar.visible = True
        self._review_layer = None  # a new result gets its own markers layer
        self._update_review()
        self._show_summary(table, model.classes)
        self._export.enabled = True
        flagged = int(table["needs_review"].sum())
        show_info(f"Classified {len(table)} white cells; {flagged} need review.")

    def _update_review(self, *_):
        """Apply the review thresholds to the last result (no new model runs)."""
        if self.class_layer is None or self.class_layer not in self._viewer.layers:
            return
        table = self.class_layer.features
        table["needs_review"] = (table["uncertainty"] > self._uncertainty.value) | (
            table["anomaly_score"] > self._anomaly.value
        )
        self.class_layer.features = table
        flagged = table[table["needs_review"]]
        points = self._world(flagged[["centroid_row", "centroid_col"]].to_numpy(float))
        size = 2.2 * self.class_layer.metadata["rbc_diameter"] * float(self.class_layer.scale[0])
        reasons = [
            _reason(row, self._uncertainty.value, self._anomaly.value)
            for _, row in flagged.iterrows()
        ]
        review_features = {
            "index": flagged["index"].to_numpy(),
            "label": flagged["label"].to_numpy(),
            "reason": reasons,
        }
        name = self.class_layer.name.replace(" classes", " needs review")
        if self._review_layer is not None and self._review_layer in self._viewer.layers:
            self._viewer.layers.remove(self._review_layer)
        self._review_layer = self._viewer.add_points(
            points.reshape(-1, 2),
            name=name,
            symbol="disc",
            size=size,
            face_color="transparent",
            border_color="red",
            border_width=0.025,
            features=review_features,
        )
        self._flagged_rows = list(
            zip(points.reshape(-1, 2).tolist(), flagged["index"], strict=True)
        )
        self._flagged.clear()
        for (_, cell), reason, label in zip(
            self._flagged_rows, reasons, flagged["label"], strict=True
        ):
            self._flagged.addItem(f"cell {cell}: {label} ({reason})")

    def _world(self, data_points):
        layer = self.class_layer
        return np.asarray(data_points) * np.asarray(layer.scale[:2]) + np.asarray(
            layer.translate[:2]
        )

    def _show_summary(self, table, classes):
        from napari_cytodiffusion.core.analysis import differential_count

        counts = differential_count(table["label"], classes)
        self._summary.setRowCount(len(counts))
        for row, (name, count, percent) in enumerate(counts.itertuples(index=False)):
            for column, text in enumerate((name, str(count), f"{percent:.1f}")):
                self._summary.setItem(row, column, QTableWidgetItem(text))
        self._summary.resizeColumnsToContents()

    def _go_to_flagged(self, row):
        if not 0 <= row < len(self._flagged_rows):
            return
        (r, c), cell = self._flagged_rows[row]
        self._viewer.camera.center = (r, c)
        if self.class_layer is not None:
            self.class_layer.selected_label = int(cell)

    def _ask_export_path(self, *_):
        path, _ = QFileDialog.getSaveFileName(self.native, "Export cell results", "", "CSV (*.csv)")
        if path:
            self.export_csv(path)

    def export_csv(self, path):
        """Write the last result's per-cell table to ``path`` (CSV)."""
        if self.class_layer is None:
            show_error("Nothing to export yet: run Classify first.")
            return
        self.class_layer.features.to_csv(Path(path), index=False)
        show_info(f"Saved {len(self.class_layer.features)} cells to {path}")


def _cell_labels(image, labels_layer, result):
    """The instance labels the class layer shows: given, segmented, or a disc for one cell."""
    if labels_layer is not None:
        return np.asarray(labels_layer.data).copy()
    if result.segmentation is not None:
        return result.segmentation.wbc_labels
    rows, cols = np.asarray(image.data).shape[:2]
    (r, c), radius = result.centres[0], 0.9 * result.rbc_diameter
    yy, xx = np.ogrid[:rows, :cols]
    return (((yy - r) ** 2 + (xx - c) ** 2) <= radius**2).astype(np.uint32)


def _fill(labels, cell_ids, values):
    """Image with every cell's pixels set to its value (NaN-free: 0 outside cells)."""
    lookup = np.zeros(int(labels.max()) + 1, np.float32)
    lookup[np.asarray(cell_ids, int)] = np.asarray(values, np.float32)
    return lookup[labels]


def _direct_colormap(colours):
    from napari.utils.colormaps import DirectLabelColormap

    return DirectLabelColormap(color_dict=colours)


def _reason(row, uncertainty_threshold, anomaly_threshold):
    reasons = []
    if row["uncertainty"] > uncertainty_threshold:
        reasons.append(f"uncertain {row['uncertainty']:.2f}")
    if row["anomaly_score"] > anomaly_threshold:
        reasons.append(f"unusual {row['anomaly_score']:.1f}")
    return ", ".join(reasons)


def _legend_html():
    items = [
        f'<span style="color:{colour}">&#9632;</span> {name.replace("_", " ")}'
        for name, colour in CLASS_COLOURS.items()
    ]
    return "<br>".join(items)
