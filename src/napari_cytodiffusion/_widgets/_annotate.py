"""The Annotate cells widget: a person reviews and corrects the calls of a classes layer.

Works on the classes layer that Classify cells made. Click a cell (pan/zoom mode) to select
it, then give it a class from the list or with keys 1-9, or one the model lacks (New class:
blast, say, which Export cells and Adapt turn into a class), or mark it artefact / unknown;
delete a false detection; paint a missed cell and add it; undo. The person's label sits in
the layer's ``features`` beside the model's (``annotated`` beside ``predicted``); reviewed
cells are drawn opaque and marked. Every change is saved at once, atomically, beside the
image (``<image>.annotations.json``), which Classify cells, ``classify`` and ``analyze``
read again. *Export cells* writes the reviewed cells as a dataset for Train / Adapt, in a
worker (progress, Cancel).
"""

from contextlib import suppress
from pathlib import Path

import numpy as np
from magicgui.widgets import ComboBox, FileEdit, PushButton
from napari.layers import Labels
from napari.utils.notifications import show_error, show_info

from napari_cytodiffusion._widgets._classify import cell_colours
from napari_cytodiffusion._widgets._common import (
    DockForm,
    RunRow,
    StatusLabel,
    bind_labelling,
    camera,
    direct_colormap,
    full_resolution,
    new_class_fields,
    new_class_name,
)
from napari_cytodiffusion.core.annotations import ARTEFACT, DELETED, UNKNOWN

NO_LAYER = "none: classify the image first"
UNDO_DEPTH = 50


class AnnotateWidget(DockForm):
    """Review, correct and save the calls of a classes layer."""

    def __init__(self, napari_viewer):
        super().__init__()
        self._viewer = napari_viewer
        self._undo = []
        # Each classes layer's share of its image's sidecar (core.annotations.LayerReview),
        # by layer: a save keeps the entries a layer does not stand for.
        self._reviews = {}
        self._unbind = None  # takes the clicks and keys off the layer they are bound to
        self._layer = ComboBox(
            label="classes layer",
            choices=self._class_layers,
            tooltip="The classes layer made by Classify cells for the smear.",
        )
        self._class = ComboBox(label="class", choices=self._choices, tooltip="Keys 1-9 also.")
        self._set = PushButton(
            text="Set class", tooltip="Give the selected cell the class above (keys 1-9)."
        )
        self._artefact = PushButton(
            text="Artefact",
            tooltip="Not a white cell (debris, a stain deposit); left out of counts.",
        )
        self._unknown = PushButton(
            text="Unknown", tooltip="A white cell of no class the model knows; left out of counts."
        )
        self._new_class, self._set_new = new_class_fields()
        self._delete = PushButton(
            text="Delete cell", tooltip="Remove a false detection; it stays removed when re-run."
        )
        self._paint = PushButton(
            text="Paint a missed cell", tooltip="Switch to the brush with a new cell number."
        )
        self._add = PushButton(
            text="Add painted cell", tooltip="Add the painted cell with the class above."
        )
        self._next = PushButton(
            text="Next flagged (N)", tooltip="Centre and select the next flagged cell not reviewed."
        )
        self._undo_button = PushButton(text="Undo (U)", tooltip="Take back the last change.")
        self._dataset = FileEdit(
            label="export to",
            mode="d",
            tooltip="Where Export cells writes class folders (the layout Train and Adapt read).",
        )
        export_row = RunRow("Exporting cells", "Export cells")
        self._export, self._export_status = export_row.buttons[0], export_row.status
        self._export.tooltip = (
            "Write the reviewed cells as the classifier crops them, with a manifest."
        )
        self._export_runner = export_row.runner
        self._status = StatusLabel("select a cell: click it (pan/zoom mode)")
        self._counter = StatusLabel("")
        self.add(
            self._layer,
            self._class,
            self._set,
            self._artefact,
            self._unknown,
            self._new_class,
            self._set_new,
            self._delete,
            self._paint,
            self._add,
            self._next,
            self._undo_button,
            self._counter,
            self._status,
            self._dataset,
            export_row,
        )
        self._set.changed.connect(lambda *_: self.set_label(self._class.value))
        self._artefact.changed.connect(lambda *_: self.set_label(ARTEFACT))
        self._unknown.changed.connect(lambda *_: self.set_label(UNKNOWN))
        self._set_new.changed.connect(lambda *_: self.set_new_class(self._new_class.value))
        self._delete.changed.connect(lambda *_: self.delete_cell())
        self._paint.changed.connect(lambda *_: self.start_painting())
        self._add.changed.connect(lambda *_: self.add_painted_cell())
        self._next.changed.connect(lambda *_: self.next_flagged())
        self._undo_button.changed.connect(lambda *_: self.undo())
        self._export.changed.connect(lambda *_: self.export(self._dataset.value))
        self._layer.changed.connect(self._attach)
        for event in (napari_viewer.layers.events.inserted, napari_viewer.layers.events.removed):
            event.connect(lambda *_: self.reset_choices())
        self._attach(self._layer.value)

    # ------------------------------------------------------------------ choices and binding

    def _class_layers(self, _=None):
        found = [
            layer
            for layer in self._viewer.layers
            if isinstance(layer, Labels) and layer.metadata.get("class")
        ]
        return found or [NO_LAYER]

    @property
    def layer(self):
        value = self._layer.value
        return value if isinstance(value, Labels) else None

    def _classes(self):
        """The model's classes, then those a person added (such as blast)."""
        from napari_cytodiffusion.core.tasks.classify import with_new_classes

        layer = self.layer
        if layer is None:
            return ()
        labels = layer.features["label"] if "label" in layer.features else ()
        return with_new_classes(labels, layer.metadata.get("classes", ()))

    def _choices(self, _=None):
        return list(self._classes()) or ["(no classes layer)"]

    def _attach(self, layer):
        """Bind keys and clicks to the chosen classes layer (and only to it)."""
        if self._unbind is not None:
            self._unbind()
        self._unbind = None
        self._undo.clear()
        if not isinstance(layer, Labels):
            return
        self._class.reset_choices()
        features = layer.features
        for column, default in (("annotated", ""), ("predicted", None), ("added", False)):
            if column not in features:
                features[column] = features["label"] if default is None else default
        layer.features = features
        self._begin_review(layer)
        self._unbind = bind_labelling(layer, self._classes(), self)
        self._redraw()

    # ------------------------------------------------------------------------ actions

    def select(self, cell):
        """Make ``cell`` (a label value) the cell the next action applies to."""
        layer = self.layer
        row = self._row(cell)
        if layer is None or row is None:
            return
        layer.selected_label = cell
        features = layer.features.loc[row]
        human = features["annotated"] or "not reviewed"
        self._status.value = f"cell {cell}: model {features['predicted']}, person {human}"

    def set_label(self, label):
        """Give the selected cell the class (or artefact / unknown) ``label``."""
        row = self._selected_row()
        if row is None:
            return
        self._remember()
        layer = self.layer
        features = layer.features
        features.loc[row, "annotated"] = label
        features.loc[row, "label"] = label
        if "needs_review" in features:
            features.loc[row, "needs_review"] = False
        layer.features = features
        self._changed(f"cell {layer.selected_label}: {label}")

    def set_new_class(self, name):
        """Give the selected cell a class the model does not have (``name``, such as blast)."""
        label = new_class_name(name)
        if label is not None:
            self.set_label(label)

    def delete_cell(self):
        """Remove the selected cell (a false detection); it stays deleted when re-segmented."""
        row = self._selected_row()
        if row is None:
            return
        layer = self.layer
        cell = int(layer.selected_label)
        pixels = np.nonzero(layer.data == cell)
        self._remember(pixels, cell)
        layer.data[pixels] = 0
        features = layer.features
        features.loc[row, ["annotated", "label"]] = DELETED
        if "needs_review" in features:
            features.loc[row, "needs_review"] = False
        layer.features = features
        layer.refresh()
        self._changed(f"cell {cell} deleted")

    def start_painting(self):
        """Switch the layer to painting a new cell (a label value no cell has)."""
        layer = self.layer
        if layer is None:
            show_error("Choose a classes layer first: Classify cells makes one.")
            return
        layer.selected_label = int(max(layer.data.max(), layer.features["index"].max())) + 1
        layer.brush_size = max(3, int(layer.metadata.get("rbc_diameter", 20) / 3))
        layer.mode = "paint"
        self._status.value = "paint the missed cell, then press Add painted cell"

    def add_painted_cell(self):
        """Register the painted cell with the chosen class."""
        layer = self.layer
        if layer is None:
            return
        cell = int(layer.selected_label)
        pixels = np.nonzero(layer.data == cell)
        if self._row(cell) is not None or not len(pixels[0]):
            show_error("Paint a new cell first (Paint a missed cell), then add it.")
            return
        self._remember(pixels, 0)
        row = {column: np.nan for column in layer.features.columns}
        row.update(
            index=cell,
            label=self._class.value,
            predicted="",
            annotated=self._class.value,
            added=True,
            needs_review=False,
            centroid_row=float(pixels[0].mean()),
            centroid_col=float(pixels[1].mean()),
        )
        features = layer.features
        features.loc[len(features)] = row
        layer.features = features
        layer.mode = "pan_zoom"
        self._changed(f"cell {cell} added as {self._class.value}")

    def next_flagged(self):
        """Centre the next flagged cell nobody has reviewed, and select it."""
        layer = self.layer
        if layer is None:
            return
        features = layer.features
        todo = features[features.get("needs_review", False) & (features["annotated"] == "")]
        if not len(todo):
            self._status.value = "no flagged cell left to review"
            return
        later = todo[todo["index"] > layer.selected_label]
        row = (later if len(later) else todo).iloc[0]
        centre = np.array([row["centroid_row"], row["centroid_col"]], float)
        camera(self._viewer).center = tuple(centre * layer.scale[:2] + layer.translate[:2])
        self.select(int(row["index"]))

    def undo(self):
        """Take back the last change."""
        layer = self.layer
        if layer is None or not self._undo:
            self._status.value = "nothing to undo"
            return
        features, pixels, value = self._undo.pop()
        if pixels is not None:
            layer.data[pixels] = value
            layer.refresh()
        layer.features = features
        self._changed("undone")

    def export(self, folder):
        """Write the reviewed cells of the layer as a class-folder dataset in ``folder``, in a
        worker; returns the worker, or None if refused. The counts end in the status line."""
        layer = self.layer
        image = self._image()
        if layer is None or image is None or not str(folder) or str(folder) == ".":
            show_error("Choose the classes layer and a dataset folder first.")
            return None
        # Copies: the person may go on annotating while the cells are written.
        arguments = (
            full_resolution(image),  # read in the worker
            np.array(layer.data),
            layer.features.copy(),
            folder,
            layer.metadata["image_size"],
            _source_name(layer.metadata.get("path"), image.name),
            layer.metadata.get("rbc_diameter"),
        )

        def work(progress):
            from napari_cytodiffusion.core.annotations import export_cells

            image, *rest = arguments
            return export_cells(np.asarray(image), *rest, progress=progress)

        def done(written):
            text = ", ".join(f"{name} {count}" for name, count in sorted(written.items()))
            self._export_status.value = (
                f"exported {sum(written.values())} cells to {folder}: {text}"
            )
            show_info(self._export_status.value)

        return self._export_runner.start(work, done, text=f"exporting cells to {folder}")

    # ----------------------------------------------------------------------- plumbing

    def _row(self, cell):
        layer = self.layer
        if layer is None:
            return None
        rows = np.flatnonzero(layer.features["index"].to_numpy() == cell)
        return int(layer.features.index[rows[0]]) if len(rows) else None

    def _selected_row(self):
        layer = self.layer
        if layer is None:
            show_error("Choose a classes layer first: Classify cells makes one.")
            return None
        row = self._row(int(layer.selected_label))
        if row is None:
            show_error("Select a cell first: click it in pan/zoom mode.")
        return row

    def _remember(self, pixels=None, value=0):
        self._begin_review(self.layer)
        self._undo.append((self.layer.features.copy(), pixels, value))
        del self._undo[:-UNDO_DEPTH]

    def _image(self):
        source = self.layer.metadata.get("source") if self.layer is not None else None
        return self._viewer.layers[source] if source in self._viewer.layers else None

    def _changed(self, text):
        self._class.reset_choices()  # a class a person added (or undid) is listed, or not
        self._redraw()
        saved = self._save()
        self._status.value = f"{text}; {saved}"

    def _begin_review(self, layer):
        """Take the layer's share of its sidecar before its first change (a deleted cell is
        no longer there to find its entries on); a damaged sidecar is reported on saving."""
        from napari_cytodiffusion.core.annotations import AnnotationError

        with suppress(AnnotationError):
            self._review(layer)

    def _review(self, layer):
        """The layer's :class:`~napari_cytodiffusion.core.annotations.LayerReview`, begun
        from its image's sidecar the first time (None for an image without a file).

        Raises
        ------
        AnnotationError
            If the sidecar is damaged or of another image.
        """
        from napari_cytodiffusion.core.annotations import begin_review, load_annotations

        path = layer.metadata.get("path") if layer is not None else None
        if not path:
            return None
        if layer.unique_id not in self._reviews:
            stored = load_annotations(path)
            self._reviews[layer.unique_id] = begin_review(
                stored, layer.features, np.asarray(layer.data)
            )
        return self._reviews[layer.unique_id]

    def _save(self):
        from napari_cytodiffusion.core.annotations import AnnotationError, save_review

        layer = self.layer
        path = layer.metadata.get("path")
        if not path:
            return "not saved: the image has no file (export the cells instead)"
        try:
            review = self._review(layer)
            saved, review = save_review(path, layer.features, np.asarray(layer.data), review)
            # Kept once saved: after a failed save the next one merges with the file as it is.
            self._reviews[layer.unique_id] = review
        except (OSError, AnnotationError) as error:
            show_error(f"Could not save the annotations beside {path}: {error}")
            return "NOT saved"
        return f"saved to {saved.name}"

    def _redraw(self):
        """Colours (reviewed cells opaque), reviewed markers and the counter."""
        layer = self.layer
        features = layer.features
        colours = {None: "transparent", 0: "transparent"}
        colours.update(cell_colours(features, self._classes()))
        layer.colormap = direct_colormap(colours, np.asarray(layer.data).dtype)
        reviewed = features[(features["annotated"] != "") & (features["annotated"] != DELETED)]
        self._show_markers(layer, reviewed)
        self._hide_reviewed_flags(layer, features)
        flagged = features.get("needs_review", False) & (features["annotated"] == "")
        cells = int((features["annotated"] != DELETED).sum())
        self._counter.value = (
            f"{len(reviewed)} of {cells} cells reviewed; {int(np.sum(flagged))} flagged left"
        )

    def _hide_reviewed_flags(self, layer, features):
        """The review markers Classify cells added stay only on cells still to review."""
        name = layer.name.replace(" classes", " needs review")
        flags = self._viewer.layers[name] if name in self._viewer.layers else None
        if flags is None or "index" not in flags.features or not len(flags.data):
            return
        done = set(features.loc[features["annotated"] != "", "index"].astype(int))
        reviewed = flags.features["index"].astype(int).isin(done).to_numpy()
        # Reviewed cells' rings turn transparent: napari draws every 2-D point whatever its
        # ``shown`` says.
        colours = np.tile([1.0, 0.0, 0.0, 1.0], (len(reviewed), 1))
        colours[reviewed, 3] = 0.0
        flags.border_color = colours

    def _show_markers(self, layer, reviewed):
        name = layer.name.replace(" classes", " reviewed")
        points = reviewed[["centroid_row", "centroid_col"]].to_numpy(float).reshape(-1, 2)
        size = 0.5 * layer.metadata.get("rbc_diameter", 20)
        if name in self._viewer.layers:
            markers = self._viewer.layers[name]
            markers.data = points
            return
        self._viewer.add_points(
            points,
            name=name,
            symbol="square",
            size=size,
            face_color="white",
            border_color="black",
            scale=layer.scale[:2],
            translate=layer.translate[:2],
        )
        self._viewer.layers.selection.active = layer


def _source_name(path, name):
    """What a crop records as its source: the smear's full path (smears of one name in two
    folders stay apart), or the layer's name for an image that has no file."""
    return str(Path(path).resolve()) if path else name
