"""Screenshots of the Segment widget at work on the bundled samples, and with the nuclei
layer on a pale phone-camera field of ../shared/data (docs/images/segment_*.png).

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


PALE_PHONE_FIELD = (
    Path(__file__).resolve().parents[3]
    / "shared/data/wbc_smartphone_pig/train/images/498_jpg.rf.5c3db27a08aa58f74410bd959b82fdbf.jpg"
)


def screenshot(sample, out, path=None, nuclei=False, zoom=None):
    """``sample`` (a bundled sample's name, or the layer name of ``path``) segmented; with
    ``zoom`` = (centre row, centre col, zoom) the view is brought close to its cells."""
    viewer = napari.Viewer()
    viewer.window.resize(1500, 860)
    if path is None:
        viewer.open_sample(PLUGIN, sample)
    else:
        viewer.add_image(iio.imread(path), name=sample, rgb=True)
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment cells")
    widget.native.setMaximumWidth(430)  # leave the canvas most of the window
    widget._nuclei.value = nuclei
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
    if zoom is not None:
        viewer.scene.camera.center, viewer.scene.camera.zoom = zoom[:2], zoom[2]
    if nuclei:  # the nuclei inside the white cells' outlines, without the red cells' outlines
        viewer.layers[f"{sample} red cells"].visible = False
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
    screenshot(
        "phone_498",
        IMAGES / "segment_nuclei_phone.png",
        PALE_PHONE_FIELD,
        nuclei=True,
        zoom=(190, 205, 4.5),
    )
