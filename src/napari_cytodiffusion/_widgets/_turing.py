"""The "Turing test" widget: can an expert tell real cells from synthetic ones?

Build a blinded panel from N real cells (a folder of class subfolders, or an image layer) and
N synthetic cells of the same classes, then answer Real (R) or Synthetic (S) for one cell at a
time. Each cell is shown beside the smear (if one is open), with the view zoomed onto it.
The key is held only in memory until the last answer; then the score (accuracy with a
95 % Clopper-Pearson interval, per class too, and a one-sided test against chance) is shown,
and answers with timings, the key and the score are written as CSV files.
"""

import time
from pathlib import Path

from magicgui.widgets import ComboBox, Container, FileEdit, PushButton, SpinBox
from qtpy.QtCore import QEvent, QObject
from qtpy.QtWidgets import QDockWidget

from napari_cytodiffusion._widgets._common import (
    DockForm,
    ModelFields,
    RunRow,
    StatusLabel,
    rbc_diameter_field,
    rgb_images,
    sampler_fields,
)
from napari_cytodiffusion._widgets._grid import beside, focus, layer_cells
from napari_cytodiffusion.core import turing
from napari_cytodiffusion.core.io import folder_problem

FOLDER, LAYER = "folder", "image layer"
TEST_LAYER = "Turing test"


class TuringWidget(DockForm):
    """Blinded real-versus-synthetic panel, answered one cell at a time."""

    def __init__(self, napari_viewer):
        super().__init__()
        self._viewer = napari_viewer
        self._fields = ModelFields(
            seed_tooltip="Seeds the choice of cells, the synthetic cells and the shuffle."
        )
        classes = self._fields.classes()
        self._source = ComboBox(
            choices=(FOLDER, LAYER),
            value=FOLDER,
            label="real cells from",
            tooltip="A folder of class subfolders, or an image layer (a stack of cells).",
        )
        self._folder = FileEdit(
            mode="d",
            label="real cell folder",
            tooltip=f"One subfolder of single-cell images per class ({', '.join(classes)}).",
        )
        self._layer = ComboBox(
            label="real cell layer",
            choices=lambda _: rgb_images(napari_viewer),
            tooltip="Single cells: a grid from Generate cells, an image stack, or one "
            "single-cell image.",
        )
        self._layer_class = ComboBox(
            choices=classes,
            label="class of layer cells",
            tooltip="Used when the layer has no 'label' feature (metadata['features']).",
        )
        self._fields.follow_classes(self._layer_class)
        self._count = SpinBox(
            value=20, min=1, max=10_000, label="real cells (N)", tooltip="As many are generated."
        )
        self._rbc_diameter = rbc_diameter_field(
            "Of the real images; 0: one estimate per scanner for a folder (3 or more images "
            "of one size), per image otherwise."
        )
        self._steps, self._guidance = sampler_fields("the synthetic cells")
        self._device, self._seed = self._fields.device, self._fields.seed
        self._out = FileEdit(mode="d", label="results folder", tooltip="Where the CSVs go.")
        row = RunRow("Building the Turing test panel", "Build panel and start")
        self._build, self._cancel, self._progress = row.buttons[0], row.cancel, row.status
        self._runner = row.runner
        self._build.tooltip = "Build the blinded panel, then show its first cell."
        self._real = PushButton(text="Real (R)", tooltip="The cell shown is real (key R).")
        self._synthetic = PushButton(
            text="Synthetic (S)", tooltip="The cell shown is synthetic (key S)."
        )
        self._answer_row = Container(
            widgets=[self._real, self._synthetic], layout="horizontal", labels=False
        )
        self._end = PushButton(
            text="End test",
            enabled=False,
            tooltip="Stop the test now: the answers given so far are saved and scored, the "
            "rest counted as unanswered. Closing this panel does the same.",
        )
        self._result = StatusLabel()
        self.add(
            self._source,
            self._folder,
            self._layer,
            self._layer_class,
            self._count,
            self._rbc_diameter,
            self._steps,
            self._guidance,
            *self._fields.widgets,
            self._out,
            row,
            self._answer_row,
            Container(widgets=[self._end], labels=False),  # a row of its own, below the answers
            self._result,
        )
        self._build.changed.connect(self._start)
        self._real.changed.connect(lambda: self.answer(turing.REAL))
        self._synthetic.changed.connect(lambda: self.answer(turing.SYNTHETIC))
        self._end.changed.connect(self.end_test)
        # The panel's close button takes the widget out of its dock: the test (or the panel
        # being built for one) ends with it, so that R and S are given back and no hidden test
        # goes on taking answers.
        _WhenUndocked(self.native, self._closed)
        self._source.changed.connect(self._show_source)
        for event in (napari_viewer.layers.events.inserted, napari_viewer.layers.events.removed):
            event.connect(lambda *_: self.reset_choices())
        self._panel = None
        self._answers = []
        self._shown_at = 0.0
        self._previous_keys = {}
        self._answer_row.enabled = False
        self._show_source()

    def _show_source(self, *_):
        from_folder = self._source.value == FOLDER
        self._folder.visible = from_folder
        self._layer.visible = not from_folder
        self._layer_class.visible = not from_folder

    # --- building the panel ---------------------------------------------------------------------

    def _start(self):
        from napari.utils.notifications import show_error

        from napari_cytodiffusion.core.tasks.turing import TuringRequest, make_turing_panel

        if self.testing:
            show_error("A test is running: answer it to the end first.")
            return
        out = Path(self._out.value)
        if str(self._out.value) in ("", "."):
            show_error("Choose the results folder the answers, key and score are written to.")
            return
        problem = folder_problem(out)
        if problem:
            # Checked now: the answers are saved at the end of the test, and must not be lost.
            show_error(
                f"Cannot write into {out}: {problem}; choose a results folder you can write to."
            )
            return
        request = TuringRequest(
            n=self._count.value,
            seed=self._seed.value,
            steps=self._steps.value,
            guidance=self._guidance.value,
            rbc_diameter=self._rbc_diameter.value or None,
        )
        if self._source.value == FOLDER:
            request.folder = Path(self._folder.value)
            if not request.folder.is_dir():
                show_error("Choose the folder of real cells (one subfolder per class).")
                return
        else:
            layer = self._layer.value
            if layer is None:
                show_error("Choose the image layer holding the real cells.")
                return
            request.images = layer_cells(layer)
            request.labels = _layer_labels(layer, len(request.images), self._layer_class.value)
            request.images_name = f"layer {layer.name!r}"
            request.image_word = "tile" if "grid" in layer.metadata else "plane"
        choice = self._fields.choice()
        self._result.value = ""
        self._runner.start(
            lambda progress: make_turing_panel(choice.load(progress), request, progress),
            lambda panel: self._begin(panel, out),
            text="building the panel",
        )

    # --- running the test -----------------------------------------------------------------------

    @property
    def testing(self):
        return self._panel is not None

    def _begin(self, panel, out):
        self._panel, self._out_dir, self._answers = panel, out, []
        for key, answer in (("r", turing.REAL), ("s", turing.SYNTHETIC)):
            self._previous_keys[key] = self._viewer.bind_key(
                key, lambda _viewer, a=answer: self._key_answer(a), overwrite=True
            )
        self._answer_row.enabled = self._end.enabled = True
        self._show_item()

    def _show_item(self):
        index = len(self._answers)
        image = self._panel.images[index]
        if TEST_LAYER in self._viewer.layers:
            layer = self._viewer.layers[TEST_LAYER]
            layer.data = image
            if index == 0:
                # An earlier test's layer may lie under what was opened since: placed beside
                # everything, on top. (Moved, not removed: removing an image under a Labels
                # layer crashes napari on software OpenGL, see docs/napari.md.)
                layers = self._viewer.layers
                layers.move(layers.index(layer), len(layers))
                layer.visible = True
                layer.scale, layer.translate = beside(self._viewer, image.shape[0])
        else:  # the test's start, or a person removed the layer during it
            scale, translate = beside(self._viewer, image.shape[0])
            layer = self._viewer.add_image(
                image, rgb=True, name=TEST_LAYER, scale=scale, translate=translate
            )
            self._viewer.layers.selection.active = layer
        focus(self._viewer, layer)
        self._progress.value = f"cell {index + 1} of {len(self._panel)}: real or synthetic?"
        self._shown_at = time.perf_counter()

    def answer(self, answer):
        """Record ``answer`` ("real" or "synthetic") for the cell on screen."""
        if not self.testing:
            return
        row = self._panel.key[len(self._answers)]
        seconds = time.perf_counter() - self._shown_at
        self._answers.append(
            {
                "item": row["item"],
                "file": row["file"],
                "answer": answer,
                "seconds": round(seconds, 3),
            }
        )
        if len(self._answers) < len(self._panel):
            self._show_item()
        else:
            self._finish()

    def _key_answer(self, answer):
        """A key's answer, taken only while the panel is on screen: with the panel hidden a
        person pressing R or S is working elsewhere in the viewer, not answering."""
        widget = self.native  # hidden up to its dock (the window need not be shown)
        while widget is not None and not widget.isHidden():
            if isinstance(widget, QDockWidget):
                self.answer(answer)
                return
            widget = widget.parentWidget()

    def _closed(self):
        self._runner.cancel()
        self.end_test()

    def end_test(self, *_):
        """Stop a running test: the answers so far are saved and scored (none: nothing)."""
        if self.testing:
            self._finish()

    def _finish(self):
        from napari.utils.notifications import show_info

        panel, answers = self._panel, self._answers
        self._panel = None
        for key, previous in self._previous_keys.items():
            self._viewer.bind_key(key, previous, overwrite=True)
        self._previous_keys = {}
        self._answer_row.enabled = self._end.enabled = False
        given = f"{len(answers)} of {len(panel)} answers"
        if not answers:
            self._progress.value = f"ended: {given}; nothing saved"
            return
        result = turing.score(answers, panel.key)
        paths = save_results(self._out_dir, answers, panel.key, result)
        ended = "done" if len(answers) == len(panel) else "ended"
        self._progress.value = f"{ended}: {given}"
        self._result.value = turing.score_text(result) + f"\nsaved in {paths[0].parent}"
        show_info(
            f"Turing test {ended} ({given}); answers, key and score saved in {paths[0].parent}"
        )


def save_results(folder, answers, key, result):
    """Write answers (with timings and, now that the test is over, the truth), key and score."""
    folder = Path(folder)
    truth = {row["item"]: row for row in key}
    revealed = [
        {**a, "truth": truth[a["item"]]["truth"], "label": truth[a["item"]]["label"]}
        for a in answers
    ]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return (
        turing.write_csv(
            folder / f"turing_answers_{stamp}.csv",
            revealed,
            (*turing.ANSWER_COLUMNS, "truth", "label"),
        ),
        turing.write_csv(folder / f"turing_key_{stamp}.csv", key, turing.KEY_COLUMNS),
        turing.write_csv(
            folder / f"turing_score_{stamp}.csv", turing.score_rows(result), turing.SCORE_COLUMNS
        ),
    )


def _layer_labels(layer, count, fallback):
    """Per-cell classes from the layer's ``metadata['features']['label']``, else ``fallback``."""
    table = layer.metadata.get("features")
    if table is not None and "label" in table and len(table) == count:
        return [str(label) for label in table["label"]]
    return [fallback] * count


class _WhenUndocked(QObject):
    """Calls ``callback`` when ``widget`` leaves its dock (napari takes it out of the dock,
    leaving it without a parent, when the panel is closed)."""

    def __init__(self, widget, callback):
        super().__init__(widget)
        self._callback = callback
        widget.installEventFilter(self)

    def eventFilter(self, watched, event):
        if event.type() == QEvent.ParentChange and watched.parent() is None:
            self._callback()
        return False
