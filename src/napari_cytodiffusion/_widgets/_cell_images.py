"""The "Classify cell images" widget: the central cell of every single-cell image of a folder
(a CellaVision export, a folder of crops), as ``napari-cytodiffusion classify FOLDER`` does.

Adds one grid of the cells as the model saw them (scale and colour normalised), each tile
outlined in the colour of its call, with the per-image results (file, call, probabilities,
why it needs review) as the tiles layer's features, shown on hover; red rings mark the cells
to review. The dock shows the differential count of the folder and the flagged cells (a click
centres the view on one), and exports the table as CSV.

A person corrects a call by clicking its tile (pan/zoom mode) and pressing Set class or a key
1-9, or marks it artefact or unknown (left out of the differential), or gives it a class the
model lacks (New class: blast, say, which adapting can then learn); N goes to the next tile
to review, U takes the last change back. Every change is saved at once, atomically, in the
folder's ``cell_labels.csv``, which the next run (and ``classify``) keeps over the model's
calls and which ``adapt`` and ``train`` take as a labelled dataset.
"""

from pathlib import Path

import numpy as np
from magicgui.widgets import ComboBox, Container, FileEdit, Label, PushButton
from napari.utils.notifications import show_error, show_info
from qtpy.QtWidgets import QFileDialog

from napari_cytodiffusion._widgets._classify import (
    cell_colours,
    differential_table,
    flagged_list,
    legend_html,
    show_differential,
)
from napari_cytodiffusion._widgets._common import (
    Banner,
    DockForm,
    ModelFields,
    RunRow,
    StatusLabel,
    added_unselected,
    bind_labelling,
    camera,
    direct_colormap,
    new_class_fields,
    new_class_name,
    select_then_show,
    strategy_field,
)
from napari_cytodiffusion._widgets._grid import (
    add_grid,
    add_tiles,
    focus,
    removed_with,
    tile,
    tile_origin,
)
from napari_cytodiffusion.core.annotations import ARTEFACT, UNKNOWN
from napari_cytodiffusion.core.report import count_text

# Tile outlines, in crop pixels of the model's image size: visible beside the 4-px gaps.
OUTLINE = 2
# The ring on a cell to review, as a share of its tile.
RING = 0.9
UNDO_DEPTH = 50


class CellImagesWidget(DockForm):
    """A folder of single-cell images -> a grid of their cells, called, flagged, reviewed."""

    def __init__(self, napari_viewer):
        super().__init__()
        self._viewer = napari_viewer
        self._folder = FileEdit(
            mode="d",
            label="folder",
            tooltip="A folder of single-cell images (PNG, JPEG, BMP, TIFF), each centred on one "
            "cell, such as a CellaVision export. Images of one size share one red-cell scale.",
        )
        self._fields = ModelFields(seed_tooltip="Same seed, same calls.")
        self._strategy = strategy_field()
        row = RunRow("Classifying cell images", "Classify")
        self._run, self._cancel, self._runner = row.buttons[0], row.cancel, row.runner
        self._status = row.status
        self._banner = Banner()
        self._run.tooltip = "Classify the central cell of every image in the folder."
        self._class = ComboBox(
            label="class",
            choices=self._fields.classes(),
            tooltip="The class Set class gives the selected tile (keys 1-9 on the tiles layer).",
        )
        self._set = PushButton(
            text="Set class", enabled=False, tooltip="Give the selected tile the class above."
        )
        self._clear = PushButton(
            text="Model's call",
            enabled=False,
            tooltip="Take back the person's call of the selected tile.",
        )
        self._artefact = PushButton(
            text="Artefact",
            enabled=False,
            tooltip="Not a white cell (debris, a stain deposit, a cut-off cell); left out of "
            "the differential and of training.",
        )
        self._unknown = PushButton(
            text="Unknown",
            enabled=False,
            tooltip="A white cell of no class the model knows; left out of the differential "
            "and of training.",
        )
        self._next = PushButton(
            text="Next flagged (N)",
            enabled=False,
            tooltip="Centre and select the next tile to review that nobody has called.",
        )
        self._undo_button = PushButton(
            text="Undo (U)", enabled=False, tooltip="Take back the last change (and save)."
        )
        self._new_class, self._set_new = new_class_fields()
        self._set_new.enabled = False
        self._undo = []  # (row, the person's call before the change)
        self._review = StatusLabel("")
        self._legend = Label(value=legend_html(self._fields.classes()))
        self._legend.tooltip = "Class colours of the tile outlines (opaque: reviewed)."
        self._export = PushButton(
            text="Export CSV…", enabled=False, tooltip="Save the per-image table."
        )
        self._summary = differential_table()
        self._flagged = flagged_list()
        self._flagged.currentRowChanged.connect(self._go_to_flagged)
        # Containers keep the review rows and Export together, below the run row (the form
        # gathers loose labelled fields at its top).
        rows = [
            Container(widgets=pair, layout="horizontal", labels=False)
            for pair in (
                (self._set, self._clear),
                (self._artefact, self._unknown),
                (self._next, self._undo_button),
                (self._new_class, self._set_new),
            )
        ]
        review = Container(widgets=[self._class, *rows])
        export = Container(widgets=[self._export], labels=False)
        for container in (*rows, review, export):
            container.margins = (0, 0, 0, 0)
        self.add(
            self._folder,
            *self._fields.widgets,
            self._strategy,
            row,
            self._banner,
            review,
            self._review,
            self._legend,
            export,
            self._summary,
            self._flagged,
        )
        self._run.changed.connect(self._start)
        self._set.changed.connect(lambda *_: self.set_label(self._class.value))
        self._clear.changed.connect(lambda *_: self.set_label(""))
        self._artefact.changed.connect(lambda *_: self.set_label(ARTEFACT))
        self._unknown.changed.connect(lambda *_: self.set_label(UNKNOWN))
        self._next.changed.connect(lambda *_: self.next_flagged())
        self._undo_button.changed.connect(lambda *_: self.undo())
        self._set_new.changed.connect(lambda *_: self.set_new_class(self._new_class.value))
        self._export.changed.connect(self._ask_export_path)
        self.tiles_layer = None
        self._unbind = None  # takes the clicks and keys off the tiles layer they are bound to
        self._review_layer = None
        self._shown = None  # (folder, classes) of the result on screen
        self._grid = None
        self._flagged_tiles = []
        self._model_review = []  # (needs_review, why) of each tile as the model called it

    def _start(self):
        folder = Path(str(self._folder.value))
        if str(self._folder.value) in ("", ".") or not folder.is_dir():
            self._runner.refuse("Choose the folder of single-cell images to classify.")
            return
        from napari_cytodiffusion.core.annotations import AnnotationError
        from napari_cytodiffusion.core.io import distinct_files, folder_images, no_images_message
        from napari_cytodiffusion.core.tasks.classify import folder_calls

        paths = distinct_files(folder_images(folder))  # a link to an image counts once
        if not paths:
            self._runner.refuse(no_images_message(folder) + ".")
            return
        try:
            folder_calls(paths)  # a damaged cell_labels.csv is refused before any work
        except AnnotationError as error:
            self._runner.refuse(str(error))
            return
        choice, strategy = self._fields.choice(), self._strategy.value
        seed = self._fields.seed.value

        def job(progress):
            from napari_cytodiffusion.core.tasks.classify import classify_cell_images

            model = choice.load(progress)
            result = classify_cell_images(
                paths, model, strategy=strategy, seed=seed, progress=progress
            )
            if not result.calls:
                return folder, result, None
            table = result.table()
            # 8-bit tiles: a quarter of the memory of float ones, for a folder of thousands.
            cells = np.round(np.clip(result.crops, 0, 1) * 255).astype(np.uint8)
            return folder, result, (tile(cells), table)

        self._banner.say([])
        self._runner.start(job, self._show, text=f"classifying {len(paths)} images")

    def _show(self, outcome):
        """Main thread: the grid, its tiles, their first draw, the review rings, their first
        draw, then the tables, one per turn of the event loop."""
        folder, result, layers = outcome
        failed = "; ".join(f"{path.name}: {why}" for path, why in result.failed)
        if layers is None:
            earlier = self.tiles_layer is not None
            self._forget_result()
            self._status.value = f"done: no image could be classified ({failed})"
            if earlier:
                self._status.value += "; the earlier result is no longer listed or exported"
            show_error(f"No image of {folder} could be classified: {failed}")
            return
        tiled, table = layers
        grid = add_grid(self._viewer, tiled, f"{folder.name} cells", table, {"cell_images": True})
        yield
        features = table.drop(columns="index")
        self._shown, self._grid = (folder, result.classes), grid
        self._model_review = [(call.needs_review, call.why) for call in result.calls]
        colormap = _tile_colormap(table, self._show_classes(table))
        self.tiles_layer = add_tiles(self._viewer, grid, tiled, features, colormap, OUTLINE)
        self._bind(self.tiles_layer, result.classes)
        yield
        yield from select_then_show(self._viewer, self.tiles_layer)  # hover shows its features
        self._review_layer = None  # a new result gets its own rings
        self._mark_flagged(hidden=True)
        yield
        self._review_layer.visible = True  # its first draw (0.06 s here), a turn of its own
        yield
        focus(self._viewer, grid)
        show_differential(self._summary, result.differential())
        self._export.enabled = True
        flagged = int(table["needs_review"].sum())
        self._status.value = f"done: {count_text(len(table), 'image')}, {flagged} to review"
        if failed:
            self._status.value += f"; {count_text(len(result.failed), 'image')} not read: {failed}"
        warned = sum(1 for warning in result.warnings if warning)
        if warned:
            self._status.value += (
                f"; {count_text(warned, 'image')} with a warning (hover a tile for its "
                "'warning'; also in the CSV)"
            )
        self._banner.say([result.folder_warning()])
        show_info(f"Classified {count_text(len(table), 'image')}; {flagged} to review.")

    def _forget_result(self):
        """The dock no longer shows, reviews or exports a result; its grid's tiles no longer
        take keys."""
        if self._unbind is not None:
            self._unbind()
            self._unbind = None
        self.tiles_layer, self._grid, self._shown = None, None, None
        for button in (*self._review_buttons(), self._export):
            button.enabled = False
        self._undo.clear()
        self._summary.setRowCount(0)
        self._flagged_tiles = []
        self._flagged.clear()
        self._review.value = ""

    # ------------------------------------------------------------------------ review

    def _review_buttons(self):
        return (
            self._set,
            self._clear,
            self._artefact,
            self._unknown,
            self._next,
            self._undo_button,
            self._set_new,
        )

    def _bind(self, layer, classes):
        """Clicks select a tile of ``layer``; keys 1-9 give it one of ``classes``."""
        if self._unbind is not None:
            self._unbind()  # an earlier grid's tiles no longer act on this one
        self._unbind = bind_labelling(layer, classes, self)
        self._undo.clear()
        for button in self._review_buttons():
            button.enabled = True
        self._update_review_count()

    def select(self, index):
        """Make tile ``index`` (from 1) the one Set class applies to."""
        row = self._row(index)
        if row is None:
            return
        self.tiles_layer.selected_label = index
        features = self.tiles_layer.features.loc[row]
        if features["label"] in self._class.choices:
            self._class.value = features["label"]  # Set class starts from the current call
        human = features["annotated"] or "not reviewed"
        name = Path(features["file"]).name
        self._review.value = f"{name}: model {features['predicted']}, person {human}"

    def set_label(self, label):
        """Give the selected tile the person's call ``label`` (a class, artefact or unknown;
        "" takes it back), and save the folder's calls at once."""
        layer = self.tiles_layer
        row = None if layer is None else self._row(int(layer.selected_label))
        if row is None:
            show_error("Select a tile first: click it (pan/zoom mode).")
            return
        self._undo.append((row, layer.features.loc[row, "annotated"]))
        del self._undo[:-UNDO_DEPTH]
        self._call(row, label)

    def set_new_class(self, name):
        """Give the selected tile a class the model does not have (``name``, such as blast)."""
        label = new_class_name(name)
        if label is not None:
            self.set_label(label)

    def undo(self):
        """Take back the last change (and save the folder's calls again)."""
        if not self._undo or self.tiles_layer not in self._viewer.layers:
            self._review.value = "nothing to undo"
            return
        row, label = self._undo.pop()
        self.tiles_layer.selected_label = int(self.tiles_layer.features.loc[row, "index"])
        self._call(row, label)

    def next_flagged(self):
        """Centre the next tile to review that nobody has called, and select it."""
        if self.tiles_layer not in self._viewer.layers or not self._flagged_tiles:
            self._review.value = "no flagged tile left to review"
            return
        current = int(self.tiles_layer.selected_label)
        later = [i for i, (_, index) in enumerate(self._flagged_tiles) if index > current]
        target = later[0] if later else 0
        self._flagged.blockSignals(True)  # the row may be current already: go there directly
        self._flagged.setCurrentRow(target)
        self._flagged.blockSignals(False)
        self._go_to_flagged(target)

    def _call(self, row, label):
        """Set tile ``row``'s person's call, redraw, recount and save; a tile a person has
        called needs no more review (as the next run's table says), else the model's flag."""
        layer = self.tiles_layer
        features = layer.features
        features.loc[row, "annotated"] = label
        features.loc[row, "label"] = label or features.loc[row, "predicted"]
        review = (False, "") if label else self._model_review[row]
        features.loc[row, ["needs_review", "why"]] = review
        layer.features = features
        # The grid keeps its own copy of the table, what Counterfactuals reads of a tile.
        copy = self._grid.metadata["features"]
        columns = ["annotated", "label", "needs_review", "why"]
        copy.loc[copy.index[row], columns] = features.loc[row, columns].to_numpy()
        try:
            path = self._save_labels(features)
        except (OSError, ValueError) as error:  # a read-only folder, a damaged table
            show_error(f"Could not save the calls: {error} They are kept in the viewer.")
            path = None
        classes = self._show_classes(features)
        layer.colormap = _tile_colormap(features, classes)
        self._mark_flagged()
        from napari_cytodiffusion.core.tasks.classify import differential_count

        show_differential(self._summary, differential_count(features["label"], classes))
        self.select(int(layer.selected_label))
        self._update_review_count(path)

    def _show_classes(self, features):
        """The model's classes, then those a person added, shown in the legend and the list."""
        from napari_cytodiffusion.core.tasks.classify import with_new_classes

        classes = with_new_classes(features["label"], self._shown[1])
        self._legend.value = legend_html(classes)
        with self._class.changed.blocked():
            self._class.choices = classes
        return classes

    def _save_labels(self, features):
        """The person's calls into the folder's ``cell_labels.csv`` (others' rows kept)."""
        from napari_cytodiffusion.core.annotations import load_folder_labels, save_folder_labels

        folder = self._shown[0]
        labels = load_folder_labels(folder)
        for file, human in zip(features["file"], features["annotated"], strict=True):
            labels.pop(Path(file).name, None)
            if human:
                labels[Path(file).name] = human
        return save_folder_labels(folder, labels)

    def _row(self, index):
        if self.tiles_layer is None or self.tiles_layer not in self._viewer.layers:
            return None
        rows = np.flatnonzero(self.tiles_layer.features["index"].to_numpy() == index)
        return int(rows[0]) if len(rows) else None

    def _update_review_count(self, path=None):
        features = self.tiles_layer.features
        reviewed = int((features["annotated"] != "").sum())
        self._review.value = f"reviewed {reviewed} of {len(features)}" + (
            f"; saved in {path.name}" if path else ""
        )

    def _mark_flagged(self, hidden=False):
        """Red rings on the tiles to review, and their list; a new layer of rings is added
        ``hidden``, and goes when its grid is removed."""
        features = self.tiles_layer.features
        flagged = features[features["needs_review"]]
        grid = self._grid
        layout = grid.metadata["grid"]
        size = layout["size"]
        origins = np.array([tile_origin(layout, int(i) - 1) for i in flagged["index"]], float)
        centres = origins.reshape(-1, 2) + size / 2
        world = centres * np.asarray(grid.scale) + np.asarray(grid.translate)
        ring_features = {
            "file": flagged["file"].map(lambda name: Path(name).name).to_numpy(),
            "label": flagged["label"].to_numpy(),
            "reason": flagged["why"].to_numpy(),
        }
        if self._review_layer is not None and self._review_layer in self._viewer.layers:
            self._review_layer.data = world
            self._review_layer.features = ring_features
        else:
            with added_unselected(self._viewer):  # hover shows the tiles' features
                self._review_layer = self._viewer.add_points(
                    world,
                    name=f"{grid.name} needs review",
                    symbol="disc",
                    size=RING * size * float(grid.scale[0]),
                    face_color="transparent",
                    border_color="red",
                    border_width=0.05,
                    features=ring_features,
                    visible=not hidden,
                )
            removed_with(self._viewer, grid, self._review_layer)
        self._flagged_tiles = list(zip(world.tolist(), flagged["index"].astype(int), strict=True))
        self._flagged.clear()
        for name, label, why in zip(flagged["file"], flagged["label"], flagged["why"], strict=True):
            self._flagged.addItem(f"{Path(name).name}: {label} ({why})")

    def _go_to_flagged(self, row):
        if not 0 <= row < len(self._flagged_tiles):
            return
        (r, c), index = self._flagged_tiles[row]
        camera(self._viewer).center = (r, c)
        self.select(index)

    # ------------------------------------------------------------------------ export

    def _ask_export_path(self, *_):
        path, _ = QFileDialog.getSaveFileName(self.native, "Export cell results", "", "CSV (*.csv)")
        if path:
            self.export_csv(path)

    def export_csv(self, path):
        """Write the last result's per-image table to ``path`` (CSV, written atomically)."""
        if self.tiles_layer is None:
            show_error("Nothing to export yet: run Classify first.")
            return
        from napari_cytodiffusion.core.io import atomic_write

        table = self.tiles_layer.features  # "index": the tile, in folder order from 1
        with atomic_write(Path(path)) as temporary:
            table.to_csv(temporary, index=False)
        show_info(f"Saved {count_text(len(table), 'image')} to {path}")


def _tile_colormap(table, classes):
    """Each tile (``index``, from 1) outlined in the colour of its call, opaque once a person
    has called it."""
    colours = {None: "transparent", 0: "transparent"}
    colours.update(cell_colours(table, classes))
    return direct_colormap(colours)
