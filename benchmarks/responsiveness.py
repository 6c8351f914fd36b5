"""Main-thread stalls of the viewer while the widgets run, and when a result is run again.

    xvfb-run -a python benchmarks/responsiveness.py [--repeats 3] [--tag NAME]

A fresh viewer opens the bundled field ``cbc_monocyte_eosinophil`` with *Segment cells* and
*Classify cells* docked. A 5 ms timer on the Qt event loop records the gaps between its ticks;
the longest gap is the longest stall a person would feel. Measured for each repeat: the first
segmentation and a second one of the same image (while the work runs, and from the moment the
worker returns until its layers are in), a classification, and three changes of the review
threshold (which move the review markers without running the model). Results are added to
benchmarks/results/responsiveness.json under ``TAG`` (default: the git commit).
"""

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "responsiveness.json"
SAMPLE = "cbc_monocyte_eosinophil"


class Ticks:
    """Times of a 5 ms timer's ticks on the main thread."""

    def __init__(self):
        from qtpy.QtCore import QTimer

        self.times = [time.perf_counter()]
        self._timer = QTimer()
        self._timer.setInterval(5)
        self._timer.timeout.connect(lambda: self.times.append(time.perf_counter()))
        self._timer.start()

    def longest_gap(self, start, end):
        inside = [t for t in self.times if start <= t <= end]
        edges = [start, *inside, end]
        return max(b - a for a, b in zip(edges, edges[1:], strict=False))


def spin(app, seconds):
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        app.processEvents()


def run_widget(app, ticks, widget, runner):
    """Press the widget's run button; (stall while working, stall while adding layers)."""
    returned = []
    started = time.perf_counter()
    widget._run.native.click()
    runner.worker.returned.connect(lambda *_: returned.append(time.perf_counter()))
    while runner.running:
        app.processEvents()
    spin(app, 0.5)  # the new layers' first draw
    ended = time.perf_counter()
    back = returned[0] if returned else ended
    return ticks.longest_gap(started, back), ticks.longest_gap(back, ended)


def one_repeat():
    import napari
    from qtpy.QtWidgets import QApplication

    from napari_cytodiffusion._widgets._classify import ClassifyWidget
    from napari_cytodiffusion._widgets._segment import SegmentWidget

    viewer = napari.Viewer()
    app = QApplication.instance()
    viewer.open_sample("napari-cytodiffusion", SAMPLE)
    segment, classify = SegmentWidget(viewer), ClassifyWidget(viewer)
    viewer.window.add_dock_widget(segment)
    viewer.window.add_dock_widget(classify)
    classify._device.value = "cpu"
    ticks = Ticks()
    spin(app, 1.0)
    out = {}
    for key in ("segment_first", "segment_again"):
        working, adding = run_widget(app, ticks, segment, segment.runner)
        out[key] = {"working_s": round(working, 3), "adding_layers_s": round(adding, 3)}
    classify.reset_choices()
    working, adding = run_widget(app, ticks, classify, classify._runner)
    out["classify"] = {"working_s": round(working, 3), "adding_layers_s": round(adding, 3)}
    stalls = []
    for value in (0.05, 0.5, 0.9):
        started = time.perf_counter()
        classify._uncertainty.value = value
        spin(app, 0.5)
        stalls.append(round(ticks.longest_gap(started, time.perf_counter()), 3))
    out["review_threshold_change_s"] = stalls
    viewer.close()
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tag")
    args = parser.parse_args()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    runs = []
    for _ in range(args.repeats):
        runs.append(one_repeat())
        print(json.dumps(runs[-1]), flush=True)
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    results[args.tag or commit] = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "commit": commit,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Xvfb",
        "runs": runs,
    }
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
