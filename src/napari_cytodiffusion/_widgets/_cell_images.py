"""The "Classify cell images" widget: the central cell of every single-cell image of a folder
(a CellaVision export, a folder of crops), as ``napari-cytodiffusion classify FOLDER`` does.

Adds one grid of the cells as the model saw them (scale and colour normalised), each tile
outlined in the colour of its call, with the per-image results (file, call, probabilities,
why it needs review) as the tiles layer's features, shown on hover; red rings mark the cells
to review. The dock shows the differential count of the folder and the flagged cells (a click
centres the view on one), and exports the table as CSV.
"""

from pathlib import Path

import numpy as np
from magicgui.widgets import ComboBox, FileEdit, Label, PushButton
from napari.utils.notifications import show_error, show_info
from qtpy.QtWidgets import QFileDialog

from napari_cytodiffusion._widgets._classify import (
    differential_table,
    flagged_list,
    legend_html,
    show_differential,
)
from napari_cytodiffusion._widgets._common import DockForm, ModelFields, RunRow, camera
from napari_cytodiffusion._widgets._grid import add_grid, add_tiles, focus, tile, tile_origin
from napari_cytodiffusion.core.report import class_colours, count_text

# Tile outlines, in crop pixels of the model's image size: visible beside the 4-px gaps.
OUTLINE = 2
# The ring on a cell to review, as a share of its tile.
RING = 0.9


class CellImagesWidget(DockForm):
    """A folder of single-cell images -> a grid of their cells, called and flagged."""

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
        self._strategy = ComboBox(
            label="strategy",
            choices=["adaptive", "exhaustive"],
            tooltip="adaptive: drop clearly worse classes early (about 12x faster); "
            "exhaustive: every trial for every class.",
        )
        row = RunRow("Classifying cell images", "Classify")
        self._run, self._cancel, self._runner = row.buttons[0], row.cancel, row.runner
        self._status = row.status
        self._run.tooltip = "Classify the central cell of every image in the folder."
        self._legend = Label(value=legend_html(self._fields.classes()))
        self._legend.tooltip = "Class colours of the tile outlines."
        self._export = PushButton(
            text="Export CSV…", enabled=False, tooltip="Save the per-image table."
        )
        self._summary = differential_table()
        self._flagged = flagged_list()
        self._flagged.currentRowChanged.connect(self._go_to_flagged)
        self.add(
            self._folder,
            *self._fields.widgets,
            self._strategy,
            row,
            self._legend,
            self._export,
            self._summary,
            self._flagged,
        )
        self._run.changed.connect(self._start)
        self._export.changed.connect(self._ask_export_path)
        self.tiles_layer = None
        self._flagged_tiles = []

    def _start(self):
        folder = Path(str(self._folder.value))
        if str(self._folder.value) in ("", ".") or not folder.is_dir():
            show_error("Choose the folder of single-cell images to classify.")
            return
        from napari_cytodiffusion.core.io import folder_images

        paths = folder_images(folder)
        if not paths:
            show_error(f"{folder} has no image files (PNG, JPEG, BMP, TIFF) in it.")
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
            return folder, result, (tile(result.crops), table, _tile_colormap(table, result))

        self._runner.start(job, self._show, text=f"classifying {len(paths)} images")

    def _show(self, outcome):
        """Main thread: the grid, then its tiles, then the review rings, one per turn."""
        folder, result, layers = outcome
        failed = "; ".join(f"{path.name}: {why}" for path, why in result.failed)
        if layers is None:
            self._status.value = f"done: no image could be classified ({failed})"
            show_error(f"No image of {folder} could be classified: {failed}")
            return
        tiled, table, colormap = layers
        self._legend.value = legend_html(result.classes)
        grid = add_grid(self._viewer, tiled, f"{folder.name} cells", table, {"cell_images": True})
        yield
        features = table.drop(columns="index")
        self.tiles_layer = add_tiles(self._viewer, grid, tiled, features, colormap, OUTLINE)
        yield
        self._mark_flagged(grid, tiled[2], table)
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
                f"; {count_text(warned, 'image')} with a warning, such as: unlike the training "
                "smears (hover a tile for its 'warning'; also in the CSV)"
            )
        show_info(f"Classified {count_text(len(table), 'image')}; {flagged} to review.")

    def _mark_flagged(self, grid, layout, table):
        """Red rings on the tiles to review, and their list in the dock."""
        flagged = table[table["needs_review"]]
        size = layout["size"]
        origins = np.array([tile_origin(layout, int(i) - 1) for i in flagged["index"]], float)
        centres = origins.reshape(-1, 2) + size / 2
        world = centres * np.asarray(grid.scale) + np.asarray(grid.translate)
        self._viewer.add_points(
            world,
            name=f"{grid.name} needs review",
            symbol="disc",
            size=RING * size * float(grid.scale[0]),
            face_color="transparent",
            border_color="red",
            border_width=0.05,
            features={
                "file": flagged["file"].map(lambda name: Path(name).name).to_numpy(),
                "label": flagged["label"].to_numpy(),
                "reason": flagged["why"].to_numpy(),
            },
        )
        self._flagged_tiles = list(zip(world.tolist(), flagged["index"].astype(int), strict=True))
        self._flagged.clear()
        for name, label, why in zip(flagged["file"], flagged["label"], flagged["why"], strict=True):
            self._flagged.addItem(f"{Path(name).name}: {label} ({why})")

    def _go_to_flagged(self, row):
        if not 0 <= row < len(self._flagged_tiles):
            return
        (r, c), index = self._flagged_tiles[row]
        camera(self._viewer).center = (r, c)
        if self.tiles_layer is not None and self.tiles_layer in self._viewer.layers:
            self.tiles_layer.selected_label = index

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


def _tile_colormap(table, result):
    """Each tile (numbered from 1) outlined in the colour of its call."""
    from napari.utils.colormaps import DirectLabelColormap

    palette = class_colours(result.classes)
    colours = {None: "transparent", 0: "transparent"}
    colours.update(
        {int(i): palette[label] for i, label in zip(table["index"], table["label"], strict=True)}
    )
    return DirectLabelColormap(color_dict=colours)
