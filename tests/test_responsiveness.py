"""The viewer stays responsive while the widgets work: a timer on the Qt event loop measures
the longest gap between its ticks (a main-thread stall) while the model loads, a smear is
segmented and classified, and cells are generated; the activity dock's bar is determinate and
moves, and the status line estimates the time left.

Two phases are measured apart. While the work runs, the main thread only moves the progress
bar; what still stalls it here are the interpreter's full garbage collections (0.2 to 0.6 s
with napari, torch and pytest loaded, run by whichever thread triggers them; the widgets make
them when the viewer is idle after a task, but here each run follows the last at once). Adding the
result layers is napari's own work (each layer's controls, visual and first draw), one layer
per step with a pause between steps: on a 2-core machine drawing in software (Xvfb) a layer
stalls the viewer 0.05 to 0.1 s, more on a busy machine. The bounds catch real work on the
main thread (segmenting or classifying there takes seconds); benchmarks/responsiveness.py
measures the stalls, and docs/napari.md gives them."""

import gc
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from qtpy.QtCore import QTimer

from napari_cytodiffusion._widgets._generate import GenerateWidget
from napari_cytodiffusion.core.model import weights

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from responsiveness import SAMPLE, sample_with_widgets  # noqa: E402

WORK_STALL_LIMIT_S = 1.0
LAYER_STALL_LIMIT_S = 1.5


class StallMeter:
    """Gaps between ticks of a 5 ms timer on the main thread: (start, end) in seconds."""

    def __init__(self):
        self.gaps = []
        self._timer = QTimer()
        self._timer.setInterval(5)
        self._timer.timeout.connect(self._tick)

    def __enter__(self):
        self._last = time.perf_counter()
        self._timer.start()
        return self

    def _tick(self):
        now = time.perf_counter()
        self.gaps.append((self._last, now))
        self._last = now

    def __exit__(self, *_):
        self._tick()
        self._timer.stop()

    def longest(self, after=-np.inf, before=np.inf):
        """The longest gap, counting only its part between ``after`` and ``before``."""
        return max(min(end, before) - max(start, after) for start, end in self.gaps)


def _run(qtbot, widget, button, until):
    """Press ``button``; the longest stalls while the work runs and while its layers are added
    (from the moment the worker returns) until the result shows."""
    runner = widget._runner
    returned = []
    with StallMeter() as meter:
        button.native.click()
        runner.worker.returned.connect(lambda *_: returned.append(time.perf_counter()))
        qtbot.waitUntil(lambda: not runner.running, timeout=120_000)
        qtbot.waitUntil(until, timeout=10_000)
        qtbot.wait(300)  # the layers' first draw
    return meter.longest(before=returned[0]), meter.longest(after=returned[0])


def test_no_main_thread_stall(make_napari_viewer, qtbot, monkeypatch):
    viewer = make_napari_viewer()
    segment, classify, generate = sample_with_widgets(viewer)
    qtbot.wait(300)
    monkeypatch.setattr(weights, "_SHARED", {})  # the first run loads the model
    stalls = {}

    generate._count.value = 1
    stalls["model load (and one cell)"] = _run(
        qtbot, generate, generate._run, lambda: len(viewer.layers) == 3
    )
    stalls["segment"] = _run(
        qtbot, segment, segment._run, lambda: f"{SAMPLE} white cells" in viewer.layers
    )
    assert classify._labels.value is viewer.layers[f"{SAMPLE} white cells"]
    stalls["classify"] = _run(
        qtbot, classify, classify._run, lambda: classify.class_layer is not None
    )
    generate._count.value = 8
    stalls["generate"] = _run(qtbot, generate, generate._run, lambda: len(viewer.layers) == 11)

    shown = {k: f"{1000 * w:.0f} / {1000 * a:.0f} ms" for k, (w, a) in stalls.items()}
    print("longest main-thread stall, work / adding layers:", shown)
    assert max(work for work, _ in stalls.values()) <= WORK_STALL_LIMIT_S, shown
    assert max(adding for _, adding in stalls.values()) <= LAYER_STALL_LIMIT_S, shown
    assert np.all([layer.ndim == 2 for layer in viewer.layers])


def test_the_activity_bar_moves_and_the_status_gives_the_time_left(make_napari_viewer, qtbot):
    from napari._qt.widgets.qt_progress_bar import QtLabeledProgressBar

    viewer = make_napari_viewer()
    generate = GenerateWidget(viewer)
    viewer.window.add_dock_widget(generate)
    runner = generate._runner

    def work(progress):
        for step in range(1, 41):
            time.sleep(0.05)
            progress(step, 40)

    runner.start(work, lambda _: None, text="testing")
    qtbot.waitUntil(lambda: runner._state["done"] >= 30, timeout=10_000)
    qtbot.wait(150)
    bars = viewer.window._qt_window.findChildren(QtLabeledProgressBar)
    bar = bars[0].qt_progress_bar
    assert bar.maximum() == 40 and 20 <= bar.value() <= 40  # determinate, and moving
    assert "testing: " in generate._status.value and "left" in generate._status.value
    qtbot.waitUntil(lambda: not runner.running, timeout=10_000)
    assert generate._status.value == "done"


def test_the_time_left_reads_as_english():
    from types import SimpleNamespace

    from napari_cytodiffusion._widgets._runner import TaskRunner

    def text(done, elapsed):
        runner = SimpleNamespace(_text="analysing", _started=time.perf_counter() - elapsed)
        return TaskRunner._progress_text(runner, done, 100)

    assert text(50, 40).startswith("analysing: 50 %, about 40 s left")
    assert text(99, 10) == "analysing: 99 %, under 1 s left"
    assert text(50, 0.1) == "analysing: 50 %"  # too early to estimate


def test_the_result_steps_let_the_viewer_draw_between_them(make_napari_viewer, qtbot):
    """Each step of a result handler (one layer each) is a stall of its own: chained in one
    turn of the event loop, three steps of 80 ms froze the viewer for 240 ms."""
    viewer = make_napari_viewer()
    generate = GenerateWidget(viewer)
    runner = generate._runner

    def show(_):
        for _ in range(3):
            time.sleep(0.08)
            yield

    with StallMeter() as meter:
        runner.start(lambda progress: None, show)
        qtbot.waitUntil(lambda: not runner.running, timeout=10_000)
    assert 0.08 <= meter.longest() < 0.16


def test_a_failure_while_showing_the_result_is_the_status_not_done(
    make_napari_viewer, qtbot, monkeypatch
):
    """A bug while the layers are added is reported as a failure, not left under 'done'."""
    viewer = make_napari_viewer()
    widget = GenerateWidget(viewer)  # kept: its buttons live as long as it does
    runner = widget._runner
    raised = []
    monkeypatch.setattr("sys.excepthook", lambda kind, error, trace: raised.append(error))

    def show(_):
        yield
        raise KeyError("a layer")

    runner.start(lambda progress: None, show)
    qtbot.waitUntil(lambda: not runner.running, timeout=10_000)
    assert runner._status.value == "failed while showing the result: 'a layer'"
    assert [type(error) for error in raised] == [KeyError]


def test_the_full_collection_waits_for_a_quiet_viewer(qtbot):
    """Collected once no task runs and no key or mouse input came for ``idle_s``."""
    from qtpy.QtCore import QEvent, Qt
    from qtpy.QtGui import QKeyEvent
    from qtpy.QtWidgets import QApplication, QWidget

    from napari_cytodiffusion._widgets._idle import IdleCollector

    collections = []
    widget = QWidget()
    qtbot.addWidget(widget)
    collector = IdleCollector(idle_s=0.3, collect=lambda: collections.append(time.perf_counter()))
    collector.task_started()
    collector.task_started()
    collector.task_ended()
    qtbot.wait(700)
    assert not collections  # a task still runs
    collector.task_ended()
    for _ in range(8):  # someone types: 0.8 s of input, never 0.3 s quiet
        key = QKeyEvent(QEvent.Type.KeyPress, Qt.Key.Key_A, Qt.KeyboardModifier.NoModifier)
        QApplication.sendEvent(widget, key)
        typed = time.perf_counter()
        qtbot.wait(100)
    assert not collections
    qtbot.waitUntil(lambda: len(collections) > 0, timeout=3_000)
    assert len(collections) == 1 and collections[0] - typed >= 0.3
    qtbot.wait(500)
    assert len(collections) == 1  # once a task


def test_a_task_is_followed_by_one_collection(make_napari_viewer, qtbot, monkeypatch):
    from napari_cytodiffusion._widgets._idle import IDLE_S

    collections = []
    monkeypatch.setattr(gc, "collect", lambda *_: collections.append(time.perf_counter()))
    generate = GenerateWidget(make_napari_viewer())
    runner = generate._runner
    collections.clear()  # napari's viewer fixture collects too
    runner.start(lambda progress: time.sleep(0.3), lambda _: None)
    qtbot.waitUntil(lambda: not runner.running, timeout=10_000)
    ended = time.perf_counter()
    assert not collections
    qtbot.waitUntil(lambda: len(collections) > 0, timeout=int(3_000 * IDLE_S))
    assert len(collections) == 1 and collections[0] - ended >= 0.9 * IDLE_S


def test_a_new_widget_collects_at_the_next_quiet_moment(make_napari_viewer, qtbot, monkeypatch):
    """The imports of a session leave enough objects for the first task to set off a full
    collection (0.17 s in the benchmark) while it runs; a new widget asks for one when the
    viewer is quiet."""
    viewer = make_napari_viewer()
    collections = []
    monkeypatch.setattr(gc, "collect", lambda *_: collections.append(time.perf_counter()))
    GenerateWidget(viewer)
    qtbot.waitUntil(lambda: len(collections) > 0, timeout=5_000)
    qtbot.wait(500)
    assert len(collections) == 1


def test_the_colour_table_filled_at_once_is_naparis_own():
    from napari.utils.colormaps import DirectLabelColormap

    from napari_cytodiffusion._widgets._common import direct_colormap

    colours = {None: "transparent", 0: "transparent", 1: "red", 2: [0, 0, 1, 0.6], 300: "y"}
    for dtype in (np.dtype(np.uint8), np.dtype(np.uint16)):
        filled = direct_colormap(colours, dtype)._cache_mapping[(dtype, dtype)]
        naparis = DirectLabelColormap(color_dict=colours)._get_mapping_from_cache(dtype)
        np.testing.assert_array_equal(filled, naparis)


def test_a_new_widget_renders_the_text_glyphs_of_the_first_points_layer(make_napari_viewer, qtbot):
    """Rendered at the first draw of a Points layer (its text visual aligns by them), the
    glyphs made that draw 0.04 s longer; a new widget renders them beforehand."""
    from napari_cytodiffusion._widgets._runner import _ALIGNMENT_GLYPHS

    viewer = make_napari_viewer()
    font_info = viewer.window._qt_viewer.canvas._font_info
    font = font_info.font_manager.get_font(font_info.face)
    assert not set(_ALIGNMENT_GLYPHS) <= set(font._glyphs)
    GenerateWidget(viewer)
    qtbot.waitUntil(lambda: set(_ALIGNMENT_GLYPHS) <= set(font._glyphs), timeout=2_000)


def test_the_classes_layer_comes_with_its_colours_mapped(make_napari_viewer, colour_mapping):
    """napari maps every value of 16-bit labels to a colour (a Python loop over 65,536 values,
    0.03 s) at a Labels layer's first draw; the classes layer, built in the worker, brings the
    map with it, so its first draw does not compute it on the main thread."""
    import pandas as pd

    from napari_cytodiffusion._widgets._classify import _class_layer

    labels = np.zeros((96, 128), np.uint16)
    labels[10:30, 10:30], labels[50:80, 60:90] = 1, 2
    table = pd.DataFrame({"index": [1, 2], "label": ["lymphocyte", "monocyte"]})
    colours = {None: "transparent", 0: "transparent", 1: "#ff0000", 2: "#0000ff"}
    model = SimpleNamespace(name="m", image_size=64)
    result = SimpleNamespace(rbc_diameter=30.0, classes=("lymphocyte", "monocyte"))
    wanted = {"name": "x classes", "source": "x", "scale": (1, 1), "translate": (0, 0)}
    settings = {"layer": {**wanted, "fill": False}, "image_path": None}
    layer = _class_layer(labels, table, colours, model, result, settings)
    viewer = make_napari_viewer()
    viewer.add_layer(layer)
    layer.visible = True
    viewer.window._qt_viewer.canvas._scene_canvas.render()
    assert colour_mapping == []


def test_a_new_layer_is_selected_a_turn_after_it_is_added(make_napari_viewer, qtbot, monkeypatch):
    """napari selects a layer in the turn it adds it, which switches and repaints the layer
    controls (0.01-0.02 s more in a turn of 0.05-0.08 s); the widgets select it a turn later,
    through a plugin viewer's proxy without a warning, and leave napari's own adding as it
    was."""
    from napari_cytodiffusion._widgets._runner import TaskRunner

    viewer = make_napari_viewer()
    _, generate = viewer.window.add_plugin_dock_widget("napari-cytodiffusion", "Generate cells")
    generate._count.value, generate._steps.value, generate._device.value = 2, 2, "cpu"
    steps = []  # (layers added, the selected layer) after each step of the result handler
    original = TaskRunner._next_step

    def next_step(runner):
        before = set(viewer.layers)
        original(runner)
        steps.append((set(viewer.layers) - before, viewer.layers.selection.active))

    monkeypatch.setattr(TaskRunner, "_next_step", next_step)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # napari's private-access warning
        generate._run.native.click()
        qtbot.waitUntil(lambda: not generate._runner.running, timeout=120_000)
    grid, tiles = viewer.layers
    added = [(new, active) for new, active in steps if new]
    assert [new for new, _ in added] == [{grid}, {tiles}]
    assert all(active not in new for new, active in added)
    assert viewer.layers.selection.active is tiles and tiles.visible
    extra = viewer.add_points([[0, 0]])
    assert viewer.layers.selection.active is extra


def test_a_layer_removed_between_the_steps_is_not_selected(make_napari_viewer, qtbot, monkeypatch):
    """A person may remove a new layer in the turn between its adding and its selecting."""
    from napari_cytodiffusion._widgets._runner import TaskRunner

    viewer = make_napari_viewer()
    _, generate = viewer.window.add_plugin_dock_widget("napari-cytodiffusion", "Generate cells")
    generate._count.value, generate._steps.value, generate._device.value = 1, 2, "cpu"
    original = TaskRunner._next_step

    def next_step(runner):
        original(runner)
        tiles = [layer for layer in viewer.layers if "tiles" in layer.metadata]
        if tiles:
            viewer.layers.remove(tiles[0])

    monkeypatch.setattr(TaskRunner, "_next_step", next_step)
    generate._run.native.click()
    qtbot.waitUntil(lambda: not generate._runner.running, timeout=120_000)
    assert [layer.name for layer in viewer.layers] == ["synthetic neutrophil"]
    assert generate._status.value.startswith("done")


def test_a_task_builds_the_unit_registry_napari_gives_the_first_layer():
    """napari builds pint's unit registry (0.2-0.5 s) when the first layer of a session is
    made: in an empty viewer, on the main thread as a task's result is shown. The task's
    worker builds it first."""
    import pint

    from napari_cytodiffusion._widgets._runner import _after_warm_up

    application = pint.get_application_registry()
    original, fresh = application.get(), pint.LazyRegistry()
    application.set(fresh)
    try:
        assert _after_warm_up(lambda progress: "done")(None) == "done"
    finally:
        application.set(original)
    assert type(fresh) is pint.UnitRegistry  # a lazy registry becomes one when it is built


_FIRST_DEVICE_FIELD = """
import json, sys, time
from qtpy.QtWidgets import QApplication
app = QApplication([])
from napari_cytodiffusion._widgets import _common, _torch_import
from napari_cytodiffusion.core import devices
def listed():  # as on a machine with a GPU
    import torch  # noqa: F401
    return ["auto", "cpu", "cuda"]
devices.available_devices = listed
combo = _common.device_field()
record = {"torch_at_once": "torch" in sys.modules, "offered_at_once": list(combo.choices)}
end = time.perf_counter() + float(sys.argv[1])
while time.perf_counter() < end and "cuda" not in combo.choices:
    app.processEvents()
    time.sleep(0.01)
record["importing"] = _torch_import.torch_importing()
record["offered_later"] = list(combo.choices)
print(json.dumps(record), flush=True)
"""


def _first_device_field(wait_s):
    """Run a fresh interpreter (torch not imported) that builds a device field."""
    import json
    import os
    import subprocess

    done = subprocess.run(
        [sys.executable, "-c", _FIRST_DEVICE_FIELD, str(wait_s)],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "QT_QPA_PLATFORM": "offscreen"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_first_device_field_does_not_wait_for_torch_and_offers_the_gpus_later():
    record = _first_device_field(wait_s=120)
    assert not record["torch_at_once"]
    assert record["offered_at_once"] == ["auto", "cpu"]
    assert not record["importing"]
    assert record["offered_later"] == ["auto", "cpu", "cuda"]


def test_python_exits_cleanly_while_torch_is_imported_in_the_background():
    record = _first_device_field(wait_s=1.3)  # the import starts a second after the field is made
    assert record["importing"]
    assert record["offered_later"] == ["auto", "cpu"]


def test_a_task_starts_after_the_background_import_of_torch(monkeypatch):
    import threading

    from napari_cytodiffusion._widgets import _torch_import
    from napari_cytodiffusion._widgets._runner import _after_warm_up

    imported = threading.Event()
    importer = threading.Thread(target=lambda: (time.sleep(0.3), imported.set()))
    monkeypatch.setattr(_torch_import, "_thread", importer)
    importer.start()
    assert _after_warm_up(lambda progress: imported.is_set())(None)
