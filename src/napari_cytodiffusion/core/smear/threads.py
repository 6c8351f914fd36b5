"""Running independent pieces of one image's work on several cores (numpy and scipy release
the interpreter lock in their array loops, so threads share the work without copies)."""

import os


def thread_count(workers=None):
    """Threads to use: ``workers``, or the CPU count, at most 4."""
    return workers or min(4, os.cpu_count() or 1)


def in_threads(function, items, workers=None):
    """``[function(item) for item in items]``, ``thread_count(workers)`` at a time, in order."""
    from concurrent.futures import ThreadPoolExecutor

    items = list(items)
    workers = thread_count(workers)
    if workers <= 1 or len(items) < 2:
        return [function(item) for item in items]
    with ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(function, item) for item in items]
        try:
            return [future.result() for future in futures]
        except BaseException:
            for future in futures:  # a cancel or an error stops what has not started
                future.cancel()
            raise
