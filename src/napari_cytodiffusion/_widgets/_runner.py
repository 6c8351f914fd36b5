"""Running a core function off the main thread, with a napari progress bar and a Cancel.

The core reports progress through a plain callback from the worker thread. That callback only
stores the numbers (and raises ``Cancelled`` once Cancel was pressed); a timer on the main
thread moves them onto the napari progress bar and the widget's status line, because Qt
objects must not be touched from other threads. Results come back to the main thread in one
piece, so layers are only ever added whole: a cancel or an error adds nothing.

Adding a layer costs napari a noticeable time on the main thread (its controls, its visual,
a redraw). A result handler that is a generator adds one layer per ``yield``, the next one
after a short pause, so the viewer draws and takes input between them; the work counts as
running until the last one is added.

The status line always ends in ``done...``, ``cancelled`` or ``failed: <reason>``. When a
task has ended, Python's full garbage collection is made early, once the viewer is idle
(:mod:`._idle`).
"""

import importlib
import inspect
import threading
import time

from napari.qt.threading import create_worker
from napari.utils import cancelable_progress
from qtpy.QtCore import QTimer

from napari_cytodiffusion._widgets._idle import idle_collector
from napari_cytodiffusion._widgets._torch_import import wait_for_torch_import
from napari_cytodiffusion.core.progress import Cancelled

# Fraction of the work and seconds that must have passed before a time estimate is shown:
# earlier ones mostly measure start-up (model loading, the first network call).
_ETA_AFTER_FRACTION, _ETA_AFTER_SECONDS = 0.03, 1.0
# Modules napari imports the first time it adds a layer (label colours come from skimage.color,
# which brings scipy.linalg; layer features from pandas): imported with the work, in the worker,
# they no longer stall the main thread when the first result layer is added.
_LAYER_MODULES = ("pandas", "skimage.color.colorconv")
# Pause between the result handler's steps: a zero-delay timer runs them back to back (Qt
# handles the queued call before any other timer or paint), so the viewer could not draw or
# take input between two layers.
_STEP_PAUSE_MS = 10
# vispy's text visual renders these glyphs into the canvas's shared atlas on its first draw, to
# align text vertically, even when it shows none; each napari Points and Shapes layer has one.
# In software OpenGL they made the session's first Points layer draw 0.04 s longer; a new
# widget renders them instead, one per turn of the event loop (5-20 ms each).
_ALIGNMENT_GLYPHS = "ÅÉÑŐjgpqy "


class TaskRunner:
    """Run one long core call at a time for a widget.

    Parameters
    ----------
    run_button, cancel_button : magicgui or Qt buttons
        Disabled / enabled while work runs. ``cancel_button`` is wired to :meth:`cancel`.
    description : str
        Text shown on the napari progress bar.
    status : magicgui Label, optional
        Shows the work's progress and time left while it runs, then ``done`` (which the
        result handler usually extends), ``cancelled`` or ``failed: <reason>``.
    """

    def __init__(self, run_button, cancel_button, description, status=None):
        self._run_button = run_button
        self._cancel_button = cancel_button
        self._description = description
        self._status = status
        self._cancel = threading.Event()
        self._state = {"done": 0, "total": 0}
        self._timer = QTimer()
        self._timer.setInterval(100)
        self._timer.timeout.connect(self._refresh)
        self._bar = None
        self._text = description
        self._started = 0.0
        self._ended = False
        self._steps = None
        self._worker_done = False
        self._removed_input = None
        self.worker = None
        _connect(cancel_button, self.cancel)
        _set_enabled(cancel_button, False)
        _render_glyphs_soon(_canvas_font())
        idle_collector().request()  # so that the first task does not start one (see _idle)

    @property
    def running(self):
        return self.worker is not None

    def start(self, function, on_result, on_error=None, text=None, removed_input=None):
        """Run ``function(progress)`` in a thread; ``on_result(result)`` runs on the main thread.

        ``on_error(message)`` defaults to a napari error notification; ``text`` (default: the
        description) starts the status line while the work runs. ``removed_input()``, when
        given, names an input layer the person removed while the work ran (or returns None):
        the result then belongs nowhere and nothing is added.
        """
        if self.running:
            return None
        # First: napari's new progress bar turns the event loop, where a waiting collection
        # would otherwise run.
        idle_collector().task_started()
        self._removed_input = removed_input
        self._cancel.clear()
        self._state.update(done=0, total=0)
        self._text, self._ended, self._worker_done = text or self._description, False, False
        self._started = time.perf_counter()
        self._set_status(f"{self._text} ...")
        # A cancelable bar: the activity dock shows a Cancel button on it too (see _refresh).
        self._bar = cancelable_progress(total=0, desc=self._description)
        # Errors are reported by _failed; napari would otherwise raise them again.
        self.worker = create_worker(
            _after_warm_up(function), self._report, _start_thread=False, _ignore_errors=True
        )
        self.worker.returned.connect(lambda result: self._returned(result, on_result))
        self.worker.errored.connect(lambda error: self._failed(error, on_error))
        self.worker.finished.connect(self._finished)
        _set_enabled(self._run_button, False)
        _set_enabled(self._cancel_button, True)
        self._timer.start()
        self.worker.start()
        return self.worker

    def cancel(self):
        """Ask the running work to stop at its next progress report."""
        if self.running:
            self._cancel.set()
            self._set_status("cancelling ...")

    def _report(self, done, total, *_):
        self._state.update(done=done, total=total)
        if self._cancel.is_set():
            raise Cancelled()

    def _refresh(self):
        if self._bar is None or self._ended:
            return
        if self._bar.is_canceled:  # the activity dock's Cancel only sets this flag
            self.cancel()
        total = self._state["total"]
        if total and self._bar.total != total:
            self._bar.total = total
        done = min(self._state["done"], total) if total else 0
        if done != self._bar.n:
            # update() is what moves the activity dock's bar; setting n only changes its text.
            self._bar.update(done - self._bar.n)
        if not self._cancel.is_set():
            self._set_status(self._progress_text(done, total))

    def _progress_text(self, done, total):
        """``text: 40 %, about 12 s left`` (the estimate once it means something)."""
        if not total:
            return f"{self._text} ..."
        fraction = done / total
        text = f"{self._text}: {100 * fraction:.0f} %"
        elapsed = time.perf_counter() - self._started
        if fraction >= _ETA_AFTER_FRACTION and elapsed >= _ETA_AFTER_SECONDS:
            left = elapsed * (1 - fraction) / fraction
            text += f", {'' if left < 1 else 'about '}{duration_text(left)} left"
        return text

    def _returned(self, result, on_result):
        from napari.utils.notifications import show_info

        self._ended = True
        removed = self._removed_input() if self._removed_input else None
        self._removed_input = None  # it holds the input layers; a removed one can go now
        if removed is not None:
            self._set_status(f"cancelled: '{removed}' was removed while it ran; nothing added")
            show_info(f"{self._description}: '{removed}' was removed; nothing was added.")
            return
        self._set_status("done")
        try:
            steps = on_result(result)
        except Exception as error:
            self._set_status(f"failed while showing the result: {error}")
            raise
        if inspect.isgenerator(steps):
            self._steps = steps
            QTimer.singleShot(_STEP_PAUSE_MS, self._next_step)

    def _next_step(self):
        """Run the result handler up to its next ``yield``; come back in the next turn."""
        try:
            next(self._steps)
        except BaseException as error:
            self._steps = None
            if self._worker_done:
                self._finished()
            if not isinstance(error, StopIteration):
                self._set_status(f"failed while showing the result: {error}")
                raise
            return
        QTimer.singleShot(_STEP_PAUSE_MS, self._next_step)

    def _failed(self, error, on_error):
        from napari.utils.notifications import show_error, show_info

        self._ended = True
        if isinstance(error, Cancelled):
            self._set_status("cancelled")
            show_info(f"{self._description}: cancelled; nothing was added.")
            return
        self._set_status(f"failed: {error}")
        message = f"{self._description} failed: {error}"
        (on_error or show_error)(message)

    def refuse(self, reason):
        """Tell the person why the work was not started; the status line says it too, so that
        it never still describes an earlier run made with other fields."""
        from napari.utils.notifications import show_error

        self._set_status(f"not started: {reason}")
        show_error(reason)

    def _set_status(self, text):
        if self._status is not None:
            self._status.value = text

    def _finished(self):
        self._worker_done = True
        if self._steps is not None:
            return  # the last layers are still being added; _next_step ends the work
        self._timer.stop()
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self.worker = None
        _set_enabled(self._run_button, True)
        _set_enabled(self._cancel_button, False)
        idle_collector().task_ended()


def _after_warm_up(function):
    """``function`` as the worker runs it: after building, off the main thread, what a session's
    first layers would otherwise build on it, and after torch's background import."""

    def run(progress):
        for name in _LAYER_MODULES:
            importlib.import_module(name)
        # vispy computes its line dash patterns (0.04 s) for the first line visual, which
        # the first Labels layer's outline overlay creates; cached, they cost the main thread
        # nothing.
        from vispy.visuals.line.dash_atlas import DashAtlas

        DashAtlas()
        # napari gives layers units from pint's registry, which is built (0.2-0.5 s here) when
        # the first layer of a session is made: in an empty viewer, on the main thread.
        import pint

        pint.get_application_registry().pixel  # noqa: B018 (builds the registry)
        wait_for_torch_import()
        return function(progress)

    return run


def _render_glyphs_soon(font, characters=_ALIGNMENT_GLYPHS):
    """Render the first of ``characters`` into ``font`` now, the next after a pause, and so on
    (nothing without a font)."""
    if font is None or not characters:
        return
    font[characters[0]]  # renders the glyph into the font's atlas once
    QTimer.singleShot(_STEP_PAUSE_MS, lambda: _render_glyphs_soon(font, characters[1:]))


def _canvas_font():
    """The font napari's text visuals share in the current viewer's canvas, or None."""
    from napari import current_viewer

    # napari keeps the canvas's font (shared by its text visuals) on private attributes.
    qt_viewer = getattr(getattr(current_viewer(), "window", None), "_qt_viewer", None)
    font_info = getattr(getattr(qt_viewer, "canvas", None), "_font_info", None)
    return None if font_info is None else font_info.font_manager.get_font(font_info.face)


def duration_text(seconds):
    """``"under 1 s"``, ``"12 s"`` or ``"3 min 5 s"``."""
    if seconds < 1:
        return "under 1 s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, rest = divmod(int(round(seconds)), 60)
    return f"{minutes} min {rest} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60} min"


def _set_enabled(button, enabled):
    if button is None:
        return
    if hasattr(button, "enabled"):
        button.enabled = enabled
    else:
        button.setEnabled(enabled)


def _connect(button, slot):
    if button is None:
        return
    if hasattr(button, "changed"):
        button.changed.connect(lambda *_: slot())
    else:
        button.clicked.connect(lambda *_: slot())
