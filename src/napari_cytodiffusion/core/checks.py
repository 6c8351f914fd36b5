"""Checks of plain values that several tasks share, so that each is made one way."""

import numbers


def is_whole_number(value):
    """True for an integer of Python or NumPy; False for a bool, a float (even 3.0), a string.

    Examples
    --------
    >>> import numpy as np
    >>> [is_whole_number(v) for v in (3, np.int64(3), 3.0, True, "3")]
    [True, True, False, False, False]
    """
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
