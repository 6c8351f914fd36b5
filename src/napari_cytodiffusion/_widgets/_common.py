"""Pieces every widget shares, built once: the model / device / seed fields, the run row
(buttons, Cancel, a status line) with its task runner, and one loaded model per
(name, device) for all widgets."""

import threading
from dataclasses import dataclass

from magicgui.widgets import ComboBox, Container, FloatSpinBox, Label, LineEdit, PushButton, SpinBox

from napari_cytodiffusion._widgets._runner import TaskRunner

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

    ``progress`` reports a download (see ``core.model.weights.model_path``).
    """
    from napari_cytodiffusion.core.model.weights import load_model

    key = (str(name_or_path).strip() or "default", str(device))
    with _MODELS_LOCK:
        if key not in _MODELS:
            _MODELS[key] = load_model(key[0], device, progress=progress)
        return _MODELS[key]


@dataclass(frozen=True)
class ModelChoice:
    """The model a run uses, read from the fields on the main thread."""

    name: str
    device: str

    def load(self, progress=None):
        """The loaded model (shared by all widgets); call it in the worker."""
        return load_shared_model(self.name, self.device, progress)


def device_field():
    """The device choice: ``auto`` and the devices this machine has."""
    return ComboBox(
        label="device",
        choices=available_devices(),
        value="auto",
        tooltip="auto: a GPU when there is one, else the CPU.",
    )


def rbc_diameter_field(tooltip):
    """The red-cell diameter in pixels; 0 means estimate it."""
    return FloatSpinBox(
        value=0.0, min=0.0, max=1000.0, step=0.5, label="red-cell diameter (px)", tooltip=tooltip
    )


def sampler_fields(what="cells"):
    """Sampler steps and classifier-free guidance of generated cells."""
    from napari_cytodiffusion.core.model.sampling import DEFAULT_GUIDANCE, DEFAULT_STEPS

    return (
        SpinBox(
            value=DEFAULT_STEPS,
            min=1,
            max=500,
            label="sampler steps",
            tooltip=f"More steps follow the model more exactly but take longer ({what}).",
        ),
        FloatSpinBox(
            value=DEFAULT_GUIDANCE,
            min=1.0,
            max=10.0,
            step=0.5,
            label="guidance",
            tooltip=f"Classifier-free guidance: 1 = none; higher follows the class more "
            f"strictly at some cost in variety ({what}).",
        ),
    )


class ModelFields:
    """The model, device and (optionally) seed fields, the same in every widget."""

    def __init__(self, seed=True, seed_tooltip="Same seed, same result."):
        self.model = LineEdit(
            value="default",
            label="model",
            tooltip="A model name from the registry (default: the shipped model) or the path "
            "of a model file, such as one made by Train / adapt model.",
        )
        self.device = device_field()
        self.seed = SpinBox(label="seed", value=0, min=0, max=2**31 - 1, tooltip=seed_tooltip)
        self.widgets = [self.model, self.device] + ([self.seed] if seed else [])

    def choice(self):
        return ModelChoice(self.model.value.strip() or "default", self.device.value)

    def classes(self):
        """The chosen model's classes (the default model's while the field is not valid)."""
        from napari_cytodiffusion.core.model.weights import model_classes

        return model_classes(self.choice().name) or model_classes("default")


class RunRow(Container):
    """Run buttons, a Cancel button and a status line, driven by one :class:`TaskRunner`.

    The status line wraps instead of widening the dock; Cancel is wired here, once.
    """

    def __init__(self, description, *texts):
        self.buttons = [PushButton(text=text) for text in texts]
        self.cancel = PushButton(text="Cancel", tooltip="Stop the running work; nothing is added.")
        self.status = Label(value="")
        _wrap(self.status)
        row = Container(widgets=[*self.buttons, self.cancel], layout="horizontal", labels=False)
        super().__init__(widgets=[row, self.status], labels=False)
        self.runner = TaskRunner(
            self.buttons[0] if len(self.buttons) == 1 else _Group(self.buttons),
            self.cancel,
            description,
            status=self.status,
        )


class _Group:
    """Several buttons enabled and disabled together."""

    def __init__(self, buttons):
        self._buttons = buttons

    @property
    def enabled(self):
        return all(button.enabled for button in self._buttons)

    @enabled.setter
    def enabled(self, value):
        for button in self._buttons:
            button.enabled = value


def _wrap(label):
    """Let a status label wrap instead of widening its dock."""
    from qtpy.QtWidgets import QSizePolicy

    label.native.setWordWrap(True)
    label.native.setSizePolicy(QSizePolicy.Ignored, QSizePolicy.Preferred)
