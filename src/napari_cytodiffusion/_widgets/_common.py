"""Pieces every widget shares: the device choices, one loaded model per (name, device), and
reporting of failures and cancels."""

import threading

_MODELS = {}
_MODELS_LOCK = threading.Lock()


def available_devices():
    """The devices this machine can run the model on, ``auto`` first."""
    import torch

    devices = ["auto", "cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        devices.append("mps")
    return devices


def load_shared_model(name_or_path="default", device="auto", progress=None):
    """Load a model once per (name, device) for all widgets; safe to call from workers.

    ``progress`` reports a download (see ``core.weights.model_path``).
    """
    from napari_cytodiffusion.core.weights import load_model

    key = (str(name_or_path).strip() or "default", str(device))
    with _MODELS_LOCK:
        if key not in _MODELS:
            _MODELS[key] = load_model(key[0], device, progress=progress)
        return _MODELS[key]


def failure_reporter(label):
    """An ``on_error`` for TaskRunner: the message as a notification, "failed" in ``label``."""

    def report(message):
        from napari.utils.notifications import show_error

        label.value = "failed"
        show_error(message)

    return report


def show_cancelled(runner, label):
    """Connect to a Cancel button: says so in ``label`` when there is work to cancel."""
    if runner.running:
        label.value = "cancelled"
