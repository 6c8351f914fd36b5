"""torch imported, and the devices listed, in the background, so that the first widget of a
session opens at once.

A widget lists the machine's devices, and that needs torch: imported on the main thread it
froze the viewer for about two seconds when the first widget opened. A plain import in another
thread is no cure, because loading torch's shared libraries (400 MB of machine code and its
static set-up) holds Python's lock throughout, in an import as in ``ctypes.CDLL``: the viewer
stalled for 0.2-0.5 s. A C function called through ctypes runs without the lock, so the C
library's ``dlopen`` loads them first (on Linux, where torch keeps them in ``torch/lib``); the
import that follows finds them loaded. Full garbage collections, which would run in this thread
holding the lock, wait until the import is done. The thread is not a daemon: Python waits for
it at exit rather than tearing it down in the middle of an import.
"""

import ctypes
import gc
import importlib.util
import sys
import threading
from pathlib import Path

from napari_cytodiffusion.core import devices

# In the order they depend on each other; those a build lacks (CUDA's on a CPU build) are skipped.
_LIBRARIES = (
    "libc10.so",
    "libc10_cuda.so",
    "libtorch_cpu.so",
    "libtorch_cuda.so",
    "libtorch.so",
    "libtorch_python.so",
)
_RTLD_NOW = 2  # dlfcn.h; local scope, as the import loads them
_thread = None
_devices = None


def start_torch_import():
    """Start importing torch in a background thread unless it is imported or importing."""
    global _thread
    if _thread is None and "torch" not in sys.modules:
        _thread = threading.Thread(target=_import_torch, name="import torch")
        _thread.start()


def torch_importing():
    """Whether the background import is still running."""
    return _thread is not None and _thread.is_alive()


def wait_for_torch_import():
    """Return once the background import (if one was started) is done: a task's worker waits
    here rather than importing torch beside it, which would load its libraries holding
    Python's lock."""
    if _thread is not None:
        _thread.join()


def listed_devices():
    """The devices the background thread listed once torch was in (asking CUDA how many GPUs
    there are starts its driver, which can take a moment too); None before that, or if
    torch could not be imported."""
    return None if torch_importing() else _devices


def _import_torch():
    global _devices
    _load_libraries()
    collecting = gc.isenabled()
    gc.disable()
    try:
        _devices = devices.available_devices()  # imports torch
    except Exception:  # noqa: BLE001 - a task's worker imports it again and reports the error
        pass
    finally:
        if collecting:
            gc.enable()


def _load_libraries():
    spec = importlib.util.find_spec("torch")
    if not sys.platform.startswith("linux") or spec is None or not spec.submodule_search_locations:
        return
    try:
        dlopen = ctypes.CDLL(None).dlopen
    except (OSError, AttributeError):  # a C library without it: the import loads them itself
        return
    dlopen.argtypes, dlopen.restype = (ctypes.c_char_p, ctypes.c_int), ctypes.c_void_p
    folder = Path(spec.submodule_search_locations[0]) / "lib"
    for name in _LIBRARIES:
        if (folder / name).is_file() and not dlopen(bytes(folder / name), _RTLD_NOW):
            return  # the import itself says what is wrong
