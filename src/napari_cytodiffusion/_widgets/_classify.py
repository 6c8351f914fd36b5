"""The Classify widget: diffusion classification of every white cell of the open smear.

Adds, all at once when the work is done: a Labels layer outlining each cell in its class's
colour (filled on request; per-cell results in its ``features``, shown on hover), an
uncertainty layer (each cell filled with its uncertainty, with a colour bar) and markers on
the cells that need review. The dock shows the legend, the differential count and the
flagged cells; clicking one centres the view on it.

The white-cell list offers only Labels layers of the chosen image's shape, never a class or
red-cell layer, and picks the white cells that Segment cells made for that image. Running
again on an image brings its earlier result layers up to date instead of adding more; they
are tied to the image and to each other by their metadata (``image_id``, ``shows``), not by
names a person may change.
"""

from pathlib import Path

import numpy as np
from magicgui.widgets import CheckBox, ComboBox, FloatSpinBox, Label, PushButton
from napari.layers import Labels
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QFileDialog,
    QHeaderView,
    QListWidget,
    QTableWidget,
    QTableWidgetItem,
)

from napari_cytodiffusion._widgets._common import (
    Banner,
    DockForm,
    ModelFields,
    RunRow,
    StatusLabel,
    added_unselected,
    camera,
    direct_colormap,
    full_resolution,
    layer_id,
    linked_layer,
    made_for,
    no_smear_message,
    removed_layer,
    result_link,
    review_markers,
    rgb_images,
    select_then_show,
    strategy_field,
    update_or_add,
    update_or_add_in_steps,
)
from napari_cytodiffusion.core.report import (
    class_colours,
    class_labels,
    count_text,
    percent_text,
)

NO_LABELS = "none: segment the image first"
# Rows of the differential table visible without scrolling.
TABLE_ROWS = 8
# Filled classes stay see-through so the cells show; outlines are drawn opaque.
FILL_OPACITY, OUTLINE_OPACITY = 0.5, 1.0
# Cells not yet reviewed by a person are drawn fainter than reviewed ones.
UNREVIEWED_ALPHA = 0.6
NOT_CELL_COLOUR = "#9e9e9e"  # artefact, unknown
# What a review threshold's box shows while it stands for the model's calibrated value.
CALIBRATED = "calibrated"
# Beyond 16 bits napari colours labels only with numba installed, and their colour table
# cannot be filled at once (direct_colormap): larger cell ids are numbered 1, 2, ... instead.
LARGEST_CELL_ID = np.iinfo(np.uint16).max
# Classifications of one run at most while a person keeps editing the image's review.
RUNS_FOR_EDITS = 3


class ReviewThreshold:
    """A review threshold's box: the chosen model's calibrated value until the person sets one.

    The box reads "calibrated" until a run has told the model's value, then shows it rounded
    to the box's decimals; flags use the exact value (0.11767, not 0.12), as the command line
    does, until the person changes the box. Its lowest setting, one step below ``lowest``,
    reads "calibrated" and means the model's value again.
    """

    def __init__(self, label, lowest, highest, step, tooltip):
        self._tooltip = f"{tooltip} '{CALIBRATED}': the model's own, as calibrated."
        self.box = FloatSpinBox(
            label=label,
            value=lowest - step,
            min=lowest - step,
            max=highest,
            step=step,
            tooltip=self._tooltip,
        )
        self.box.native.setSpecialValueText(CALIBRATED)
        self.box.changed.connect(self._set_by_person)
        self.own = False  # the person's value, not the model's
        self.calibrated = None  # the exact value of the model of the last result

    def _set_by_person(self, *_):
        native = self.box.native
        self.own = native.value() != native.minimum()

    def for_run(self):
        """The person's value, or None: the model's calibrated one (exact)."""
        return self.box.value if self.own else None

    def for_review(self):
        """The value the shown result is flagged by: the person's, or its model's (exact)."""
        return self.box.value if self.own or self.calibrated is None else self.calibrated

    def show_calibrated(self, value, shown=True):
        """A run's model calibrated ``value``, ``shown`` (rounded) unless the person set one."""
        self.calibrated = float(value)
        if not shown:
            return
        self.box.tooltip = f"{self._tooltip} This model's: {self.calibrated:.5g}."
        if not self.own:
            with self.box.changed.blocked():
                self.box.value = self.calibrated

    def reset(self):
        """Back to the model's value ("calibrated"), for another model."""
        self.own = False
        self.box.tooltip = self._tooltip
        with self.box.changed.blocked():
            self.box.value = self.box.min


class ClassifyWidget(DockForm):
    """Classify the white cells of a smear (or the central cell of a single-cell image)."""

    def __init__(self, napari_viewer):
        super().__init__()
        self._viewer = napari_viewer
        self._image = ComboBox(
            label="image", choices=self._image_layers, tooltip="The RGB image of the smear."
        )
        self._labels = ComboBox(
            label="white cells",
            choices=self._labels_layers,
            tooltip="Labels layers of the image's shape: by default the white cells Segment "
            "cells made for this image; 'none' segments the image first.",
        )
        self._single = CheckBox(
            text="single-cell image",
            tooltip="Classify only the central cell: for PBC / CellaVision-style images centred "
            "on one cell.",
        )
        self._fields = ModelFields()
        self._device, self._seed = self._fields.device, self._fields.seed
        self._device_used = StatusLabel()
        self._strategy = strategy_field()
        self._thresholds = (
            ReviewThreshold(
                "flag uncertainty >", 0.0, 1.0, 0.01, "Cells more uncertain than this are flagged."
            ),
            ReviewThreshold(
                "flag anomaly >",
                -10.0,
                100.0,
                0.1,
                "Cells less like any known class than this are flagged.",
            ),
        )
        self._uncertainty, self._anomaly = (threshold.box for threshold in self._thresholds)
        self._fill = CheckBox(
            text="fill classes",
            tooltip="Fill each cell with its class colour instead of outlining it.",
        )
        row = RunRow("Classifying cells", "Classify")
        self._run, self._cancel, self._runner = row.buttons[0], row.cancel, row.runner
        self._status = row.status
        self._banner = Banner()
        self._run.tooltip = "Classify every white cell of the image (or its central cell)."
        self._export = PushButton(
            text="Export CSV…", enabled=False, tooltip="Save the per-cell table."
        )
        self._legend = Label(value=legend_html(self._fields.classes()))
        self._legend.tooltip = "Class colours of the class layer."
        self._summary = differential_table()
        self._flagged = flagged_list()
        self._flagged.currentRowChanged.connect(self._go_to_flagged)
        self.add(
            self._image,
            self._labels,
            self._single,
            *self._fields.widgets,
            self._device_used,
            self._strategy,
            self._uncertainty,
            self._anomaly,
            row,
            self._banner,
            self._fill,
            self._legend,
            self._export,
            self._summary,
            self._flagged,
        )
        self._run.changed.connect(self._start)
        self._export.changed.connect(self._ask_export_path)
        self._uncertainty.changed.connect(self._update_review)
        self._anomaly.changed.connect(self._update_review)
        self._fields.model.changed.connect(self._model_changed)
        self._fields.file.changed.connect(self._model_changed)
        self._fill.changed.connect(self._show_fill)
        self._image.changed.connect(self._pick_segmented)
        self._single.changed.connect(self._offer_labels)
        self.class_layer = None
        self._flagged_rows = []
        napari_viewer.layers.events.inserted.connect(self._layer_added)
        napari_viewer.layers.events.removed.connect(lambda *_: self.reset_choices())
        self._pick_segmented()  # docked after Segment cells ran: its white cells

    def _image_layers(self, _=None):
        return rgb_images(self._viewer)

    def _labels_layers(self, _=None):
        """Labels layers that can be white cells of the chosen image: its shape, no class or
        red-cell layers (those Segment cells made for this image are picked by default)."""
        image = self._image.value
        if image is None:
            return [NO_LABELS]
        shape = tuple(image.data.shape[:2])
        usable = [
            layer
            for layer in self._viewer.layers
            if isinstance(layer, Labels)
            and tuple(layer.data.shape) == shape
            and "class" not in layer.metadata
            and layer.metadata.get("cells", "white") == "white"
        ]
        return [NO_LABELS, *usable]

    def _layer_added(self, event):
        self.reset_choices()
        if _segmented_from(event.value, self._image.value):
            self._labels.value = event.value

    def _pick_segmented(self, *_):
        """A new image gets its own white cells from Segment cells, or none."""
        self._labels.reset_choices()
        mine = [c for c in self._labels.choices if _segmented_from(c, self._image.value)]
        self._labels.value = mine[0] if mine else NO_LABELS

    def _offer_labels(self, single):
        """A single-cell image is classified at its centre: no white cells are used."""
        self._labels.enabled = not single

    def _model_changed(self, *_):
        """Another model: its own calibrated thresholds, whatever was set for the last one (a
        threshold means something else on another model's scale); the shown result is
        flagged again by its own model's."""
        for threshold in self._thresholds:
            threshold.reset()
        self._update_review()

    def _show_fill(self, *_):
        layer = self.class_layer
        if layer is not None and layer in self._viewer.layers:
            _style_fill(layer, self._fill.value)

    def _start(self):
        image = self._image.value
        if image is None:
            show_error(no_smear_message(self._viewer, "Classify"))
            return
        if not image.rgb:
            show_error(
                f"'{image.name}' is not an RGB colour image; blood-smear classification needs "
                "the colour image of the smear."
            )
            return
        single = self._single.value
        labels_layer = None if single or self._labels.value == NO_LABELS else self._labels.value
        if labels_layer is not None and labels_layer.data.shape != image.data.shape[:2]:
            show_error(
                f"'{labels_layer.name}' ({labels_layer.data.shape}) is not of the shape of "
                f"'{image.name}' ({image.data.shape[:2]}): choose the image's white cells."
            )
            return
        uncertainty, anomaly = (threshold.for_run() for threshold in self._thresholds)
        settings = {
            "model": self._fields.choice(),
            "segment": not single,
            "labels": None if labels_layer is None else np.asarray(labels_layer.data),
            "rbc_diameter": (labels_layer.metadata.get("rbc_diameter") if labels_layer else None),
            "strategy": self._strategy.value,
            "seed": self._seed.value,
            "uncertainty_threshold": uncertainty,
            "anomaly_threshold": anomaly,
            # A person's corrections saved beside the image are kept over the model's calls.
            "image_path": image_path(image),
            # The class layer is built in the worker (napari takes 0.03-0.04 s for it).
            "layer": {
                "name": f"{image.name} classes",
                "scale": image.scale[:2],
                "translate": image.translate[:2],
                "fill": self._fill.value,
                "source": image.name,
                "image_id": layer_id(image),
            },
        }
        data = full_resolution(image)
        self._banner.say([])
        self._runner.start(
            lambda progress: _work(data, settings, progress),
            lambda result: self._show(image, labels_layer, settings["model"], result),
            text=f"classifying {image.name}",
            removed_input=lambda: removed_layer(self._viewer, image, labels_layer),
        )

    def _show(self, image, labels_layer, choice, outcome):
        """Main thread: add the layers prepared by the worker, one per turn of the event loop
        (see ``_runner``); on an error, the layers this result added are taken away again."""
        model, result, layers = outcome
        from napari_cytodiffusion.core.model.classifier import review_thresholds
        from napari_cytodiffusion.core.model.diffusion import network_precision

        self._device_used.value = f"ran on: {model.device} ({network_precision(model.device)})"
        # Not shown where another model was chosen while this one ran: its boxes are its own.
        shown = choice == self._fields.choice()
        for threshold, value in zip(self._thresholds, review_thresholds(model), strict=True):
            threshold.show_calibrated(value, shown)
        if layers is None:
            self._forget_result()
            self._status.value = (
                "done: no white cells found; the earlier result is no longer listed or exported"
            )
            show_info("No white cells were found in this image; nothing to classify.")
            return
        before = {layer_id(layer) for layer in self._viewer.layers}
        try:
            yield from self._add_result(image, labels_layer, result, layers)
        except Exception:
            self._take_back(before, layers["class_layer"].metadata["image_id"])
            raise

    def _add_result(self, image, labels_layer, result, layers):
        """The steps of :meth:`_show`: an earlier result of this image is brought up to date,
        its layers where they were, as the person left them."""
        new = layers["class_layer"]
        self._legend.value = legend_html(result.classes)
        yield from self._show_classes(new)
        yield from self._show_uncertainty(image, new.metadata["image_id"], layers["uncertainty"])
        if labels_layer is not None and labels_layer in self._viewer.layers:
            labels_layer.visible = False  # its fill would hide the class outlines
        yield from self._show_review(result)

    def _show_uncertainty(self, image, image_id, uncertainty):
        """Steps: the uncertainty layer, new (hidden, with a colour bar) or updated."""
        link = result_link(image_id, "uncertainty")
        new = linked_layer(self._viewer, "image", link) is None
        layer = yield from update_or_add_in_steps(
            self._viewer,
            "image",
            uncertainty,
            f"{image.name} uncertainty",
            None,
            {"source": image.name, **link},
            link=link,
            colormap="inferno",
            contrast_limits=(0.0, 1.0),
            opacity=0.6,
            blending="additive",
            visible=False,
            scale=image.scale[:2],
            translate=image.translate[:2],
        )
        if new:
            layer.colorbar.visible = True  # its visual takes napari 0.03 s: a turn of its own
            yield

    def _show_review(self, result):
        """Steps: the review markers, the differential, the flagged list and the status."""
        new_markers = review_markers(self._viewer, self.class_layer) is None
        with added_unselected(self._viewer):
            markers = self._update_review(hidden=True)
        show_differential(self._summary, result.differential())
        self._export.enabled = True
        table = self.class_layer.features
        flagged = int(table["needs_review"].sum())
        self._status.value = f"done: {count_text(len(table), 'white cell')}, {flagged} to review"
        self._banner.say(result.warnings())  # the image as a whole, not only per-cell flags
        show_info(f"Classified {count_text(len(table), 'white cell')}; {flagged} to review.")
        if new_markers:
            # A new points layer's first draw (its shaders, compiled in software here) takes
            # napari about 0.06 s: in a turn of its own, after the 0.05 s of adding it.
            yield
            yield from select_then_show(self._viewer, markers)

    def _show_classes(self, new):
        """Steps: the classes layer ``new`` added, or the earlier run's classes layer of its
        image given its cells, colours, features and metadata, where it is and as visible.

        Updated in place, not replaced: napari collects all garbage whenever a layer is
        removed (a full ``gc.collect()``, 0.2-0.3 s on this CPU). *Annotate cells* begins the
        layer's review and Undo afresh when its cells are replaced (its ``data`` event), so
        set last, once the features and metadata it reads are the new ones. An earlier layer
        of another shape (the image's pixels were changed) is replaced."""
        link = result_link(new.metadata["image_id"], "classes")
        earlier = linked_layer(self._viewer, "labels", link)
        if earlier is not None and earlier.data.shape == new.data.shape:
            earlier.metadata = dict(new.metadata)
            earlier.features = new.features
            earlier.colormap = new.colormap
            earlier.data = new.data
            self.class_layer = earlier
            earlier.events.features.connect(self._recount)  # once: napari ignores a repeat
            self._show_fill()
            yield
            return
        with added_unselected(self._viewer):
            self._viewer.add_layer(new)
        self.class_layer = new
        new.events.features.connect(self._recount)
        self._show_fill()  # in case Fill was toggled while the work ran
        yield
        yield from select_then_show(self._viewer, new)
        if earlier is not None:
            # Of another shape (the image's pixels were changed): it shows cells of no image
            # and, left, would be found again by the next run instead of this one.
            self._viewer.layers.remove(earlier)
            yield

    def _take_back(self, before, image_id):
        """After an error while the result was shown: remove the layers of ``image_id`` it
        added (those whose id is not in ``before``), and forget the result."""
        added = [
            layer.name
            for layer in self._viewer.layers
            if layer_id(layer) not in before and layer.metadata.get("image_id") == image_id
        ]
        for name in added:
            self._viewer.layers.remove(name)
        self._forget_result()

    def _forget_result(self):
        """The dock no longer shows, lists or exports a result."""
        self.class_layer = None
        self._summary.setRowCount(0)
        self._flagged_rows = []
        self._flagged.clear()
        self._export.enabled = False

    def _recount(self, event):
        """The differential of the shown classes layer again, after a person corrected its
        calls (Annotate cells)."""
        layer = self.class_layer
        if event.source is not layer:
            return  # an earlier run's layer
        from napari_cytodiffusion.core.tasks.classify import differential_count

        counts = differential_count(layer.features["label"], layer.metadata["classes"])
        show_differential(self._summary, counts)

    def _update_review(self, *_, hidden=False):
        """Apply the review thresholds to the last result (no new model runs): its
        ``needs_review`` and ``why`` as the classifier gives them, and the review markers'
        layer (added ``hidden`` when new)."""
        layer = self.class_layer
        if layer is None or layer not in self._viewer.layers:
            return None
        limits = (*(threshold.for_review() for threshold in self._thresholds), 1.0)
        table = with_review(layer.features, limits)
        layer.features = table
        flagged = table[table["needs_review"]]
        points = self._world(flagged[["centroid_row", "centroid_col"]].to_numpy(float))
        size = 2.2 * layer.metadata["rbc_diameter"] * float(layer.scale[0])
        reasons = [_reason(row, *limits[:2]) for _, row in flagged.iterrows()]
        review_features = {
            "index": flagged["index"].to_numpy(),
            "label": flagged["label"].to_numpy(),
            "reason": reasons,
        }
        # The markers of this classes layer, found by what they record, whatever either is
        # named. A new threshold moves them in place (0.03 s; a new layer stalled the viewer
        # 0.34 s), every ring red again, as Annotate cells hides reviewed ones.
        source = layer.metadata.get("source")
        link = result_link(layer.metadata.get("image_id", ""), "needs review")
        markers = update_or_add(
            self._viewer,
            "points",
            points.reshape(-1, 2),
            f"{source} needs review",
            review_features,
            {"source": source, **link},
            link=link,
            symbol="disc",
            size=size,
            face_color="transparent",
            border_color="red",
            border_width=0.025,
            visible=not hidden,
        )
        self._flagged_rows = list(
            zip(points.reshape(-1, 2).tolist(), flagged["index"], strict=True)
        )
        self._flagged.clear()
        for (_, cell), reason, label in zip(
            self._flagged_rows, reasons, flagged["label"], strict=True
        ):
            self._flagged.addItem(f"cell {cell}: {label} ({reason})")
        return markers

    def _world(self, data_points):
        layer = self.class_layer
        return np.asarray(data_points) * np.asarray(layer.scale[:2]) + np.asarray(
            layer.translate[:2]
        )

    def _go_to_flagged(self, row):
        if not 0 <= row < len(self._flagged_rows):
            return
        (r, c), cell = self._flagged_rows[row]
        camera(self._viewer).center = (r, c)
        if self.class_layer is not None:
            self.class_layer.selected_label = int(cell)

    def _ask_export_path(self, *_):
        path, _ = QFileDialog.getSaveFileName(self.native, "Export cell results", "", "CSV (*.csv)")
        if path:
            self.export_csv(path)

    def export_csv(self, path):
        """Write the last result's per-cell table to ``path`` (CSV, written atomically: a
        failed export leaves an earlier file there as it was)."""
        if self.class_layer is None:
            show_error("Nothing to export yet: run Classify first.")
            return
        from napari_cytodiffusion.core.io import atomic_write

        try:
            with atomic_write(Path(path)) as temporary:
                self.class_layer.features.to_csv(temporary, index=False)
        except OSError as error:  # no such folder, a folder's path, no permission, disk full
            reason = error.strerror or str(error)
            show_error(f"Could not export the cells to {path}: {reason}.")
            self._status.value = f"export failed: {reason}"
            return
        show_info(f"Saved {len(self.class_layer.features)} cells to {path}")


def _work(data, settings, progress):
    """Worker thread: load the model (once), classify, and prepare the layers' data, so the
    main thread only adds them."""
    from napari_cytodiffusion.core.tasks.classify import classify

    model = settings["model"].load(progress)
    path = settings["image_path"] if settings["segment"] else None
    for _ in range(RUNS_FOR_EDITS):
        annotations = _annotations(path)
        result = classify(
            np.asarray(data),
            model,
            segment=settings["segment"],
            labels=settings["labels"],
            rbc_diameter=settings["rbc_diameter"],
            strategy=settings["strategy"],
            seed=settings["seed"],
            uncertainty_threshold=settings["uncertainty_threshold"],
            anomaly_threshold=settings["anomaly_threshold"],
            annotations=annotations,
            progress=progress,
        )
        # A person who edited the review in Annotate cells meanwhile (saved to the sidecar)
        # would see the edited cells as not reviewed in this result: classified again with it.
        if _annotations(path) == annotations:
            break
    if not result.calls:
        return model, result, None
    table = result.table()
    labels = result.cell_labels()
    if labels.max() > LARGEST_CELL_ID:
        labels, table = numbered_from_one(labels, table)
    elif settings["labels"] is not None:
        labels = labels.copy()  # the class layer must not share the user's labels
    colours = {None: "transparent", 0: "transparent"}
    colours.update(cell_colours(table, result.classes))
    layers = {
        "class_layer": _class_layer(labels, table, colours, model, result, settings),
        "uncertainty": _fill(labels, table["index"], table["uncertainty"]),
    }
    return model, result, layers


def _annotations(image_path):
    """The review saved beside ``image_path`` (None: no file, or none saved)."""
    if image_path is None:
        return None
    from napari_cytodiffusion.core.annotations import load_annotations

    return load_annotations(image_path)


def _class_layer(labels, table, colours, model, result, settings):
    """The classes layer, outlined or filled as the Fill box was at the start."""
    from napari.layers import Labels

    wanted = settings["layer"]
    layer = Labels(
        labels,
        name=wanted["name"],
        features=table,
        colormap=direct_colormap(colours, labels.dtype),
        metadata={
            "class": True,
            "rbc_diameter": result.rbc_diameter,
            "model": model.name,
            "classes": result.classes,
            "image_size": model.image_size,
            # Outlines a sixteenth of a red cell wide: visible without hiding the cell.
            "contour": max(1, int(round(result.rbc_diameter / 16))),
            "source": wanted["source"],
            "path": settings["image_path"],
            **result_link(wanted.get("image_id"), "classes"),
        },
        scale=wanted["scale"],
        translate=wanted["translate"],
        visible=False,  # shown a step after it is added (see update_or_add_in_steps)
    )
    _style_fill(layer, wanted["fill"])
    return layer


def _style_fill(layer, fill):
    """Filled cells or outlines; only what changes is set (each change redraws the layer)."""
    contour = 0 if fill else layer.metadata["contour"]
    opacity = FILL_OPACITY if fill else OUTLINE_OPACITY
    if layer.contour != contour:
        layer.contour = contour
    if layer.opacity != opacity:
        layer.opacity = opacity


def image_path(layer):
    """The file an image layer was opened from, or None (made in memory, a sample)."""
    path = getattr(layer.source, "path", None)
    return str(path) if path else None


def cell_colours(table, classes):
    """{cell index: colour}: each cell in the colour of its call (the person's where given);
    reviewed cells opaque, the others translucent, so review progress shows at a glance."""
    from napari.utils.colormaps.standardize_color import transform_color

    palette = class_colours(classes)
    reviewed = table["annotated"] != "" if "annotated" in table else [False] * len(table)
    colours = {}
    for index, label, done in zip(table["index"], table["label"], reviewed, strict=True):
        rgba = transform_color(palette.get(label, NOT_CELL_COLOUR))[0].copy()
        rgba[3] = 1.0 if done else UNREVIEWED_ALPHA
        colours[int(index)] = rgba
    return colours


def _segmented_from(layer, image):
    """Whether ``layer`` holds the white cells Segment cells made for ``image`` (see
    :func:`made_for`; not a classes layer, nor a grid's tiles)."""
    return made_for(layer, image) and not {"class", "tiles"} & layer.metadata.keys()


def differential_table():
    """The dock's differential count: class, count and per cent, eight rows in view."""
    table = QTableWidget(0, 3)
    table.setHorizontalHeaderLabels(["class", "count", "%"])
    table.verticalHeader().setVisible(False)
    table.setToolTip(
        "The differential count of the last run, per 100 leukocytes (erythroblasts, "
        "platelets and smudge cells are counted per 100 leukocytes, not among them)."
    )
    table.setMinimumHeight(_rows_height(table, TABLE_ROWS))
    # All three columns in the dock's width: the class names give way (elided), not the
    # counts, and no sideways scrolling.
    header = table.horizontalHeader()
    header.setSectionResizeMode(0, QHeaderView.Stretch)
    for column in (1, 2):
        header.setSectionResizeMode(column, QHeaderView.ResizeToContents)
    table.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
    table.setTextElideMode(Qt.ElideMiddle)
    return table


def show_differential(table, counts):
    """Fill a :func:`differential_table` with ``counts`` (see ``differential_count``)."""
    table.setRowCount(len(counts))
    rows = counts.itertuples(index=False, name=None)
    # As in the HTML report: a star marks the classes counted per 100 leukocytes but not
    # among them, whose per cent is not part of the 100.
    shown = class_labels(counts)
    for row, (name, count, percent, in_differential) in enumerate(rows):
        for column, text in enumerate((shown[row], str(count), percent_text(percent))):
            item = QTableWidgetItem(text)
            item.setToolTip(
                name
                if in_differential
                else f"{name}: per 100 leukocytes; not one of them (not in the 100 %)."
            )
            table.setItem(row, column, item)


def flagged_list():
    """The dock's list of cells to review; a click on one is the widget's to handle."""
    flagged = QListWidget()
    flagged.setToolTip("Cells that need review; click one to centre the view on it.")
    flagged.setMinimumHeight(_rows_height(flagged, 4))
    return flagged


def _rows_height(view, rows):
    """Height of a table or list showing ``rows`` rows and its header."""
    header = view.horizontalHeader().sizeHint().height() if hasattr(view, "horizontalHeader") else 0
    row = view.verticalHeader().defaultSectionSize() if hasattr(view, "verticalHeader") else 0
    row = row or view.fontMetrics().height() + 6
    return header + rows * row + 2 * view.frameWidth() + 2


def _fill(labels, cell_ids, values):
    """Image with every cell's pixels set to its value (NaN-free: 0 outside cells)."""
    lookup = np.zeros(int(labels.max()) + 1, np.float32)
    lookup[np.asarray(cell_ids, int)] = np.asarray(values, np.float32)
    return lookup[labels]


def with_review(table, limits):
    """``table`` (a classes layer's features) with ``needs_review`` and ``why`` for the
    review thresholds ``limits`` (uncertainty, anomaly, domain shift in its units), as the
    classifier and the command line give them (``review_reasons``): a cell a person has
    called needs no more review, and has no reasons."""
    from napari_cytodiffusion.core.model.classifier import review_reasons

    scores = table.reindex(columns=["uncertainty", "anomaly_score", "domain_shift", "size_ratio"])
    reviewed = table["annotated"] != "" if "annotated" in table else np.zeros(len(table), bool)
    why = [
        "" if done else "; ".join(review_reasons(u, a, shift, limits, size_ratio=size))
        for (u, a, shift, size), done in zip(scores.itertuples(index=False), reviewed, strict=True)
    ]
    table = table.copy()
    table["why"] = why
    table["needs_review"] = [bool(reasons) for reasons in why]
    return table


def numbered_from_one(labels, table):
    """``labels`` with their cells numbered 1, 2, ... (uint16 where they fit) and ``table``
    with ``index`` following them; the cells' own ids in ``original_index``, after it."""
    from skimage.segmentation import relabel_sequential

    numbered, forward, _ = relabel_sequential(labels)
    dtype = np.promote_types(np.uint16, np.min_scalar_type(int(numbered.max())))
    table = table.copy()
    table.insert(1, "original_index", table["index"])
    table["index"] = forward[np.array(table["index"])].astype(int)  # (a writable copy)
    return numbered.astype(dtype), table


def _reason(row, uncertainty_threshold, anomaly_threshold):
    from napari_cytodiffusion.core.model.classifier import review_reasons

    limits = (uncertainty_threshold, anomaly_threshold, 1.0)  # domain shift: in its units
    shift, size = row.get("domain_shift", np.nan), row.get("size_ratio", np.nan)
    reasons = review_reasons(
        row["uncertainty"], row["anomaly_score"], shift, limits, with_scores=True, size_ratio=size
    )
    return "; ".join(reasons)


def legend_html(classes):
    items = [
        f'<span style="color:{colour}">&#9632;</span> {name.replace("_", " ")}'
        for name, colour in class_colours(classes).items()
    ]
    return "<br>".join(items)
