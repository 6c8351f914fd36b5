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
