"""Running a core function off the main thread, with a napari progress bar and a Cancel.

The core reports progress through a plain callback from the worker thread. That callback only
stores the numbers (and raises ``Cancelled`` once Cancel was pressed); a timer on the main
thread moves them onto the napari progress bar, because Qt objects must not be touched from
other threads. Results come back to the main thread in one piece, so layers are only ever
added whole: a cancel or an error adds nothing.
"""

import threading

from qtpy.QtCore import QTimer

from napari_cytodiffusion.core.progress import Cancelled


class TaskRunner:
    """Run one long core call at a time for a widget.

    Parameters
    ----------
    run_button, cancel_button : magicgui or Qt buttons
        Disabled / enabled while work runs. ``cancel_button`` is wired to :meth:`cancel`.
    description : str
        Text shown on the napari progress bar.
    status : magicgui Label, optional
        Set to "cancelled" or "failed" when the work ends that way.
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
        self.worker = None
        _connect(cancel_button, self.cancel)
        _set_enabled(cancel_button, False)

    @property
    def running(self):
        return self.worker is not None

    def start(self, function, on_result, on_error=None):
        """Run ``function(progress)`` in a thread; ``on_result(result)`` runs on the main thread.

        ``on_error(message)`` defaults to a napari error notification.
        """
        from napari.qt.threading import create_worker
        from napari.utils import progress

        if self.running:
            return None
        self._cancel.clear()
        self._state.update(done=0, total=0)
        self._bar = progress(total=0, desc=self._description)
        # Errors are reported by _failed; napari would otherwise raise them again.
        self.worker = create_worker(
            function, self._report, _start_thread=False, _ignore_errors=True
        )
        self.worker.returned.connect(on_result)
        self.worker.errored.connect(lambda error: self._failed(error, on_error))
        self.worker.finished.connect(self._finished)
        _set_enabled(self._run_button, False)
        _set_enabled(self._cancel_button, True)
        self._timer.start()
        self.worker.start()
        return self.worker

    def cancel(self):
        """Ask the running work to stop at its next progress report."""
        self._cancel.set()

    def _report(self, done, total, *_):
        self._state.update(done=done, total=total)
        if self._cancel.is_set():
            raise Cancelled()

    def _refresh(self):
        if self._bar is None:
            return
        total = self._state["total"]
        if total and self._bar.total != total:
            self._bar.total = total
        done = min(self._state["done"], total) if total else 0
        if done != self._bar.n:
            # update() is what moves the activity dock's bar; setting n only changes its text.
            self._bar.update(done - self._bar.n)

    def _failed(self, error, on_error):
        from napari.utils.notifications import show_error, show_info

        if isinstance(error, Cancelled):
            self._set_status("cancelled")
            show_info(f"{self._description}: cancelled; nothing was added.")
            return
        self._set_status("failed")
        message = f"{self._description} failed: {error}"
        (on_error or show_error)(message)

    def _set_status(self, text):
        if self._status is not None:
            self._status.value = text

    def _finished(self):
        self._timer.stop()
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self.worker = None
        _set_enabled(self._run_button, True)
        _set_enabled(self._cancel_button, False)


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
