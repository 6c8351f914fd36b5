"""Progress reporting and cancellation shared by every long core function.

Long functions take an optional ``progress`` callable, called as ``progress(done, total)``.
A caller that wants to stop the work raises :class:`Cancelled` from inside that callable; the
function then unwinds without leaving partial results behind.
"""


class Cancelled(Exception):
    """Raised from a progress callback to stop a long computation."""


def report(progress, done, total):
    """Call ``progress(done, total)`` if a callback was given."""
    if progress is not None:
        progress(done, total)


def phase(progress, start, end, resolution=1000):
    """A callback mapping a sub-task's (done, total) onto [start, end] of one bar.

    A task made of several steps gives each step a share of one progress bar of
    ``resolution`` ticks, so the bar moves forward once instead of restarting per step.
    Returns None when ``progress`` is None.
    """
    if progress is None:
        return None

    def report_share(done, total):
        fraction = min(done / total, 1.0) if total else 0.0
        progress(int(resolution * (start + (end - start) * fraction)), resolution)

    return report_share


def phases(progress, weights):
    """Callbacks for consecutive steps sharing one bar in proportion to ``weights``.

    Examples
    --------
    >>> ticks = []
    >>> first, second = phases(lambda done, total: ticks.append(done), [1, 3])
    >>> first(1, 1); second(1, 2)
    >>> ticks
    [250, 625]
    """
    total = float(sum(weights)) or 1.0
    callbacks, start = [], 0.0
    for weight in weights:
        end = start + weight / total
        callbacks.append(phase(progress, start, end))
        start = end
    return callbacks


def forward_only(progress, resolution=1000):
    """A callback that never moves the bar backwards, for work whose total grows as it goes.

    (done, total) is shown as a fraction of ``resolution`` ticks, and a report that would
    show less than the last one shows the last one again. Returns None for None.
    """
    if progress is None:
        return None
    shown = [0]

    def report_forward(done, total):
        fraction = min(done / total, 1.0) if total else 0.0
        shown[0] = max(shown[0], int(resolution * fraction))
        progress(shown[0], resolution)

    return report_forward
