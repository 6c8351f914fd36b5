"""The "Adapt / calibrate model" widget: a lab's labelled cells teach a model its stain and
scanner, then calibrate it, and the result becomes a named model every widget offers.

The same task as ``napari-cytodiffusion adapt`` and ``calibrate``
(:func:`~napari_cytodiffusion.core.tasks.adapt.adapt_model`). While it runs, the dock shows the
cells found per class and the task's log; the status line ends in done (with the held-back
accuracy), cancelled (nothing registered) or failed with the reason.
"""

from pathlib import Path

from magicgui.widgets import CheckBox, FileEdit, LineEdit, SpinBox
from napari.utils.notifications import show_info, show_warning
from qtpy.QtCore import QTimer

from napari_cytodiffusion._widgets._common import (
    DockForm,
    ModelFields,
    RunRow,
    StatusLabel,
    rbc_diameter_field,
    refresh_model_choices,
)


class AdaptWidget(DockForm):
    """Adapt a model to a folder of a lab's labelled cells, or only calibrate it."""

    def __init__(self, napari_viewer):
        from napari_cytodiffusion.core.model.adaptation import ADAPT_STEPS

        super().__init__()
        self._viewer = napari_viewer
        self._data = FileEdit(
            mode="d",
            label="cell folder",
            tooltip="One subfolder of single-cell images per class (5 to 50 per class), such "
            "as Annotate cells exports, or a folder of single-cell images called in Classify "
            "cell images (its cell_labels.csv).",
        )
        self._fields = ModelFields(seed_tooltip="Same seed, same split and the same model.")
        self._fields.model.label = "base model"
        self._device, self._seed = self._fields.device, self._fields.seed
        self._name = LineEdit(
            value="my-lab",
            label="new model name",
            tooltip="Letters, digits, '-', '_' and '.'. A local model of this name is kept "
            "unless 'replace the local model of this name' is ticked.",
        )
        self._replace = CheckBox(
            text="replace the local model of this name",
            tooltip="Without it, a new model name that a local model has is refused (calibrating "
            "a local model again under its own name replaces it, as the command line does).",
        )
        self._steps = SpinBox(
            value=ADAPT_STEPS,
            min=1,
            max=100_000,
            step=50,
            label="steps",
            tooltip="Adaptation steps (about 0.3 s each on a laptop CPU).",
        )
        self._add_classes = CheckBox(
            text="other classes become new classes",
            tooltip="Folders or cell_labels.csv labels that are not classes of the model (for "
            "example blast or smudge cell) become new classes; otherwise their cells are left out.",
        )
        self._rbc_diameter = rbc_diameter_field(
            "Red-cell diameter in the images (one scanner); 0 estimates one scale for all of "
            "them (their median), which the adapted model keeps for images with too few red "
            "cells to measure."
        )
        row = RunRow("Adapting the model", "Adapt", "Calibrate only")
        self._adapt, self._calibrate = row.buttons
        self._adapt.tooltip = "Train a small part of the base model on the cells, then calibrate."
        self._calibrate.tooltip = (
            "Fit only the calibration (probabilities, review thresholds) on all the cells; "
            "the weights stay the base model's."
        )
        self._cancel, self._status, self._runner = row.cancel, row.status, row.runner
        self._log = StatusLabel()
        self.add(
            self._data,
            *self._fields.widgets,
            self._name,
            self._replace,
            self._steps,
            self._add_classes,
            self._rbc_diameter,
            row,
            self._log,
        )
        self._adapt.changed.connect(lambda *_: self.start(calibrate_only=False))
        self._calibrate.changed.connect(lambda *_: self.start(calibrate_only=True))
        # Written by the worker thread, shown by a main-thread timer (Qt is main-thread only).
        self._lines, self._shown = [], 0
        self._timer = QTimer(self.native)
        self._timer.setInterval(200)
        self._timer.timeout.connect(self._show_log)

    def start(self, calibrate_only=False):
        """Read the fields and run the task in a worker."""
        from napari_cytodiffusion.core.tasks.adapt import AdaptRequest, check_request

        data = Path(self._data.value)
        if str(self._data.value) in ("", ".") or not data.is_dir():
            self._runner.refuse(
                "Choose the cell folder: one subfolder of labelled cells per class."
            )
            return
        request = AdaptRequest(
            data=data,
            name=self._name.value.strip(),
            base=self._fields.choice().name,
            steps=0 if calibrate_only else self._steps.value,
            add_classes=self._add_classes.value and not calibrate_only,
            device=self._device.value,
            seed=self._seed.value,
            rbc_diameter=self._rbc_diameter.value or None,
            replace=self._replace.value,
        )
        try:  # the task's own checks (a name, an existing local model), before any work
            check_request(request)
        except ValueError as error:
            self._runner.refuse(str(error))
            return
        self._lines, self._shown = [], 0
        self._log.value = ""
        lines = self._lines
        self._runner.start(
            lambda progress: _adapt(request, lines, progress),
            self._finished,
            text="calibrating" if calibrate_only else "adapting",
        )
        self._timer.start()

    def _show_log(self):
        """Main thread: new log lines; warnings also as notifications."""
        new, self._shown = self._lines[self._shown :], len(self._lines)
        for line in new:
            if line.startswith("warning: "):
                show_warning(line.removeprefix("warning: "))
        self._log.value = "\n".join(self._lines[-4:])
        if not self._runner.running:
            self._timer.stop()

    def _finished(self, result):
        self._show_log()
        self._timer.stop()  # the summary replaces the log for good
        refresh_model_choices()
        lines = result.summary()
        self._log.value = "\n".join(lines)
        self._status.value = (
            f"done: {result.entry.name!r}, balanced accuracy "
            f"{result.held_back_balanced_accuracy:.3f} on its calibration cells (optimistic: "
            "fitted on them; measure it on other cells of the lab)"
        )
        show_info(f"Saved the local model {result.entry.name!r}; choose it as the model.")


def _adapt(request, lines, progress):
    """Worker: run the task, collecting its log lines in ``lines``."""
    from napari_cytodiffusion.core.tasks.adapt import adapt_model

    return adapt_model(request, progress=progress, log=lines.append)
