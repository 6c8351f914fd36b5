"""Opening the first widget of a session: how long the dock takes, and the stalls after it.

    xvfb-run -a python benchmarks/first_widget.py [--repeats 3] [--widget NAME ...] [--tag NAME]

Each repeat is a fresh Python process (torch not yet imported, as when napari starts): a
viewer opens and idles for a second, then one of the plugin's docks (default: *Classify
cells*; ``--widget`` names others, each measured in its own processes) is added the way the
plugin menu adds it. A 5 ms timer on the Qt event loop records the gaps between its
ticks for the next five seconds. Reported per repeat: the time the dock took to appear (the
call that adds it, a stall in itself), the longest stall after it, also leaving out the gaps
that overlap one of Python's full garbage collections (the widgets ask for one when the viewer
has been idle for a second, ``_widgets/_idle.py``), those collections' lengths, whether torch
was imported by the end, and the devices the dock offers then. Results are added to
benchmarks/results/first_widget.json under ``TAG`` (default: the git commit).
"""

import argparse
import gc
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "first_widget.json"
WIDGETS = ("Classify cells",)
WATCH_S = 5.0


def one_process(name):
    """Run in the child: open the dock ``name``, print one JSON line of measurements."""
    import napari
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication

    viewer = napari.Viewer()
    app = QApplication.instance()
    spin(app, 1.0)
    ticks = []
    timer = QTimer()
    timer.setInterval(5)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start()
    spin(app, 0.2)
    torch_before = "torch" in sys.modules
    spans = full_collections()
    start = time.perf_counter()
    _, widget = viewer.window.add_plugin_dock_widget("napari-cytodiffusion", name)
    docked = time.perf_counter()
    spin(app, WATCH_S)
    end = time.perf_counter()
    timer.stop()
    after = [docked, *(t for t in ticks if docked <= t <= end), end]
    gaps = list(zip(after, after[1:], strict=False))
    quiet = [b - a for a, b in gaps if not any(a < end_ and b > start_ for start_, end_ in spans)]
    record = {
        "dock_s": round(docked - start, 3),
        "longest_stall_after_s": round(max(b - a for a, b in gaps), 3),
        "longest_stall_after_without_full_collections_s": round(max(quiet), 3),
        "full_collections_after_s": [round(end_ - start_, 3) for start_, end_ in spans],
        "torch_imported_before": torch_before,
        "torch_imported_after": "torch" in sys.modules,
        "devices_offered": offered_devices(widget),
    }
    viewer.close()
    print(json.dumps(record))


def offered_devices(widget):
    """The device choices of a widget's model fields; None for a widget without them."""
    fields = getattr(widget, "_fields", None) or getattr(widget, "_start_from", None)
    return list(fields.device.choices) if fields is not None else None


def full_collections():
    """A list that receives (start, end) of each full garbage collection from now on."""
    spans, started = [], [0.0]

    def record(phase, info):
        if phase == "start":
            started[0] = time.perf_counter()
        elif info["generation"] == 2:
            spans.append((started[0], time.perf_counter()))

    gc.callbacks.append(record)
    return spans


def spin(app, seconds):
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        app.processEvents()
        time.sleep(0.001)


def commit():
    return subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--widget", nargs="+", default=list(WIDGETS))
    parser.add_argument("--tag", default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        one_process(args.widget[0])
        return
    runs = []
    for name in args.widget:
        for repeat in range(args.repeats):
            started = time.perf_counter()
            command = [sys.executable, __file__, "--child", "--widget", name]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            run = {"widget": name, **json.loads(done.stdout.strip().splitlines()[-1])}
            run["process_s"] = round(time.perf_counter() - started, 1)
            runs.append(run)
            print(f"repeat {repeat + 1}: {run}", flush=True)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results[args.tag or commit()] = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {platform.platform()}",
        "runs": runs,
    }
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
