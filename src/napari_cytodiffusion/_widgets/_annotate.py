"""The Annotate cells widget: a person reviews and corrects the calls of a classes layer.

Works on the classes layer that Classify cells made. Click a cell (pan/zoom mode) to select
it, then give it a class from the list or with keys 1-9, or one the model lacks (New class:
blast, say, which Export cells and Adapt turn into a class), or mark it artefact / unknown;
delete a false detection, and restore a cell deleted by mistake (click where it was, in this
session or an earlier one); paint a missed cell and add it; undo. The person's label sits in
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
    image_of,
    layer_id,
    linked_layer,
    new_class_fields,
    new_class_name,
    result_link,
    review_markers,
)
from napari_cytodiffusion.core.annotations import (
    ARTEFACT,
    DELETED,
    UNKNOWN,
    decode_mask,
    earlier_call,
    encode_mask,
    restorable_deletions,
    restore_deletions,
    restored_values,
)

NO_LAYER = "none: classify the image first"
UNDO_DEPTH = 50


class AnnotateWidget(DockForm):
    """Review, correct and save the calls of a classes layer."""

    def __init__(self, napari_viewer):
        super().__init__()
        self._viewer = napari_viewer
        self._undo = []
        # Each classes layer's share of its image's sidecar (core.annotations.LayerReview),
        # by layer: a save keeps the entries a layer does not stand for. Dropped with the
        # layer (_forget_removed).
        self._reviews = {}
        self._unbind = None  # takes the clicks and keys off the layer they are bound to
        self._clicked = None  # the empty place last clicked: where Restore deleted looks
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
        self._restore = PushButton(
            text="Restore deleted",
            tooltip="Bring back the deleted cell where you last clicked (pan/zoom mode), "
            "deleted now or in an earlier session; it stays back when re-run.",
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
            self._restore,
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
        self._restore.changed.connect(lambda *_: self.restore_deleted())
        self._paint.changed.connect(lambda *_: self.start_painting())
        self._add.changed.connect(lambda *_: self.add_painted_cell())
        self._next.changed.connect(lambda *_: self.next_flagged())
        self._undo_button.changed.connect(lambda *_: self.undo())
        self._export.changed.connect(lambda *_: self.export(self._dataset.value))
        self._layer.changed.connect(self._attach)
        for event in (napari_viewer.layers.events.inserted, napari_viewer.layers.events.removed):
            event.connect(lambda *_: self.reset_choices())
        # A bound method: napari holds it weakly, so it does not keep a closed widget alive.
        napari_viewer.layers.events.removed.connect(self._forget_removed)
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
        self._clicked = None
        if not isinstance(layer, Labels):
            return
        self._class.reset_choices()
        features = layer.features
        for column, default in (("annotated", ""), ("predicted", None), ("added", False)):
            if column not in features:
                features[column] = features["label"] if default is None else default
        layer.features = features
        self._begin_review(layer)
        unbind_keys, unwatch = bind_labelling(layer, self._classes(), self), self._watch(layer)
        layer.events.data.connect(self._cells_replaced)

        def unbind():
            unbind_keys()
            unwatch()
            layer.events.data.disconnect(self._cells_replaced)

        self._unbind = unbind
        self._redraw()

    def _watch(self, layer):
        """Remember the empty place a person clicks on ``layer`` (pan/zoom mode), where
        Restore deleted looks, and say whether a deleted cell is there. Returns a function
        that takes the click off the layer again."""

        def clicked(layer, event):
            if layer.mode != "pan_zoom":
                return
            self._clicked = None
            if not layer.get_value(event.position, world=True):
                self._clicked = np.asarray(layer.world_to_data(event.position), float)[-2:]
                self._tell_deleted(layer, self._clicked)

        layer.mouse_drag_callbacks.append(clicked)

        def unwatch():
            if clicked in layer.mouse_drag_callbacks:
                layer.mouse_drag_callbacks.remove(clicked)

        return unwatch

    def _cells_replaced(self, event):
        """Classify cells ran again and gave the layer new cells (its edits change pixels in
        place, never the whole data): the review and Undo begin afresh from them, as they
        carry the sidecar's review already."""
        layer = self.layer
        if layer is not None and layer.unique_id == event.source.unique_id:
            self._reviews.pop(layer.unique_id, None)
            self._attach(layer)

    def _forget_removed(self, event):
        """A removed layer's review goes with it: kept, it would pile up, and the layer added
        again would be saved with its share of the sidecar as it was long before."""
        self._reviews.pop(event.value.unique_id, None)

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
        mask = np.asarray(layer.data) == cell
        pixels = np.nonzero(mask)
        self._remember(pixels, cell)
        review = self._reviews.get(layer.unique_id)
        if review is not None and len(pixels[0]):
            review.outlines[cell] = encode_mask(mask)  # saved with the deletion: restorable
        layer.data[pixels] = 0
        features = layer.features
        features.loc[row, ["annotated", "label"]] = DELETED
        if "needs_review" in features:
            features.loc[row, "needs_review"] = False
        layer.features = features
        layer.refresh()
        self._changed(f"cell {cell} deleted")

    def restore_deleted(self, position=None):
        """Bring back the deleted cell nearest ``position`` ((row, col) in the layer's pixels;
        by default the empty place last clicked), within a red-cell diameter.

        A cell deleted in this session comes back as it was called before (by a person in an
        earlier session, else by the model), one deleted in an earlier session (its entry in
        the sidecar) as the model called it, not reviewed; with its outline where that was
        kept. Saved at once, so it stays back in later sessions, ``classify`` and
        ``analyze``; Undo takes it back.
        """
        layer = self.layer
        if layer is None:
            show_error("Choose a classes layer first: Classify cells makes one.")
            return
        position = self._clicked if position is None else position
        self._begin_review(layer)
        found = None if position is None else self._deleted_near(layer, position)
        if found is None:
            show_error(
                "No deleted cell there: click the place where the deleted cell was "
                "(pan/zoom mode), then press Restore deleted."
            )
            return
        own = found[2]
        review = self._reviews.get(layer.unique_id)
        deletions = self._deletions_at(layer, review, found[0])
        cell = own if own is not None else self._unused_value(layer)
        # Its outline: taken as it was deleted in this session, else kept in the sidecar.
        outlines = [review.outlines.get(own)] if review is not None else []
        outline = next((m for m in outlines + [d.mask for d in deletions] if m), None)
        pixels = _outline_pixels(layer, outline)
        self._remember(pixels, 0)
        layer.data[pixels] = cell
        layer.refresh()
        layer.features = self._with_restored(layer.features, review, found, cell)
        if deletions:
            self._reviews[layer.unique_id] = restore_deletions(review, deletions, cell)
        self.select(cell)
        self._changed(f"cell {cell} restored")

    def start_painting(self):
        """Switch the layer to painting a new cell (a label value no cell has)."""
        layer = self.layer
        if layer is None:
            show_error("Choose a classes layer first: Classify cells makes one.")
            return
        layer.selected_label = self._unused_value(layer)
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
        if layer is None or not str(folder) or str(folder) == ".":
            show_error("Choose the classes layer and a dataset folder first.")
            return None
        image = self._image()
        if image is None:
            show_error(
                f"The image '{layer.name}' was classified from is no longer open: open it "
                "again and classify it, then export its cells."
            )
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

    def _deleted_near(self, layer, position):
        """(centroid, model's call, the layer's cell or None) of the deleted cell nearest
        ``position`` within a red-cell diameter, or None: a cell the layer deleted, or a
        deletion in its sidecar that it does not show (core.annotations.restorable_deletions)."""
        features = layer.features
        own = features[(features["annotated"] == DELETED) & ~features["added"].eq(True)]
        found = [
            ((row.centroid_row, row.centroid_col), row.predicted, int(row.index))
            for row in own.itertuples(index=False)
        ]
        review = self._reviews.get(layer.unique_id)
        if review is not None:
            found += [
                (entry.centroid, entry.predicted, None)
                for entry in restorable_deletions(review, features)
            ]
        reach = layer.metadata.get("rbc_diameter", 20)
        distances = [np.hypot(*np.subtract(centre, position)) for centre, _, _ in found]
        nearest = int(np.argmin(distances)) if found else None
        return found[nearest] if found and distances[nearest] <= reach else None

    def _deletions_at(self, layer, review, centre):
        """The sidecar's deletions within half a red-cell diameter of ``centre`` (where
        ``analyze`` matches a cell): all name the cell restored there, and one left would
        delete it again."""
        if review is None:
            return []
        radius = 0.5 * layer.metadata.get("rbc_diameter", 20)
        return [
            entry
            for entry in restorable_deletions(review, layer.features)
            if np.hypot(*np.subtract(entry.centroid, centre)) <= radius
        ]

    def _tell_deleted(self, layer, position):
        """Say on the status line whether a deleted cell is at the place clicked."""
        found = self._deleted_near(layer, position)
        if found is not None:
            self._status.value = (
                f"a cell deleted here (model: {found[1] or 'no call'}): "
                "Restore deleted brings it back"
            )

    def _with_restored(self, features, review, found, cell):
        """``features`` with the deleted cell ``found`` (see :meth:`_deleted_near`) back as
        ``cell``: the layer's own row called again as before its deletion (a person's call
        of an earlier session, else the model's), or a new row for a deletion of the sidecar,
        with the model's call at the time, not reviewed (the scores of that call were not
        kept)."""
        centre, predicted, own = found
        if own is not None:
            call = earlier_call(review, cell) if review is not None else ""
            features.loc[self._row(cell), ["annotated", "label"]] = [call, call or predicted]
            return features
        row = {column: np.nan for column in features.columns}
        row.update(
            index=cell,
            label=predicted or UNKNOWN,
            predicted=predicted,
            annotated="",
            added=False,
            needs_review=False,
            centroid_row=float(centre[0]),
            centroid_col=float(centre[1]),
        )
        features.loc[len(features)] = row
        return features

    def _unused_value(self, layer):
        """A label value for a new cell: none of ``layer``'s cells has it, nor a restore
        used it (an undone restore's value stays taken: core.annotations.restore_deletions)."""
        review = self._reviews.get(layer.unique_id)
        taken = restored_values(review) if review is not None else set()
        return int(max(layer.data.max(), layer.features["index"].max(), *taken)) + 1

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
        return image_of(self._viewer, self.layer) if self.layer is not None else None

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
        from its image's sidecar the first time (from nothing for an image without a file:
        it still keeps the outlines of deleted cells, for Restore deleted).

        Raises
        ------
        AnnotationError
            If the sidecar is damaged or of another image.
        """
        from napari_cytodiffusion.core.annotations import begin_review, load_annotations

        if layer is None:
            return None
        if layer.unique_id not in self._reviews:
            path = layer.metadata.get("path")
            stored = load_annotations(path) if path else None
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
        flags = review_markers(self._viewer, layer)
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
        # Found by what they record, not by a name made from the classes layer's: a person
        # may rename that layer, and the name would then be its own. Tied to the image where
        # Classify cells recorded it, so that its next run's classes layer finds them.
        link = result_link(layer.metadata.get("image_id") or layer_id(layer), "reviewed")
        points = reviewed[["centroid_row", "centroid_col"]].to_numpy(float).reshape(-1, 2)
        size = 0.5 * layer.metadata.get("rbc_diameter", 20)
        markers = linked_layer(self._viewer, "points", link)
        if markers is not None:
            markers.data = points
            return
        name = layer.name.removesuffix(" classes")
        self._viewer.add_points(
            points,
            name=f"{name} reviewed",
            metadata=link,
            symbol="square",
            size=size,
            face_color="white",
            border_color="black",
            scale=layer.scale[:2],
            translate=layer.translate[:2],
        )
        self._viewer.layers.selection.active = layer


def _outline_pixels(layer, outline):
    """The pixels of an encoded ``outline`` that no cell of ``layer`` has taken since (none
    where the outline was not kept)."""
    data = np.asarray(layer.data)
    if outline is None:
        return np.nonzero(np.zeros(data.shape, bool))
    return np.nonzero(decode_mask(outline, data.shape) & (data == 0))


def _source_name(path, name):
    """What a crop records as its source: the smear's full path (smears of one name in two
    folders stay apart), or the layer's name for an image that has no file."""
    return str(Path(path).resolve()) if path else name
