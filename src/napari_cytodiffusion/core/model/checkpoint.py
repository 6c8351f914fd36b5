"""Loading a trained diffusion model from a file, without unpickling arbitrary objects."""

import json
from dataclasses import dataclass, field
from pathlib import Path

from napari_cytodiffusion.core.classes import CLASSES

MODEL_FORMAT = "napari-cytodiffusion-model"


class ModelFileError(ValueError):
    """A model file that is not a napari-cytodiffusion model or does not match this version."""


@dataclass
class DiffusionModel:
    """A trained class-conditional diffusion model, ready to use on one device.

    Attributes
    ----------
    unet : CellUNet
        The network, in eval mode, on ``device``.
    classes : tuple of str
        Class names in the order of the class ids.
    image_size : int
        Side of the square crops the model takes.
    alpha_bars : Tensor
        The noise schedule on ``device``.
    calibration : dict
        Values fitted on the validation split (temperature, review thresholds, ...).
    metadata : dict
        Free-form description: training data, steps, name, version.
    """

    unet: object
    classes: tuple
    image_size: int
    alpha_bars: object
    device: object
    calibration: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)
    name: str = "custom"

    @property
    def num_classes(self):
        return len(self.classes)

    @property
    def lab_rbc_diameter(self):
        """Red-cell diameter (px) of the scanner the model was adapted to, or None: the
        scale of an image of that lab with too few red cells to measure."""
        return self.metadata.get("rbc_diameter")


def load_model_file(path, device="cpu", name=None):
    """Load a model file written by ``export_model`` or a training checkpoint.

    Uses ``torch.load(weights_only=True)``: only tensors and plain values are read.

    Raises
    ------
    ModelFileError
        If the file is not a napari-cytodiffusion model.
    """

    from napari_cytodiffusion.core.devices import resolve_device
    from napari_cytodiffusion.core.model.diffusion import cosine_alpha_bars
    from napari_cytodiffusion.core.model.unet import CellUNet

    device = resolve_device(device)
    state = _model_state(path)
    config, weights, classes = _contents(path, state)
    try:
        unet = CellUNet(
            num_classes=config["num_classes"],
            channels=tuple(config["channels"]),
            image_size=config["image_size"],
        )
        unet.load_state_dict(
            {k: v.float() if v.is_floating_point() else v for k, v in weights.items()}
        )
    except (RuntimeError, TypeError, ValueError, AttributeError) as error:
        raise ModelFileError(
            f"{path}: the weights do not fit the model it describes ({error})."
        ) from error
    unet.eval().requires_grad_(False).to(device)
    return DiffusionModel(
        unet=unet,
        classes=classes,
        image_size=int(config["image_size"]),
        alpha_bars=cosine_alpha_bars(device=device),
        device=device,
        calibration=json.loads(state.get("calibration") or "{}"),
        metadata=json.loads(state.get("metadata") or "{}"),
        name=name or str(path),
    )


def save_model_file(model, path):
    """Write a :class:`DiffusionModel` (float16 weights, classes, calibration, metadata) to
    ``path`` atomically: an interrupted write leaves any earlier file there intact."""
    import torch

    from napari_cytodiffusion.core.io import atomic_write

    weights = model.unet.state_dict()
    contents = {
        "format": MODEL_FORMAT,
        "version": 1,
        "config": json.dumps(model.unet.config),
        "classes": list(model.classes),
        "state_dict": {
            key: value.detach().cpu().half() if value.is_floating_point() else value.cpu()
            for key, value in weights.items()
        },
        "metadata": json.dumps(model.metadata),
        "calibration": json.dumps(model.calibration),
    }
    with atomic_write(path) as partial:
        torch.save(contents, partial)


def model_file_classes(path):
    """The classes of a model file, read without building its network (widgets ask on the
    main thread, whenever a person picks a file).

    Raises
    ------
    ModelFileError
        As :func:`load_model_file`.
    """
    return _contents(path, _model_state(path))[2]


def _model_state(path):
    """:func:`read_state` of a file that must be a napari-cytodiffusion model."""
    state = read_state(path)
    if not isinstance(state, dict) or state.get("format") != MODEL_FORMAT:
        raise ModelFileError(f"{path} is not a napari-cytodiffusion model file.")
    return state


def read_state(path):
    """A model or checkpoint file's contents, read without running any code in it.

    Raises
    ------
    ModelFileError
        If the file is missing, damaged, or holds Python objects beyond tensors and plain
        values (a pickle, which could run code: it is refused, never loaded).
    """
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise _unreadable(path, error) from error


def _unreadable(path, error):
    """The ModelFileError for a file ``torch.load`` failed on, saying what it is instead
    (torch's own message names a byte or a key, not the problem)."""
    import pickle

    if isinstance(error, OSError):
        return ModelFileError(f"{path} cannot be read: {error.strerror or error}.")
    if Path(path).stat().st_size == 0:
        return ModelFileError(
            f"{path} is empty (an interrupted copy or download?): save it again with train or "
            "adapt, or download it again."
        )
    if not _written_by_torch(path):
        return ModelFileError(
            f"{path} is not a model file saved by napari-cytodiffusion (train, adapt, or a "
            "registry model): it is another kind of file. Choose the .pt or .ckpt they write."
        )
    if isinstance(error, pickle.UnpicklingError):
        return ModelFileError(
            f"{path} holds Python objects beyond tensors and plain values; it was not loaded, "
            "because loading such a file could run code. Use a model file written by "
            "napari-cytodiffusion (train, or a registry model)."
        )
    # The first line: torch goes on about how files get damaged.
    reason = (str(error) or type(error).__name__).strip().splitlines()[0]
    return ModelFileError(
        f"{path} is a PyTorch file that cannot be read as a model, damaged or cut short "
        f"({reason}): save it again with train or adapt, or download it again."
    )


def _written_by_torch(path):
    """Whether ``path`` is a file ``torch.save`` wrote: a zip archive holding a pickle
    (``*/data.pkl``), or (before torch 1.6) a pickle, which starts with its protocol byte. A
    zip too damaged to list (a file cut short) counts too; another zip (``.npz``) does not."""
    import zipfile

    with open(path, "rb") as file:
        start = file.read(4)
    if start[:1] == b"\x80":
        return True
    if start != b"PK\x03\x04":
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("/data.pkl") for name in archive.namelist())
    except zipfile.BadZipFile:
        return True


def _contents(path, state):
    """(config, weights, classes) of a model file's state, checked for what loading needs."""
    try:
        config = json.loads(state["config"])
        weights = state.get("state_dict") or state["ema"]
        size, count = int(config["image_size"]), int(config["num_classes"])
        levels = len(config["channels"])
        classes = tuple(str(name) for name in state.get("classes", CLASSES))
    except (KeyError, TypeError, ValueError) as error:
        raise ModelFileError(
            f"{path} is an incomplete napari-cytodiffusion model file (missing or bad {error})."
        ) from error
    if size < 2**levels or size % 2**levels or count < 1 or len(classes) != count:
        raise ModelFileError(
            f"{path} describes an impossible model ({size}-px images, {count} classes named "
            f"{len(classes)} times)."
        )
    return config, weights, classes
