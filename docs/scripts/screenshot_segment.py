"""Screenshots of the Segment widget at work on the bundled samples (docs/images/segment_*.png).

xvfb-run -a python docs/scripts/screenshot_segment.py
"""

from pathlib import Path

import imageio.v3 as iio
import napari
import numpy as np
from napari._qt.dialogs.qt_notification import NapariQtNotification
from napari.settings import get_settings
from qtpy.QtWidgets import QApplication

PLUGIN = "napari-cytodiffusion"
IMAGES = Path(__file__).resolve().parents[1] / "images"


def screenshot(sample, out):
    viewer = napari.Viewer()
    viewer.window.resize(1500, 860)
    viewer.open_sample(PLUGIN, sample)
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment cells")
    widget.native.setMaximumWidth(430)  # leave the canvas most of the window
    widget._run.native.click()
    app = QApplication.instance()
    while widget.runner.running or f"{sample} white cells" not in viewer.layers:
        app.processEvents()
    for _ in range(20):
        app.processEvents()
    white = viewer.layers[f"{sample} white cells"]
    white.contour = 3  # outlines keep the cell itself visible
    viewer.layers[f"{sample} red cells"].contour = 2
    # What hovering the first white cell shows in the status bar.
    cell = white.features.iloc[0]
    viewer.status = white.get_status((cell.centroid_row, cell.centroid_col), world=True)
    viewer.reset_view()
    for toast in app.allWidgets():
        if isinstance(toast, NapariQtNotification):
            toast.close()
    for _ in range(5):
        app.processEvents()
    iio.imwrite(out, np.asarray(viewer.screenshot(canvas_only=False)))
    print(out, widget._summary.value)
    viewer.close()


if __name__ == "__main__":
    get_settings().application.gui_notification_level = "none"  # toasts would hide the canvas
    IMAGES.mkdir(parents=True, exist_ok=True)
    screenshot("cbc_monocyte_eosinophil", IMAGES / "segment_cbc.png")
    screenshot("pbc_lymphocyte", IMAGES / "segment_pbc.png")
