"""Main-thread stalls of the viewer while the widgets run, and when a result is run again.

    xvfb-run -a python benchmarks/responsiveness.py [--repeats 3] [--pause 2] [--tag NAME]

A fresh viewer opens the bundled field ``cbc_monocyte_eosinophil`` with *Segment cells*,
*Classify cells* and *Generate cells* docked. A 5 ms timer on the Qt event loop records the
gaps between its ticks; the longest gap is the longest stall a person would feel. Measured for
each repeat (while the work runs, and from the moment the worker returns until its layers are
in): one generated cell with the model loaded afresh, the first segmentation and a second one of
the same image, a classification and a second one of the same image (its earlier result's
layers brought up to date), eight generated cells, and three changes of the review
threshold (which move the review markers without running the model), and four edits in
*Annotate cells* (a cell given a class, the classes layer recoloured). Before that, in a viewer
of its own, *Classify cell images* on eight PBC val images (in the first repeat, the first
layers of the session: napari builds its unit registry then). After each run a person
looks at the result for ``--pause`` seconds before the next action (0: the next run starts at
once, as before 2026-12-06's idle collection).

Python's full garbage collections (about 0.2 s with napari, torch and pandas loaded) stall
whichever thread runs them; each phase also reports its longest stall that no full collection
overlaps, and the full collections' lengths; since the widgets collect once the viewer has
been idle for a second after a run (``_widgets/_idle.py``), the collections made in each pause
are listed too. Results are added to
benchmarks/results/responsiveness.json under ``TAG`` (default: the git commit).
"""

import argparse
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import pbc_records  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "responsiveness.json"
SAMPLE = "cbc_monocyte_eosinophil"
CELL_IMAGES = 8  # PBC val images, the first of each class


class Ticks:
    """Times of a 5 ms timer's ticks on the main thread."""

    def __init__(self):
        from qtpy.QtCore import QTimer

        self.times = [time.perf_counter()]
        self._timer = QTimer()
        self._timer.setInterval(5)
        self._timer.timeout.connect(lambda: self.times.append(time.perf_counter()))
        self._timer.start()

    def gaps(self, start, end):
        inside = [t for t in self.times if start <= t <= end]
        edges = [start, *inside, end]
        return list(zip(edges, edges[1:], strict=False))

    def longest_gap(self, start, end):
        return max(b - a for a, b in self.gaps(start, end))


class FullCollections:
    """(start, end) of the interpreter's full (oldest-generation) garbage collections."""

    def __init__(self):
        self.spans, self._started = [], 0.0
        gc.callbacks.append(self._record)

    def _record(self, phase, info):
        if phase == "start":
            self._started = time.perf_counter()
        elif info["generation"] == 2:
            self.spans.append((self._started, time.perf_counter()))

    def stop(self):
        gc.callbacks.remove(self._record)

    def summary(self, ticks, start, end):
        """Longest stall with no full collection in it, and the collections' lengths."""
        inside = [(a, b) for a, b in self.spans if start <= a <= end]
        clean = [
            b - a
            for a, b in ticks.gaps(start, end)
            if not any(a <= gc_end and gc_start <= b for gc_start, gc_end in inside)
        ]
        return {
            "without_full_gc_s": round(max(clean, default=0.0), 3),
            "full_gc_s": [round(b - a, 3) for a, b in inside],
        }


def spin(app, seconds):
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        app.processEvents()


def run_widget(app, ticks, collections, widget, runner, pause=0.0):
    """Press the widget's run button: the stalls while working, while adding layers, and in
    the ``pause`` after it."""
    returned = []
    started = time.perf_counter()
    widget._run.native.click()
    runner.worker.returned.connect(lambda *_: returned.append(time.perf_counter()))
    while runner.running:
        app.processEvents()
    spin(app, 0.5)  # the new layers' first draw
    ended = time.perf_counter()
    back = returned[0] if returned else ended
    out = {
        "working_s": round(ticks.longest_gap(started, back), 3),
        "working": collections.summary(ticks, started, back),
        "adding_layers_s": round(ticks.longest_gap(back, ended), 3),
        "adding_layers": collections.summary(ticks, back, ended),
    }
    if pause:
        spin(app, pause)
        out["pause"] = collections.summary(ticks, ended, time.perf_counter())
    return out


def sample_with_widgets(viewer):
    """Open the sample in ``viewer`` and dock Segment, Classify and Generate cells (on the CPU,
    two sampling steps); returns the three widgets."""
    from napari_cytodiffusion._widgets._classify import ClassifyWidget
    from napari_cytodiffusion._widgets._generate import GenerateWidget
    from napari_cytodiffusion._widgets._segment import SegmentWidget

    viewer.open_sample("napari-cytodiffusion", SAMPLE)
    widgets = SegmentWidget(viewer), ClassifyWidget(viewer), GenerateWidget(viewer)
    for widget in widgets:
        viewer.window.add_dock_widget(widget)
    _, classify, generate = widgets
    classify._device.value = generate._device.value = "cpu"
    generate._steps.value = 2
    return widgets


def cell_images_run(folder, pause=0.0):
    """*Classify cell images* on ``folder`` in a new, empty viewer."""
    import napari
    from qtpy.QtWidgets import QApplication

    from napari_cytodiffusion._widgets._cell_images import CellImagesWidget

    viewer = napari.Viewer()
    app = QApplication.instance()
    widget = CellImagesWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget._folder.value = str(folder)
    widget._fields.device.value = "cpu"
    ticks, collections = Ticks(), FullCollections()
    spin(app, 1.0)
    out = run_widget(app, ticks, collections, widget, widget._runner, pause)
    collections.stop()
    viewer.close()
    return out


def cell_folder():
    """A temporary folder of ``CELL_IMAGES`` PBC val images, one class after another."""
    records = sorted(pbc_records("val"), key=lambda r: (r.label, str(r.path)))
    classes = sorted({r.label for r in records})
    chosen = [next(r for r in records if r.label == name) for name in classes]
    folder = Path(tempfile.mkdtemp(prefix="cell_images_"))
    for record in chosen[:CELL_IMAGES]:
        shutil.copy(record.path, folder)
    return folder


def one_repeat(pause=0.0):
    import napari
    from qtpy.QtWidgets import QApplication

    from napari_cytodiffusion.core.model import weights

    viewer = napari.Viewer()
    app = QApplication.instance()
    segment, classify, generate = sample_with_widgets(viewer)
    ticks, collections = Ticks(), FullCollections()
    spin(app, 1.0)
    out = {}
    weights._SHARED.clear()  # every repeat loads the model
    generate._count.value = 1
    out["model_load_and_1_cell"] = run_widget(
        app, ticks, collections, generate, generate._runner, pause
    )
    for key in ("segment_first", "segment_again"):
        out[key] = run_widget(app, ticks, collections, segment, segment.runner, pause)
    classify.reset_choices()
    for key in ("classify", "classify_again"):  # again: the earlier result's layers replaced
        out[key] = run_widget(app, ticks, collections, classify, classify._runner, pause)
    generate._count.value = 8
    out["generate_8"] = run_widget(app, ticks, collections, generate, generate._runner, pause)
    stalls = []
    for value in (0.05, 0.5, 0.9):
        started = time.perf_counter()
        classify._uncertainty.value = value
        spin(app, 0.5)
        stalls.append(round(ticks.longest_gap(started, time.perf_counter()), 3))
    out["review_threshold_change_s"] = stalls
    out["annotate_edit_s"] = annotate_edits(viewer, app, ticks, classify)
    collections.stop()
    viewer.close()
    return out


def annotate_edits(viewer, app, ticks, classify, count=4):
    """The stalls of ``count`` edits in *Annotate cells* (each gives the selected cell a
    class, recolours the classes layer and saves nothing: the sample has no file)."""
    from napari_cytodiffusion._widgets._annotate import AnnotateWidget

    widget = AnnotateWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.reset_choices()
    widget._layer.value = classify.class_layer
    spin(app, 1.5)  # a person reads the widget (and its idle collection runs)
    cells = list(classify.class_layer.features["index"])
    stalls = []
    for i in range(count):
        widget.select(cells[i % len(cells)])
        spin(app, 0.3)
        started = time.perf_counter()
        widget.set_label(("lymphocyte", "monocyte")[i % 2])
        spin(app, 0.5)
        stalls.append(round(ticks.longest_gap(started, time.perf_counter()), 3))
    return stalls


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pause", type=float, default=2.0)
    parser.add_argument(
        "--without-idle-collection",
        action="store_true",
        help="leave every full collection to Python (the widgets before 2026-12-06's change)",
    )
    parser.add_argument("--tag")
    args = parser.parse_args()
    if args.without_idle_collection:
        from napari_cytodiffusion._widgets import _idle

        _idle.IdleCollector.task_ended = lambda self: None
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    runs, folder = [], cell_folder()
    for _ in range(args.repeats):
        cell_images = cell_images_run(folder, args.pause)
        runs.append({f"cell_images_{CELL_IMAGES}": cell_images, **one_repeat(args.pause)})
        print(json.dumps(runs[-1]), flush=True)
    shutil.rmtree(folder)
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    results[args.tag or commit] = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "commit": commit,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Xvfb",
        "pause_s": args.pause,
        "idle_collection": not args.without_idle_collection,
        "runs": runs,
    }
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
