"""Screenshots of every widget at 1600 x 1000 (a laptop screen), for the docs.

    xvfb-run -a -s "-screen 0 1600x1000x24" python docs/scripts/screenshot_widgets.py [NAME...]

NAME is any of segment, analyze, classify, classify_soft, cell_images, counterfactual, grid,
generate, turing, train, annotate, adapt (default: all). Each widget is docked alone in a fresh
viewer, run on real data (the bundled CBC smear field; PBC cells and dataset 1 from
../shared/data) on the CPU, and the window is saved to docs/images/ once the result is
shown. Each screenshot checks that the canvas keeps at least 900 px of the width. ``grid``
saves the Counterfactuals widget's class x class figure of 24 PBC test cells through its
dock's Save PNG instead.
"""

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import napari
import numpy as np
from napari._qt.dialogs.qt_notification import NapariQtNotification
from napari.settings import get_settings
from qtpy.QtWidgets import QApplication

from napari_cytodiffusion._widgets._adapt import AdaptWidget
from napari_cytodiffusion._widgets._analyze import AnalyzeWidget
from napari_cytodiffusion._widgets._annotate import AnnotateWidget
from napari_cytodiffusion._widgets._cell_images import CellImagesWidget
from napari_cytodiffusion._widgets._classify import ClassifyWidget
from napari_cytodiffusion._widgets._counterfactual import CounterfactualWidget, FigureDock
from napari_cytodiffusion._widgets._generate import GenerateWidget
from napari_cytodiffusion._widgets._segment import SegmentWidget
from napari_cytodiffusion._widgets._train import TrainWidget
from napari_cytodiffusion._widgets._turing import TuringWidget
from napari_cytodiffusion.core.datasets import list_labelled_images
from napari_cytodiffusion.core.io import read_image
from napari_cytodiffusion.core.model.weights import CACHE_ENV
from napari_cytodiffusion.core.turing import normalise_real_cells

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "docs" / "images"
PBC = ROOT.parent / "shared" / "data" / "pbc"
WBC1 = ROOT.parent / "shared" / "data" / "segmentation_wbc_dataset1"
PLUGIN, SAMPLE = "napari-cytodiffusion", "cbc_monocyte_eosinophil"
SCREEN, MIN_CANVAS_WIDTH = (1600, 1000), 900


def wait(seconds, until=lambda: False):
    end = time.time() + seconds
    while time.time() < end and not until():
        QApplication.processEvents()
        time.sleep(0.05)


def docked(widget_class, title):
    viewer = napari.Viewer()
    viewer.window._qt_window.resize(*SCREEN)
    widget = widget_class(viewer)
    viewer.window.add_dock_widget(widget, name=title)
    if hasattr(widget, "_device"):
        widget._device.value = "cpu"
    return viewer, widget


def run(widget, button, seconds=1800):
    button.native.click()
    wait(seconds, lambda: not widget._runner.running)
    wait(1)


def segmented_sample(viewer):
    """The bundled CBC field, segmented as Segment cells does (its widget, not docked)."""
    viewer.open_sample(PLUGIN, SAMPLE)
    segment = SegmentWidget(viewer)
    segment.start(viewer.layers[SAMPLE])
    wait(600, lambda: not segment.runner.running)
    for suffix in ("red cells", "platelets"):
        viewer.layers[f"{SAMPLE} {suffix}"].visible = False
    return viewer.layers[f"{SAMPLE} white cells"]


def save(viewer, name):
    for toast in viewer.window._qt_window.findChildren(NapariQtNotification):
        toast.close()  # this machine's Qt-binding deprecation warning
    wait(1)
    width = viewer.window._qt_viewer.canvas.native.width()
    assert width >= MIN_CANVAS_WIDTH, f"{name}: the canvas is only {width} px wide"
    viewer.screenshot(str(IMAGES / name), canvas_only=False)
    print(f"saved docs/images/{name} (canvas {width} px wide)")


def pbc_folder(target, split, per_class):
    """A folder of class subfolders with the first ``per_class`` PBC cells of ``split``."""
    records = [r for r in list_labelled_images(PBC / "splits.csv") if r.split == split]
    chosen = []
    for label in sorted({r.label for r in records}):
        (target / label).mkdir(parents=True)
        for record in [r for r in records if r.label == label][:per_class]:
            shutil.copy(record.path, target / label / record.path.name)
            chosen.append(record)
    return chosen


def segment():
    viewer, widget = docked(SegmentWidget, "Segment cells")
    viewer.open_sample(PLUGIN, SAMPLE)
    widget._image.value = viewer.layers[SAMPLE]
    run(widget, widget._run)
    viewer.reset_view()
    save(viewer, "segment_widget.png")
    viewer.close()


def analyze():
    viewer, widget = docked(AnalyzeWidget, "Analyze smear")
    viewer.open_sample(PLUGIN, SAMPLE)
    widget._image.value = viewer.layers[SAMPLE]
    widget._out.value = tempfile.mkdtemp()
    widget._open.value = False
    run(widget, widget._run)
    viewer.reset_view()
    save(viewer, "analyze_widget.png")
    viewer.close()


def classify():
    viewer, widget = docked(ClassifyWidget, "Classify cells")
    segmented_sample(viewer)
    run(widget, widget._run)
    viewer.layers.selection.active = widget.class_layer
    viewer.reset_view()
    save(viewer, "classify_smear.png")
    viewer.close()


def classify_soft():
    """A PBC test neutrophil defocused by about 1.5 model pixels, as a single-cell image."""
    from scipy import ndimage as ndi

    viewer, widget = docked(ClassifyWidget, "Classify cells")
    record = next(
        r
        for r in list_labelled_images(PBC / "splits.csv")
        if r.split == "test" and r.label == "neutrophil"
    )
    image = read_image(record.path).astype(np.float32)
    soft = ndi.gaussian_filter(image, (1.7, 1.7, 0)).round().astype(np.uint8)
    viewer.add_image(soft, name="neutrophil, defocused", rgb=True)
    widget._image.value = viewer.layers["neutrophil, defocused"]
    widget._single.value = True
    run(widget, widget._run)
    viewer.layers.selection.active = widget.class_layer
    viewer.reset_view()
    save(viewer, "classify_soft.png")
    viewer.close()


def cell_images():
    """A folder of 3 PBC val cells per class and 4 cells of dataset 1 (another microscope),
    the first of which a person has called."""
    viewer, widget = docked(CellImagesWidget, "Classify cell images")
    widget._fields.device.value = "cpu"
    with tempfile.TemporaryDirectory() as folder:
        export = Path(folder) / "cell_export"
        export.mkdir()
        for record in pbc_folder(Path(folder) / "pbc", "val", 3):
            shutil.copy(record.path, export / record.path.name)
        for image_id in (1, 2, 3, 4):
            source = WBC1 / f"{image_id:03d}_image.png"
            shutil.copy(source, export / f"wbc1_{source.name}")
        widget._folder.value = export
        run(widget, widget._run)
        widget.select(25)  # a person calls the first dataset-1 cell, a lymphocyte
        widget.set_label("lymphocyte")
        wait(1)
        save(viewer, "cell_images_widget.png")
    viewer.close()


def counterfactual():
    viewer, widget = docked(CounterfactualWidget, "Counterfactuals")
    white = segmented_sample(viewer)
    white.visible = False
    widget._image.value = viewer.layers[SAMPLE]
    widget._labels.value = white
    table = white.features
    biggest = table.sort_values("area").iloc[-1]
    white.selected_label = int(biggest["index"])  # what clicking the cell does
    widget._target.value = "lymphocyte"
    run(widget, widget._explain)
    heat = viewer.layers[-1]
    viewer.camera.center = (biggest["centroid_row"], biggest["centroid_col"])
    viewer.camera.zoom = (
        0.6 * viewer.window._qt_viewer.canvas.native.height() / (heat.scale[0] * heat.data.shape[0])
    )
    save(viewer, "counterfactual_widget.png")
    viewer.close()


def grid():
    """The class x class mean maps of 3 PBC test cells per class (current class = truth)."""
    import pandas as pd

    viewer, widget = docked(CounterfactualWidget, "Counterfactuals")
    records = [r for r in list_labelled_images(PBC / "splits.csv") if r.split == "test"]
    chosen = []
    for label in sorted({r.label for r in records}):
        chosen += [r for r in records if r.label == label][:3]
    crops = normalise_real_cells(chosen, 64, rbc_diameter=29.0)
    features = pd.DataFrame({"index": np.arange(len(chosen)), "label": [r.label for r in chosen]})
    layer = viewer.add_image(
        crops, rgb=True, name="PBC test cells", metadata={"features": features}
    )
    widget._image.value = layer
    widget._trials.value = 16
    run(widget, widget._grid)
    dock = next(d for d in viewer.window.dock_widgets.values() if isinstance(d, FigureDock))
    dock.save(IMAGES / "counterfactual_grid.png")
    print("saved docs/images/counterfactual_grid.png")
    viewer.close()


def generate():
    viewer, widget = docked(GenerateWidget, "Generate cells")
    segmented_sample(viewer)
    for label, seed in (("eosinophil", 1), ("monocyte", 2)):
        widget._label.value = label
        widget._seed.value = seed
        run(widget, widget._run)
    viewer.reset_view()
    save(viewer, "generate_widget.png")
    viewer.close()


def turing():
    viewer, widget = docked(TuringWidget, "Turing test")
    viewer.open_sample(PLUGIN, SAMPLE)
    with tempfile.TemporaryDirectory() as folder:
        pbc_folder(Path(folder) / "real", "test", 2)
        widget._folder.value = Path(folder) / "real"
        widget._count.value = 16
        widget._rbc_diameter.value = 29.0
        widget._out.value = Path(folder)
        run(widget, widget._build)
        # Answers here are random: this shows the mechanics, it is not an expert's result.
        rng = np.random.default_rng(0)
        for _ in range(5):
            widget.answer(rng.choice(["real", "synthetic"]))
        save(viewer, "turing_widget.png")
        while widget.testing:
            widget.answer(rng.choice(["real", "synthetic"]))
        save(viewer, "turing_widget_score.png")
    viewer.close()


def train():
    viewer, widget = docked(TrainWidget, "Train model")
    with tempfile.TemporaryDirectory() as folder:
        cells = Path(folder) / "lab_cells"
        chosen = pbc_folder(cells, "train", 6)
        (cells / "unsorted").mkdir()  # not a class: its cell is left out, with a warning
        shutil.copy(chosen[0].path, cells / "unsorted")
        montage = np.concatenate(
            [
                np.concatenate([read_image(r.path)[..., :3] for r in chosen[i : i + 6]], axis=1)
                for i in range(0, len(chosen), 6)
            ]
        )
        viewer.add_image(montage, name="training cells (6 per class)", rgb=True)
        widget._data.value = cells
        widget._out.value = Path(folder) / "lab_finetuned.ckpt"
        widget._steps.value = 500
        widget._batch_size.value = 8
        widget._rbc_diameter.value = 29.0
        viewer.reset_view()
        widget._run.native.click()
        wait(600, lambda: "step 3/" in widget._details.value)
        activity = viewer.window._qt_window._activity_dialog  # napari's progress bars
        activity.show()
        activity.move_to_bottom_right()
        wait(3)
        save(viewer, "train_widget.png")
        widget._cancel.native.click()
        wait(120, lambda: not widget._runner.running)
    viewer.close()


def annotate():
    """A person's review of the bundled field, opened from a file so the review is saved."""
    viewer, widget = docked(AnnotateWidget, "Annotate cells")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"{SAMPLE}.jpg"
        shutil.copy(ROOT / "src" / "napari_cytodiffusion" / "sample_data" / path.name, path)
        (image,) = viewer.open(path, plugin="napari")
        segment = SegmentWidget(viewer)
        segment.start(image)
        wait(600, lambda: not segment.runner.running)
        for suffix in ("red cells", "platelets"):
            viewer.layers[f"{image.name} {suffix}"].visible = False
        classify = ClassifyWidget(viewer)
        classify._device.value = "cpu"
        run(classify, classify._run)
        viewer.layers[f"{image.name} white cells"].visible = False
        widget.reset_choices()
        widget._layer.value = classify.class_layer
        widget.next_flagged()
        widget._class.value = "eosinophil"
        widget.set_label("eosinophil")
        viewer.layers.selection.active = classify.class_layer
        viewer.reset_view()
        save(viewer, "annotate_widget.png")
    viewer.close()


def adapt():
    """Adapting to 10 cells per class of another microscope and stain (dataset 1)."""
    import csv

    names = {"1": "neutrophil", "2": "lymphocyte", "3": "monocyte", "4": "eosinophil"}
    viewer, widget = docked(AdaptWidget, "Adapt / calibrate model")
    with tempfile.TemporaryDirectory() as folder, open(WBC1 / "class_labels.csv") as handle:
        os.environ[CACHE_ENV] = folder  # the demo model is not kept among the user's models
        cells, chosen = Path(folder) / "lab_cells", []
        for image_id, label in list(csv.reader(handle))[1:]:
            name = names.get(label)
            if name and sum(1 for _, n in chosen if n == name) < 10:
                (cells / name).mkdir(parents=True, exist_ok=True)
                source = WBC1 / f"{int(image_id):03d}_image.png"
                shutil.copy(source, cells / name / source.name)
                chosen.append((source, name))
        tiles = [read_image(p)[:100, :100, :3] for p, _ in sorted(chosen, key=lambda c: c[1])]
        montage = np.concatenate(
            [np.concatenate(tiles[i : i + 10], axis=1) for i in range(0, len(tiles), 10)]
        )
        viewer.add_image(montage, name="lab cells (10 per class)", rgb=True)
        widget._data.value = cells
        widget._name.value = "wbc1-demo"
        widget._steps.value = 60
        viewer.reset_view()
        run(widget, widget._adapt)
        viewer.reset_view()
        save(viewer, "adapt_widget.png")
    viewer.close()


SHOTS = {
    "segment": segment,
    "analyze": analyze,
    "classify": classify,
    "classify_soft": classify_soft,
    "cell_images": cell_images,
    "counterfactual": counterfactual,
    "grid": grid,
    "generate": generate,
    "turing": turing,
    "train": train,
    "annotate": annotate,
    "adapt": adapt,
}


def main(names):
    get_settings().application.gui_notification_level = "none"  # toasts would hide the canvas
    for name in names or SHOTS:
        SHOTS[name]()


if __name__ == "__main__":
    main(sys.argv[1:])
