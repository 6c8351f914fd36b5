"""Screenshots of the "Turing test" widget: a cell being judged, then the score.

Copies two PBC test cells per class into a folder of class subfolders, builds a panel of 16
real and 16 synthetic cells, answers some cells (screenshot), then the rest, and saves the
scored window.

    xvfb-run -a python docs/scripts/screenshot_turing_widget.py

Writes docs/images/turing_widget.png and docs/images/turing_widget_score.png.
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

from napari_cytodiffusion._widgets._turing import TuringWidget
from napari_cytodiffusion.core.datasets import list_labelled_images

ROOT = Path(__file__).resolve().parents[2]
PBC = ROOT.parent / "shared" / "data" / "pbc"
CELLS_PER_CLASS = 2


def close_toasts(viewer):
    for toast in viewer.window._qt_window.findChildren(NapariQtNotification):
        toast.close()  # this machine's Qt-binding deprecation warning


def wait(seconds, until=lambda: False):
    end = time.time() + seconds
    while time.time() < end and not until():
        QApplication.processEvents()
        time.sleep(0.05)


def real_folder(target):
    records = [r for r in list_labelled_images(PBC / "splits.csv") if r.split == "test"]
    for label in sorted({r.label for r in records}):
        (target / label).mkdir(parents=True)
        for record in [r for r in records if r.label == label][:CELLS_PER_CLASS]:
            shutil.copy(record.path, target / label / record.path.name)
    return target


def main():
    get_settings().application.gui_notification_level = "none"  # toasts would hide the canvas
    with tempfile.TemporaryDirectory() as folder:
        viewer = napari.Viewer()
        widget = TuringWidget(viewer)
        viewer.window.add_dock_widget(widget, name="Turing test")
        widget._folder.value = real_folder(Path(folder) / "real")
        widget._count.value = 16
        widget._rbc_diameter.value = 29.0
        widget._device.value = "cpu"
        widget._out.value = Path(folder)
        viewer.window._qt_window.resize(1500, 850)
        widget._build.native.click()
        wait(900, lambda: widget.testing)
        # Answers here are random: this shows the mechanics, it is not an expert's result.
        rng = np.random.default_rng(0)
        for _ in range(5):
            widget.answer(rng.choice(["real", "synthetic"]))
        wait(1)
        out = ROOT / "docs" / "images" / "turing_widget.png"
        close_toasts(viewer)
        wait(0.5)
        viewer.screenshot(str(out), canvas_only=False)
        while widget.testing:
            widget.answer(rng.choice(["real", "synthetic"]))
        wait(1)
        scored = ROOT / "docs" / "images" / "turing_widget_score.png"
        close_toasts(viewer)
        wait(0.5)
        viewer.screenshot(str(scored), canvas_only=False)
        print(f"saved {out} and {scored}")
        viewer.close()


if __name__ == "__main__":
    main()
