"""Screenshot of the "Generate cells" widget after two runs (eosinophils, then monocytes).

    xvfb-run -a python docs/scripts/screenshot_generate_widget.py

Writes docs/images/generate_widget.png.
"""

import time
from pathlib import Path

import napari
from napari._qt.dialogs.qt_notification import NapariQtNotification
from napari.settings import get_settings
from qtpy.QtWidgets import QApplication

from napari_cytodiffusion._widgets._generate import GenerateWidget

ROOT = Path(__file__).resolve().parents[2]


def wait(seconds, until=lambda: False):
    end = time.time() + seconds
    while time.time() < end and not until():
        QApplication.processEvents()
        time.sleep(0.05)


def main():
    get_settings().application.gui_notification_level = "none"  # toasts would hide the canvas
    viewer = napari.Viewer()
    widget = GenerateWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Generate cells")
    widget._device.value = "cpu"
    viewer.window._qt_window.resize(1500, 800)
    for label, seed in (("eosinophil", 1), ("monocyte", 2)):
        widget._label.value = label
        widget._seed.value = seed
        count = len(viewer.layers)
        widget._run.native.click()
        wait(600, lambda c=count: len(viewer.layers) > c)
        wait(60, lambda: not widget._runner.running)
    viewer.layers[1].translate = (0, 0, 70)  # the two stacks side by side
    viewer.dims.set_current_step(0, 3)
    viewer.reset_view()
    for toast in viewer.window._qt_window.findChildren(NapariQtNotification):
        toast.close()  # this machine's Qt-binding deprecation warning
    wait(1)
    out = ROOT / "docs" / "images" / "generate_widget.png"
    viewer.screenshot(str(out), canvas_only=False)
    print(f"saved {out}: {widget._status.value}")
    viewer.close()


if __name__ == "__main__":
    main()
