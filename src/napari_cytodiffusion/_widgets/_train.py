"""The "Train model" widget: train the diffusion model on a lab's own labelled cells.

Starting from a model's weights (the shipped one, a local one or a model file) adapts it to
another stain or scanner in far fewer steps than training from scratch. The run writes a
training checkpoint, which other widgets and the CLI load by its path like any model file. A
cancelled run saves its checkpoint first, so training the same output file again resumes it.

Before the first step the dock lists the cells found per class (and a new model's classes:
those with cells), and a warning names the subfolders whose cells are left out (not classes of
the model). The status line ends in done, cancelled or failed with the reason; a second line
shows the step, the loss and the last log line.
"""

from pathlib import Path

from magicgui.widgets import CheckBox, FileEdit, FloatSpinBox, SpinBox
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QTimer

from napari_cytodiffusion._widgets._common import (
    MODEL_FILE,
    DockForm,
    ModelFields,
    RunRow,
    StatusLabel,
    rbc_diameter_field,
)
from napari_cytodiffusion.core.progress import Cancelled

# The start-from choice of training a new model, from scratch.
NEW_MODEL = "none: a new model"


class TrainWidget(DockForm):
    """Train or fine-tune the diffusion model on a folder of class subfolders."""

    def __init__(self, napari_viewer):
        super().__init__()
        self._viewer = napari_viewer
        self._data = FileEdit(
            mode="d",
            label="cell folder",
            tooltip="A folder with one subfolder of single-cell images per class, named after "
            "the model's classes (other folders are listed and left out), or a folder of "
            "single-cell images called in Classify cell images (its cell_labels.csv).",
        )
        self._out = FileEdit(
            mode="w",
            label="output file",
            filter="*.ckpt",
            tooltip="Checkpoint to write. If it exists and 'resume' is ticked, training "
            "continues from it.",
        )
        self._steps = SpinBox(
            value=2000,
            min=1,
            max=1_000_000,
            step=100,
            label="steps",
            tooltip="Optimiser steps in all (counting those of a resumed run).",
        )
        self._batch_size = SpinBox(
            value=32, min=1, max=4096, label="batch size", tooltip="Cells per optimiser step."
        )
        self._lr = FloatSpinBox(
            value=1e-4,
            min=1e-5,
            max=1e-2,
            step=1e-5,
            label="learning rate",
            tooltip="Peak learning rate; 1e-4 suits fine-tuning, 3e-4 training from scratch.",
        )
        self._start_from = ModelFields(
            seed=False,
            none=NEW_MODEL,
            label="start from",
            tooltip="The model whose weights the run starts from (its classes and resolution): "
            "the shipped model, one adapted on this computer, or a model file. 'none' trains a "
            "new model from scratch, of the classes the folder has cells of.",
        )
        self._device = self._start_from.device
        self._rbc_diameter = rbc_diameter_field(
            "Red-cell diameter in the images (one scanner); 0 estimates it once per scanner (per "
            "image size)."
        )
        self._resume = CheckBox(
            value=True,
            text="resume the output file if it exists",
            tooltip="Continue a cancelled or finished run written to the same file.",
        )
        row = RunRow("Training the diffusion model", "Train")
        self._run, self._cancel, self._status = row.buttons[0], row.cancel, row.status
        self._runner = row.runner
        self._run.tooltip = "Normalise the cells (once per folder content), then train."
        self._counts = StatusLabel()
        self._details = StatusLabel()
        self.add(
            self._data,
            self._out,
            self._steps,
            self._batch_size,
            self._lr,
            self._rbc_diameter,
            *self._start_from.widgets,
            self._resume,
            row,
            self._counts,
            self._details,
        )
        self._run.changed.connect(self._start)
        # Written by the worker thread, shown by a main-thread timer (Qt is main-thread only).
        self._progress_text = _progress_text()
        self._timer = QTimer(self.native)  # dies with the widget
        self._timer.setInterval(200)
        self._timer.timeout.connect(self._show_progress)

    def _start(self):
        from napari_cytodiffusion.core.tasks.train import TrainRequest

        data, out = Path(self._data.value), Path(self._out.value)
        if not data.is_dir():
            self._runner.refuse(
                "Choose the cell folder: one subfolder of single-cell images per class, named "
                "after the model's classes."
            )
            return
        if str(self._out.value) in ("", ".") or out.is_dir():
            self._runner.refuse("Choose the output file the trained model is written to (.ckpt).")
            return
        resume = out if self._resume.value and out.is_file() else None
        if out.is_file() and resume is None:
            self._runner.refuse(
                f"{out.name} exists: tick 'resume the output file' to continue training it, "
                "or choose another output file (a trained model is not replaced)."
            )
            return
        start = self._start_from.choice().name
        if self._start_from.model.value == MODEL_FILE and not Path(start).is_file():
            self._runner.refuse("Choose the model file to start from (.pt or .ckpt).")
            return
        request = TrainRequest(
            data=data,
            out=out,
            steps=self._steps.value,
            batch_size=self._batch_size.value,
            lr=self._lr.value,
            device=self._device.value,
            resume=resume,
            init=None if start == NEW_MODEL or resume is not None else start,
            rbc_diameter=self._rbc_diameter.value or None,
        )
        self._progress_text = _progress_text()
        self._counts.value = self._details.value = ""
        self._runner.start(
            lambda progress: _train(request, self._progress_text, progress),
            lambda summary: self._finished(out, summary),
            show_error,
            text="training",
        )
        # Only now: the timer stops itself when it finds no work running.
        self._timer.start()

    def _show_progress(self):
        """Main thread: the counts, new warnings, and the step, loss and last log line."""
        text = self._progress_text
        if text["counts"]:
            self._counts.value = text["counts"]
        while text["warnings"]:
            show_warning(text["warnings"].pop(0))
        self._details.value = "\n".join(line for line in (text["loss"], text["log"]) if line)
        if not self._runner.running:
            self._timer.stop()

    def _finished(self, out, summary):
        self._show_progress()
        if summary is None:
            if out.is_file():
                self._status.value = "cancelled; Train again to resume"
                message = f"Training cancelled; {out} holds the last step. Train again to resume."
            else:
                self._status.value = "cancelled"
                message = "Training cancelled before its first step; nothing was written."
            show_info(message)
            return
        history = summary["history"]
        losses = f"step {summary['step']}, loss {history['train_loss'][-1][1]:.4f}"
        if history["val_loss"]:
            losses += f", validation loss {history['val_loss'][-1][1]:.4f}"
        self._status.value = f"done: {losses}"
        show_info(f"Training reached {losses}. The model is {out}; give this path as the model.")


def _progress_text():
    return {"counts": "", "warnings": [], "loss": "", "log": ""}


def _train(request, text, progress):
    """Worker: train, recording the counts, warnings, step, loss and log in ``text``.

    Returns None when cancelled, after training saved its checkpoint: a cancel is an
    outcome here, not an error to report.
    """
    from napari_cytodiffusion.core.tasks.train import train_model

    def on_data(counts, skipped, classes):
        found = ", ".join(f"{name.replace('_', ' ')} {n}" for name, n in counts.items())
        text["counts"] = f"cells per class: {found} ({sum(counts.values())} in all)"
        model = ", ".join(name.replace("_", " ") for name in classes)
        if tuple(classes) != tuple(counts):  # a new model learns only the classes with cells
            text["counts"] += f"; a new model of {model}"
        if skipped:
            text["counts"] += f"; left out (not classes of the model): {', '.join(skipped)}"
            text["warnings"].append(
                f"Training leaves out the cells of {', '.join(skipped)}: they are not classes "
                f"of the model ({model})."
            )

    def on_loss(step, loss):
        text["loss"] = f"step {step}/{request.steps}, loss {loss:.4f}"

    try:
        return train_model(
            request, progress, on_loss, log=lambda line: text.update(log=line), on_data=on_data
        )
    except Cancelled:
        return None
