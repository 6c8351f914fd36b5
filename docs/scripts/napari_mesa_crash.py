"""napari alone: remove an image under a Labels layer, then show a notification.

    xvfb-run -a python docs/scripts/napari_mesa_crash.py [keep]

Under Mesa's software OpenGL (napari 0.9.2, vispy 0.17) the viewer crashes with a segmentation
fault once the toast appears; with ``keep`` (the image left in place) it does not.
"""

import sys
import time

import napari
import numpy as np
from napari.utils.notifications import show_info
from qtpy.QtWidgets import QApplication


def wait(seconds):
    end = time.time() + seconds
    while time.time() < end:
        QApplication.processEvents()
        time.sleep(0.05)


viewer = napari.Viewer()
viewer.add_image(np.random.default_rng(0).integers(0, 255, (480, 640, 3), np.uint8), rgb=True)
cells = np.zeros((480, 640), np.uint16)
cells[100:200, 100:200], cells[300:400, 300:450] = 1, 2
viewer.add_labels(cells)
wait(1)
if "keep" not in sys.argv:
    viewer.layers.remove(viewer.layers[0])
wait(0.5)
show_info("a notification")
wait(3)
print("no crash")
