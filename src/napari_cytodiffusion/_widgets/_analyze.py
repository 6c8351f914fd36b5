"""The "Analyze smear" widget: the batch analysis of ``napari-cytodiffusion analyze`` on the
open image, however large.

The image is read lazily (a multiscale or dask layer is never loaded whole), cut into tiles,
and every white cell segmented, classified and flagged; the smear's files and its HTML report
are written to the results folder (the report opens in the browser), and two Points layers
are added: the white cells outlined in the colour of their class (per-cell results in
``features``, on hover), and red rings on the cells to review (``<image> analysis flagged``,
apart from *Classify cells*' ``<image> needs review``). A person's annotations saved beside
the image's file are applied, as ``analyze`` applies them.
"""

from pathlib import Path

import numpy as np
from magicgui.widgets import CheckBox, ComboBox, FileEdit
from napari.utils.notifications import show_info

from napari_cytodiffusion._widgets._common import (
    DockForm,
    ModelFields,
    RunRow,
    full_resolution,
    layer_id,
    no_smear_message,
    result_link,
    rgb_images,
    update_or_add_in_steps,
)
from napari_cytodiffusion.core.io import folder_problem
from napari_cytodiffusion.core.report import count_text

# The layers' names after the image's: the flagged cells' differs from Classify's review
# layer, so that neither takes over the other's.
LAYER_SUFFIXES = ("cells", "analysis flagged")


class AnalyzeWidget(DockForm):
    """Triage one smear: counts, flags and a report a person can act on."""

    def __init__(self, napari_viewer):
        super().__init__()
        self._viewer = napari_viewer
        self._image = ComboBox(
            label="image",
            choices=self._image_layers,
            tooltip="The RGB smear, of any size (multiscale and dask layers are read lazily).",
        )
        self._out = FileEdit(
            mode="d",
            label="results folder",
            tooltip="The smear's cells.csv, differential.csv, triage.json and report.html go "
            "into a folder named after the layer here (with a short hash of the image's path "
            "where that folder holds another image's results).",
        )
        self._open = CheckBox(
            value=True,
            text="open the report when done",
            tooltip="Show report.html in the web browser when the analysis ends.",
        )
        self._replace = CheckBox(
            value=False,
            text="replace earlier results",
            tooltip="Replace the results a batch (napari-cytodiffusion analyze) made of this "
            "image in the results folder with other settings, as its --overwrite does; without "
            "it they are kept and the run is refused. The widget's own results are replaced "
            "either way.",
        )
        self._fields = ModelFields(seed_tooltip="Same seed, same calls.")
        row = RunRow("Analysing the smear", "Analyze")
        self._run, self._cancel, self._status = row.buttons[0], row.cancel, row.status
        self._runner = row.runner
        self._run.tooltip = "Segment, classify and triage every white cell of the image."
        self.add(self._image, self._out, self._open, self._replace, *self._fields.widgets, row)
        self._run.changed.connect(self._start)
        for event in (napari_viewer.layers.events.inserted, napari_viewer.layers.events.removed):
            event.connect(lambda *_: self.reset_choices())
        self.analysis = None

    def _image_layers(self, _=None):
        return rgb_images(self._viewer)

    def _start(self):
        layer = self._image.value
        if layer is None:
            self._runner.refuse(no_smear_message(self._viewer, "Analyze"))
            return
        if str(self._out.value) in ("", "."):
            self._runner.refuse("Choose the results folder the report is written to.")
            return
        # The file it was opened from, named in the report as a batch names its smears.
        source = str(Path(layer.source.path).resolve()) if layer.source.path else None
        choice, seed = self._fields.choice(), self._fields.seed.value
        folder = self._results_folder(layer.name, source, choice.name, seed)
        if folder is None:
            return
        data = full_resolution(layer)

        def job(progress):
            from napari_cytodiffusion.core.annotations import load_annotations
            from napari_cytodiffusion.core.report import mark_unfinished, write_smear
            from napari_cytodiffusion.core.tasks.analyze import analyze_smear

            # Read first: a damaged or foreign sidecar is reported before any work.
            annotations = load_annotations(source) if source else None
            model = choice.load(progress)
            analysis = analyze_smear(
                data,
                model,
                folder.name,
                seed=seed,
                annotations=annotations,
                progress=progress,
                source=source,
            )
            # A batch's results in that folder are replaced: its marker must not call them its.
            mark_unfinished(folder)
            return analysis, write_smear(analysis, folder), _cell_points(analysis)

        self._runner.start(job, lambda result: self._show(layer, *result), text="analysing")

    def _results_folder(self, name, source, model, seed):
        """The smear's results folder, checked before any work (the results are written at
        the end): the layer's name, or that and a hash of ``source``'s path where the folder
        holds another image's results; None, with the reason shown, where there is none, or
        where it holds a batch's results of other settings than ``model`` and ``seed`` and
        *replace earlier results* is off."""
        from napari_cytodiffusion.core.tasks.analyze import (
            BatchRequest,
            analysis_settings,
            earlier_results,
            result_name,
        )

        out = Path(self._out.value)
        try:
            folder = out / result_name(name, source, out)
            # What a batch of this smear records: the widget analyses with a batch's defaults
            # (tile size, strategy, measured red cells, the annotations applied).
            settings = analysis_settings(
                BatchRequest(paths=[source], out=out, model=model, seed=seed)
            )
        except ValueError as error:  # a model file that is not there, too
            self._runner.refuse(str(error))
            return None
        problem = folder_problem(folder)
        if problem:
            self._runner.refuse(f"{problem}; choose a results folder you can write into.")
            return None
        earlier = earlier_results(folder, settings)
        # Only a batch's finished results of other settings are kept unasked, as the command
        # line keeps them. The widget writes no marker of its own (one would make its results
        # a batch's, skipped and summed up by the next batch of those settings), so its own
        # results (no marker, or a batch's it turned unfinished) tell nothing of their
        # settings, and a rerun replaces them as before, whatever the settings.
        if earlier is not None and earlier.finished and not self._replace.value:
            made = f" ({earlier.differences})" if earlier.differences else ""
            self._runner.refuse(
                f"{folder} holds results a batch made with other settings{made}: tick "
                "*replace earlier results* or choose another results folder."
            )
            return None
        return folder

    def _show(self, layer, analysis, report, points):
        """Main thread: the layers (one per turn of the event loop, an earlier run's updated
        in place), the status, and the report in the browser."""
        self.analysis = analysis
        if layer in self._viewer.layers:  # the report stands even if the image was removed
            placement = {"scale": layer.scale[-2:], "translate": layer.translate[-2:]}
            for suffix, markers in zip(LAYER_SUFFIXES, points, strict=True):
                # Tied to the image by its id: renamed, or beside another image of its
                # name, a rerun updates its own layers and no other image's.
                link = result_link(layer_id(layer), f"analysis {suffix}")
                yield from update_or_add_in_steps(
                    self._viewer,
                    "points",
                    markers.pop("data"),
                    f"{layer.name} {suffix}",
                    markers.pop("features"),
                    {"source": layer.name, **link},
                    link=link,
                    **markers,
                    **placement,
                )
        flagged = int(analysis.cells["needs_review"].sum())
        white = count_text(len(analysis.cells), "white cell")
        self._status.value = f"{analysis.decision}: {white}, {flagged} flagged. Report: {report}"
        show_info(f"{layer.name}: {analysis.decision}; the report is {report}")
        if self._open.value:
            import webbrowser

            webbrowser.open(Path(report).resolve().as_uri())


def _cell_points(analysis):
    """Points-layer arguments for every white cell and for the flagged ones (worker side)."""
    from napari_cytodiffusion.core.report import class_colours

    cells = analysis.cells
    centres = cells[["centroid_row", "centroid_col"]].to_numpy(float).reshape(-1, 2)
    sizes = np.maximum(
        cells["bbox_max_row"] - cells["bbox_min_row"], cells["bbox_max_col"] - cells["bbox_min_col"]
    ).to_numpy(float)
    colours = class_colours(tuple(analysis.differential()["class"]))  # a person's new too
    outline = [colours[label] for label in cells["label"]]
    everyone = {
        "data": centres,
        "features": cells,
        "size": sizes if len(sizes) else 10,
        "face_color": "transparent",
        "border_color": outline if outline else "white",
        "border_width": 0.05,
        "symbol": "disc",
    }
    flagged = cells["needs_review"].to_numpy(bool)
    review = {
        "data": centres[flagged],
        "features": cells[flagged].reset_index(drop=True),
        "size": 1.3 * sizes[flagged] if flagged.any() else 10,
        "face_color": "transparent",
        "border_color": "red",
        "border_width": 0.05,
        "symbol": "disc",
    }
    return everyone, review
