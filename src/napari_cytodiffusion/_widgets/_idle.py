"""Python's full garbage collections, moved to a moment when nobody is using the viewer.

With napari, torch and pandas loaded the interpreter tracks about half a million objects, and
a full collection of them holds every thread for about 0.2 s. Python starts one by itself
once the objects that survived since the last one reach a quarter of those it kept; each new
napari layer leaves about 9,000 (its controls, visuals and events), so a run that adds three
or four layers often set one off just as its layers appeared (docs/napari.md).

After each run of a widget's task, the collection is therefore made early: once no task is
running and the viewer has had no input (mouse, keys, wheel, touch) for :data:`IDLE_S`. The
objects of the next run then rarely reach the quarter by themselves. A new widget asks for
one too: the imports of napari, torch and the plugin leave enough objects that the first task
of a session often set one off while it ran. Nothing is collected that Python would not
collect; a person who keeps working past :data:`GIVE_UP_S` leaves the collection to Python.
"""

import gc
import time

from qtpy.QtCore import QEvent, QObject, QTimer
from qtpy.QtWidgets import QApplication

# Seconds without input (and without a running task) before collecting.
IDLE_S = 1.0
# After this many seconds of waiting for a quiet moment, Python is left to collect.
GIVE_UP_S = 60.0
_POLL_MS = 200
_INPUT_EVENTS = frozenset(
    {
        QEvent.Type.MouseButtonPress,
        QEvent.Type.MouseButtonRelease,
        QEvent.Type.MouseButtonDblClick,
        QEvent.Type.MouseMove,
        QEvent.Type.HoverMove,
        QEvent.Type.Wheel,
        QEvent.Type.KeyPress,
        QEvent.Type.KeyRelease,
        QEvent.Type.TouchBegin,
        QEvent.Type.TouchUpdate,
    }
)


class IdleCollector(QObject):
    """Collect once when the viewer is idle, after :meth:`task_ended`.

    Tasks are counted (:meth:`task_started` / :meth:`task_ended`): nothing is collected while
    one runs (someone waits for its result, and it is still making objects). Input is watched
    by an application event filter only while a collection waits. ``collect`` (default
    :func:`gc.collect`) is what runs.
    """

    def __init__(self, idle_s=IDLE_S, give_up_s=GIVE_UP_S, collect=None):
        super().__init__()
        self._idle_s, self._give_up_s, self._collect = idle_s, give_up_s, collect
        self._running = 0
        self._asked = None  # when the waiting collection was asked for
        self._last_input = 0.0
        self._timer = QTimer(self)
        self._timer.setInterval(_POLL_MS)
        self._timer.timeout.connect(self._poll)

    def task_started(self):
        self._running += 1

    def task_ended(self):
        self._running = max(0, self._running - 1)
        self.request()

    def request(self):
        """Collect at the next quiet moment (no task running, no input for ``idle_s``)."""
        if self._asked is None:
            QApplication.instance().installEventFilter(self)
            self._timer.start()
        self._asked = self._last_input = time.perf_counter()

    def eventFilter(self, watched, event):  # noqa: N802 (Qt's name)
        if event.type() in _INPUT_EVENTS:
            self._last_input = time.perf_counter()
        return False

    def _poll(self):
        now = time.perf_counter()
        if now - self._asked > self._give_up_s:
            self._stop()
        elif not self._running and now - self._last_input >= self._idle_s:
            self._stop()
            if gc.isenabled():  # whoever turned collection off wants none
                (self._collect or gc.collect)()

    def _stop(self):
        self._timer.stop()
        QApplication.instance().removeEventFilter(self)
        self._asked = None


_COLLECTOR = []


def idle_collector():
    """The one :class:`IdleCollector` of the application (made on first use)."""
    if not _COLLECTOR:
        _COLLECTOR.append(IdleCollector())
    return _COLLECTOR[0]
