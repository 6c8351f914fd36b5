"""Turing test: a blinded panel of real and synthetic cells, and its scoring."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from napari_cytodiffusion.core import turing
from napari_cytodiffusion.core.checks import is_whole_number
from napari_cytodiffusion.core.progress import phases

# Shares of the progress bar: normalising the real cells, generating the synthetic ones.
_PROGRESS_WEIGHTS = (1, 4)


@dataclass
class TuringRequest:
    """Where the real cells come from and how the synthetic ones are made.

    Give either ``folder`` (class subfolders, or a CSV with file, label and split columns)
    or ``images`` with one class per image in ``labels``.

    Attributes
    ----------
    n : int
        Real cells in the panel (as many synthetic ones are made).
    split : str, optional
        Keep only this split of a splits CSV ("test": cells the model never saw).
    seed : int
        Seeds the choice of real cells, the synthetic cells and the shuffle.
    steps, guidance : optional
        Sampler settings; the generator's defaults when not given.
    rbc_diameter : float, optional
        Red-cell diameter of the real images. When not given, the images of a folder share
        one estimate per scanner (three or more images of one size), as the training cells
        did; images given as arrays are each measured alone.
    images_name : str
        What ``images`` are called in messages and in the key's origins.
    image_word : str
        What one of ``images`` is called in the key's origins, before its index (0 up):
        "plane" of a stack, "tile" of a grid.
    """

    n: int
    folder: Path | None = None
    split: str | None = None
    images: np.ndarray | None = None
    labels: list | None = None
    seed: int = 0
    steps: int | None = None
    guidance: float | None = None
    rbc_diameter: float | None = None
    images_name: str = "the image stack"
    image_word: str = "plane"


def make_turing_panel(model, request, progress=None):
    """Pick and normalise the real cells, generate as many synthetic ones, shuffle them.

    Returns
    -------
    turing.Panel
    """
    _validate_request(request)
    normalising, generating = phases(progress, _PROGRESS_WEIGHTS)
    if request.folder is not None:
        records = turing.select_real_cells(
            request.folder, request.n, request.seed, request.split, model.classes
        )
        cells, labels = records, [r.label for r in records]
        origins = [str(r.path) for r in records]
    else:
        count, name = len(request.images), request.images_name
        if count < request.n:
            raise ValueError(f"Asked for {request.n} real cells but {name} holds {count}.")
        chosen = turing.choose(count, request.n, request.seed)
        cells = [request.images[i] for i in chosen]
        labels = [_model_class(request.labels[i], model) for i in chosen]
        origins = [f"{name}, {request.image_word} {i}" for i in chosen]
    real = turing.normalise_real_cells(
        cells, model.image_size, _real_cell_scales(request, cells), normalising
    )
    return turing.make_panel(
        model,
        real,
        labels,
        request.seed,
        request.steps,
        request.guidance,
        origins=origins,
        progress=generating,
    )


def _validate_request(request):
    """Check every field before any work, with a message saying what to give."""
    from napari_cytodiffusion.core.model import sampling
    from napari_cytodiffusion.core.model.generation import check_seeds
    from napari_cytodiffusion.core.tasks.generate import check_sampler_settings

    if not (is_whole_number(request.n) and request.n >= 1):
        raise ValueError(
            f"The panel needs a whole number of real cells, at least 1, got n = {request.n!r}."
        )
    if (request.folder is None) == (request.images is None):
        raise ValueError(
            "Give the real cells: a folder of class subfolders (folder=...), or images with "
            "one class each (images=..., labels=...), not both."
        )
    if request.images is not None and (
        request.labels is None or len(request.labels) != len(request.images)
    ):
        raise ValueError(
            f"Give one class per image in labels: {len(request.images)} images, "
            f"{'no' if request.labels is None else len(request.labels)} labels."
        )
    check_sampler_settings(
        sampling.DEFAULT_STEPS if request.steps is None else request.steps,
        sampling.DEFAULT_GUIDANCE if request.guidance is None else request.guidance,
    )
    check_seeds(request.seed, request.n)  # the synthetic cells' seeds, before any work


def _real_cell_scales(request, cells):
    """The red-cell diameter to crop each real cell at: the one given, or one per scanner.

    Real cells cut each at its own estimate vary in size by 10-20 % where synthetic ones do
    not, a tell an expert could learn; the images of one scanner share one scale instead
    (:func:`~napari_cytodiffusion.core.tasks.classify.batch_rbc_diameters`), as the model's
    training cells did.
    """
    from napari_cytodiffusion.core.tasks.classify import batch_rbc_diameters

    if request.rbc_diameter is not None or request.folder is None:
        return request.rbc_diameter
    return batch_rbc_diameters([record.path for record in cells])


def score_turing_test(answers_path, key_path):
    """Score an expert's answers file against the key file (both CSV).

    Returns
    -------
    dict
        See :func:`napari_cytodiffusion.core.turing.score`.
    """
    answers = turing.read_csv(answers_path, ("item", "answer"))
    key = turing.read_csv(key_path, ("item", "truth", "label"))
    return turing.score(answers, key)


def _model_class(name, model):
    from napari_cytodiffusion.core.classes import canonical_class

    return canonical_class(name, model.classes)
