"""Screenshot of the Classify widget at work on a bundled CBC smear field (docs/images/)."""

import sys
from pathlib import Path

import napari
import numpy as np
from napari.settings import get_settings
from qtpy.QtWidgets import QApplication

from napari_cytodiffusion._widgets._classify import ClassifyWidget
from napari_cytodiffusion.core.io import read_image

get_settings().application.gui_notification_level = "none"  # toasts would hide the canvas
image_path = Path(sys.argv[1])
out = Path(sys.argv[2])
viewer = napari.Viewer()
viewer.window.resize(1500, 900)
viewer.add_image(read_image(image_path), name=image_path.stem, rgb=True)
widget = ClassifyWidget(viewer)
viewer.window.add_dock_widget(widget, name="Classify cells")
widget._run.clicked()
app = QApplication.instance()
while widget._runner.running or widget.class_layer is None:
    app.processEvents()
for _ in range(20):
    app.processEvents()
widget.class_layer.contour = 3  # outlines in the class colour keep the cell visible
viewer.layers.selection.active = widget.class_layer
viewer.reset_view()
for toast in app.allWidgets():  # the PyQt5 deprecation toast would hide part of the canvas
    if type(toast).__name__ == "NapariQtNotification":
        toast.close()
for _ in range(20):
    app.processEvents()

out.parent.mkdir(parents=True, exist_ok=True)
import imageio.v3 as iio  # noqa: E402

iio.imwrite(out, np.asarray(viewer.screenshot(canvas_only=False)))
print(widget.class_layer.features.head())
viewer.close()
