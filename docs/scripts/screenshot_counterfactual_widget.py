"""Screenshots of the "Counterfactuals" widget on a real smear, and a class x class grid.

Segments a CBC test smear, selects its white cell as a click would, explains it towards a
target class (heat map and counterfactual layers over the cell), opens the all-classes figure,
and saves the window. Then builds the class x class grid for a stack of PBC test cells and
saves that figure through the dock's save function.

    xvfb-run -a python docs/scripts/screenshot_counterfactual_widget.py

Writes docs/images/counterfactual_widget.png and docs/images/counterfactual_grid.png.
"""

import time
from pathlib import Path

import napari
import numpy as np
import pandas as pd
from napari._qt.dialogs.qt_notification import NapariQtNotification
from napari.settings import get_settings
from qtpy.QtWidgets import QApplication

from napari_cytodiffusion._widgets._counterfactual import CounterfactualWidget, FigureDock
from napari_cytodiffusion.core.datasets import list_labelled_images
from napari_cytodiffusion.core.io import read_image
from napari_cytodiffusion.core.smear.segmentation import segment_smear
from napari_cytodiffusion.core.turing import normalise_real_cells

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data"
SMEAR = DATA / "cbc" / "test" / "images" / "BloodImage_00339.jpg"
GRID_CELLS_PER_CLASS = 3


def close_toasts(viewer):
    for toast in viewer.window._qt_window.findChildren(NapariQtNotification):
        toast.close()  # this machine's Qt-binding deprecation warning


def wait(seconds, until=lambda: False):
    end = time.time() + seconds
    while time.time() < end and not until():
        QApplication.processEvents()
        time.sleep(0.05)


def figure_docks(viewer):
    return [d for d in viewer.window.dock_widgets.values() if isinstance(d, FigureDock)]


def smear_screenshot():
    image = read_image(SMEAR)[..., :3]
    found = segment_smear(image)
    table = found.table("wbc")
    viewer = napari.Viewer()
    viewer.add_image(image, name="smear")
    labels = viewer.add_labels(found.wbc_labels, name="white cells", opacity=0.3)
    labels.metadata["rbc_diameter"] = found.rbc_diameter
    widget = CounterfactualWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Counterfactuals")
    widget._image.value = viewer.layers["smear"]
    widget._labels.value = labels
    widget._device.value = "cpu"
    widget._target.value = "lymphocyte"
    biggest = table.sort_values("area").iloc[-1]
    centre = (biggest["centroid_row"], biggest["centroid_col"])
    widget._cell_id.value = int(biggest["index"])  # what clicking the cell does
    viewer.window._qt_window.resize(1600, 1000)
    widget._explain.native.click()
    wait(900, lambda: len(viewer.layers) == 4)
    wait(60, lambda: not widget._runner.running)
    widget._all_classes.native.click()
    wait(1800, lambda: len(figure_docks(viewer)) == 1)
    wait(60, lambda: not widget._runner.running)
    viewer.layers["white cells"].visible = False
    viewer.reset_view()  # fits the whole field; then zoom so the crop fills half the view
    crop_extent = viewer.layers[3].scale[0] * viewer.layers[3].data.shape[0]
    viewer.camera.zoom *= min(image.shape[:2]) / (1.6 * crop_extent)
    viewer.camera.center = centre
    wait(1)
    out = ROOT / "docs" / "images" / "counterfactual_widget.png"
    close_toasts(viewer)
    wait(0.5)
    viewer.screenshot(str(out), canvas_only=False)
    print(f"saved {out}: cell {widget._cell_id.value}:", viewer.layers[3].name)
    viewer.close()


def grid_figure():
    records = [r for r in list_labelled_images(DATA / "pbc" / "splits.csv") if r.split == "test"]
    chosen = []
    for label in sorted({r.label for r in records}):
        chosen += [r for r in records if r.label == label][:GRID_CELLS_PER_CLASS]
    crops = normalise_real_cells(chosen, 64, rbc_diameter=29.0)
    features = pd.DataFrame({"index": np.arange(len(chosen)), "label": [r.label for r in chosen]})
    viewer = napari.Viewer()
    layer = viewer.add_image(
        crops, rgb=True, name="PBC test cells", metadata={"features": features}
    )
    widget = CounterfactualWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Counterfactuals")
    widget._image.value = layer
    widget._device.value = "cpu"
    widget._trials.value = 16
    widget._grid.native.click()
    wait(3600, lambda: len(figure_docks(viewer)) == 1)
    out = ROOT / "docs" / "images" / "counterfactual_grid.png"
    figure_docks(viewer)[0].save(out)
    print(f"saved {out}")
    viewer.close()


def main():
    get_settings().application.gui_notification_level = "none"  # toasts would hide the canvas
    smear_screenshot()
    grid_figure()


if __name__ == "__main__":
    main()
