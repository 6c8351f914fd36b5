"""Screenshot of the "Train / adapt model" widget fine-tuning the default model on real cells.

Copies a few PBC cells per class into a folder of class subfolders, starts training from the
default weights on the CPU, and saves the window once the loss shows.

    xvfb-run -a python docs/scripts/screenshot_train_widget.py

Writes docs/images/train_widget.png.
"""

import shutil
import tempfile
import time
from pathlib import Path

import napari
import numpy as np
from napari._qt.dialogs.qt_notification import NapariQtNotification
from napari.settings import get_settings
from qtpy.QtWidgets import QApplication

from napari_cytodiffusion._widgets._train import TrainWidget
from napari_cytodiffusion.core.datasets import list_labelled_images
from napari_cytodiffusion.core.io import read_image

ROOT = Path(__file__).resolve().parents[2]
PBC = ROOT.parent / "shared" / "data" / "pbc"
CELLS_PER_CLASS = 6


def lab_folder(target):
    """A folder of class subfolders with a few PBC train cells each; returns a montage."""
    records = [r for r in list_labelled_images(PBC / "splits.csv") if r.split == "train"]
    rows = []
    for label in sorted({r.label for r in records}):
        chosen = [r for r in records if r.label == label][:CELLS_PER_CLASS]
        (target / label).mkdir(parents=True)
        for record in chosen:
            shutil.copy(record.path, target / label / record.path.name)
        rows.append(np.concatenate([read_image(r.path)[..., :3] for r in chosen], axis=1))
    return np.concatenate(rows, axis=0)


def wait(seconds, until=lambda: False):
    end = time.time() + seconds
    while time.time() < end and not until():
        QApplication.processEvents()
        time.sleep(0.05)


def main():
    get_settings().application.gui_notification_level = "none"  # toasts would hide the canvas
    with tempfile.TemporaryDirectory() as folder:
        cells = Path(folder) / "lab_cells"
        montage = lab_folder(cells)
        viewer = napari.Viewer()
        viewer.add_image(montage, name="training cells (6 per class)", rgb=True)
        widget = TrainWidget(viewer)
        viewer.window.add_dock_widget(widget, name="Train / adapt model")
        widget._data.value = cells
        widget._out.value = Path(folder) / "lab_finetuned.ckpt"
        widget._steps.value = 500
        widget._batch_size.value = 8
        widget._device.value = "cpu"
        widget._rbc_diameter.value = 29.0
        viewer.window._qt_window.resize(1400, 850)
        wait(1)
        viewer.reset_view()
        widget._run.native.click()
        wait(600, lambda: "step 3/" in widget._status.value)
        activity = viewer.window._qt_window._activity_dialog  # napari's progress bars
        activity.show()
        activity.move_to_bottom_right()
        for toast in viewer.window._qt_window.findChildren(NapariQtNotification):
            toast.close()  # this machine's Qt-binding deprecation warning
        wait(1)
        out = ROOT / "docs" / "images" / "train_widget.png"
        viewer.screenshot(str(out), canvas_only=False)
        widget._cancel.native.click()
        wait(120, lambda: not widget._runner.running)
        viewer.close()
        print(f"saved {out}")


if __name__ == "__main__":
    main()
