"""The "Train / adapt model" widget: train the diffusion model on a lab's own labelled cells.

Starting from the default model's weights adapts it to another stain or scanner in far fewer
steps than training from scratch. The run writes a training checkpoint, which other widgets
and the CLI load by its path like any model file. A cancelled run saves its checkpoint first,
so training the same output file again resumes it.
"""

from pathlib import Path

from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSpinBox,
    Label,
    PushButton,
    SpinBox,
)
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QSizePolicy

from napari_cytodiffusion._widgets._common import available_devices
from napari_cytodiffusion._widgets._runner import TaskRunner
from napari_cytodiffusion.core.classes import CLASSES
from napari_cytodiffusion.core.progress import Cancelled

IMAGE_SIZE = 64


class TrainWidget(Container):
    """Train or fine-tune the diffusion model on a folder of class subfolders."""

    def __init__(self, napari_viewer):
        super().__init__()
        self._viewer = napari_viewer
        self._data = FileEdit(
            mode="d",
            label="cell folder",
            tooltip=f"A folder with one subfolder of single-cell images per class "
            f"({', '.join(CLASSES)}).",
        )
        self._out = FileEdit(
            mode="w",
            label="output file",
            filter="*.ckpt",
            tooltip="Checkpoint to write. If it exists and 'resume' is ticked, training "
            "continues from it.",
        )
        self._steps = SpinBox(value=2000, min=1, max=1_000_000, step=100, label="steps")
        self._batch_size = SpinBox(value=32, min=1, max=4096, label="batch size")
        self._lr = FloatSpinBox(
            value=1e-4,
            min=1e-5,
            max=1e-2,
            step=1e-5,
            label="learning rate",
            tooltip="Peak learning rate; 1e-4 suits fine-tuning, 3e-4 training from scratch.",
        )
        self._device = ComboBox(choices=available_devices(), value="auto", label="device")
        self._rbc_diameter = FloatSpinBox(
            value=0.0,
            min=0.0,
            max=1000.0,
            step=0.5,
            label="red-cell diameter (px)",
            tooltip="Red-cell diameter in the images (one scanner); 0 estimates it per image.",
        )
        self._from_default = CheckBox(value=True, text="start from the default model's weights")
        self._resume = CheckBox(value=True, text="resume the output file if it exists")
        self._run = PushButton(text="Train")
        self._cancel = PushButton(text="Cancel")
        self._status = Label(value="")
        # Long log lines (paths) wrap or clip instead of widening the dock.
        self._status.native.setWordWrap(True)
        self._status.native.setSizePolicy(QSizePolicy.Ignored, QSizePolicy.Preferred)
        self.extend(
            [
                self._data,
                self._out,
                self._steps,
                self._batch_size,
                self._lr,
                self._device,
                self._rbc_diameter,
                self._from_default,
                self._resume,
                Container(widgets=[self._run, self._cancel], layout="horizontal", labels=False),
                self._status,
            ]
        )
        self._runner = TaskRunner(self._run, self._cancel, "Training the diffusion model")
        self._run.changed.connect(self._start)
        # Written by the worker thread, shown by a main-thread timer (Qt is main-thread only).
        self._progress_text = {"status": "", "log": ""}
        self._timer = QTimer(self.native)  # dies with the widget
        self._timer.setInterval(200)
        self._timer.timeout.connect(self._show_progress)

    def _start(self):
        data, out = Path(self._data.value), Path(self._out.value)
        if not data.is_dir():
            show_error(
                "Choose the cell folder: one subfolder of single-cell images per class "
                f"({', '.join(CLASSES)})."
            )
            return
        if str(self._out.value) in ("", ".") or out.is_dir():
            show_error("Choose the output file the trained model is written to (.ckpt).")
            return
        resume = out if self._resume.value and out.is_file() else None
        options = {
            "steps": self._steps.value,
            "batch_size": self._batch_size.value,
            "lr": self._lr.value,
            "device": self._device.value,
            "resume": resume,
        }
        rbc_diameter = self._rbc_diameter.value or None
        from_default = self._from_default.value and resume is None
        self._progress_text.update(status="starting", log="")
        self._runner.start(
            lambda progress: _train(
                data, out, rbc_diameter, from_default, options, self._progress_text, progress
            ),
            lambda summary: self._finished(out, summary),
        )
        # Only now: the timer stops itself when it finds no work running.
        self._timer.start()

    def _show_progress(self):
        text = self._progress_text["status"]
        if self._progress_text["log"]:
            text += "\n" + self._progress_text["log"]
        self._status.value = text
        if not self._runner.running:
            self._timer.stop()

    def _finished(self, out, summary):
        if summary is None:
            if out.is_file():
                self._progress_text["status"] = "cancelled; Train again to resume"
                message = f"Training cancelled; {out} holds the last step. Train again to resume."
            else:
                self._progress_text["status"] = "cancelled"
                message = "Training cancelled before its first step; nothing was written."
            self._show_progress()
            show_info(message)
            return
        history = summary["history"]
        losses = f"step {summary['step']}, loss {history['train_loss'][-1][1]:.4f}"
        if history["val_loss"]:
            losses += f", validation loss {history['val_loss'][-1][1]:.4f}"
        self._progress_text["status"] = f"done: {losses}"
        self._show_progress()
        show_info(f"Training reached {losses}. The model is {out}; give this path as the model.")


def _train(data, out, rbc_diameter, from_default, options, text, progress):
    """Worker: normalise the folder's cells once, then train; ``text`` shows the progress.

    Returns None when cancelled, after training saved its checkpoint: a cancel is an
    outcome here, not an error to report.
    """
    try:
        return _prepare_and_train(data, out, rbc_diameter, from_default, options, text, progress)
    except Cancelled:
        return None


def _prepare_and_train(data, out, rbc_diameter, from_default, options, text, progress):
    from napari_cytodiffusion.core.datasets import list_labelled_images, pack_cells
    from napari_cytodiffusion.core.training import train
    from napari_cytodiffusion.core.weights import model_path

    pack = out.with_suffix(".cells.npz")  # the same file the `train` command writes and reuses
    if not pack.exists():
        records = [r for r in list_labelled_images(data) if r.split in ("train", "val")]

        def packing(done, total):
            text["status"] = f"normalising cells {done}/{total}"
            progress(done, total)

        pack_cells(records, pack, IMAGE_SIZE, rbc_diameter, progress=packing)
    init = None
    if from_default:
        text["status"] = "checking the default weights"
        init = model_path("default")

    def training(step, steps, loss):
        text["status"] = f"step {step}/{steps}, loss {loss:.4f}"
        progress(step, steps)

    return train(
        pack,
        out,
        init=init,
        image_size=IMAGE_SIZE,
        progress=training,
        log=lambda message: text.update(log=message),
        **options,
    )
