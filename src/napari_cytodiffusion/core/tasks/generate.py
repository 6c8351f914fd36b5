"""Generate cells: synthetic cells of the model's classes, each reproducible from its seed."""

import numpy as np

from napari_cytodiffusion.core.checks import is_whole_number
from napari_cytodiffusion.core.model.generation import generate_cells, save_cells
from napari_cytodiffusion.core.model.sampling import (
    DEFAULT_GUIDANCE,
    DEFAULT_SAMPLER,
    DEFAULT_STEPS,
    SAMPLERS,
)

# Most cells one request makes: 10,000 cells of 64 px are 0.5 GB of float images.
MAX_CELLS = 10_000

__all__ = ["generate", "save_cells", "summary", "check_sampler_settings", "MAX_CELLS"]


def generate(
    model,
    label,
    n=None,
    steps=DEFAULT_STEPS,
    guidance=DEFAULT_GUIDANCE,
    seed=0,
    sampler=DEFAULT_SAMPLER,
    progress=None,
):
    """Generate ``n`` synthetic cells of class ``label`` (or one cell per class in a list).

    Arguments are checked first, with a message naming the one that is wrong; see
    :func:`~napari_cytodiffusion.core.model.generation.generate_cells` for their meaning.

    Returns
    -------
    SyntheticCells
        With the seconds the generation took.
    """
    count = n if isinstance(label, str) else len(label)
    if count is not None and not (is_whole_number(count) and 1 <= count <= MAX_CELLS):
        raise ValueError(
            f"The number of cells must be a whole number from 1 to {MAX_CELLS}, got {count}."
        )
    check_sampler_settings(steps, guidance, sampler)
    return generate_cells(model, label, n, steps, guidance, seed, sampler, progress=progress)


def check_sampler_settings(steps, guidance, sampler=DEFAULT_SAMPLER):
    """Raise ValueError, naming the setting, unless the sampler can run with these."""
    if not (is_whole_number(steps) and steps >= 1):
        raise ValueError(f"steps must be a whole number, at least 1, got {steps!r}.")
    real = isinstance(guidance, int | float | np.number) and not isinstance(guidance, bool)
    # Below 1 the cells drift from their class towards no class (at 0 every class gives the
    # same cell), yet they would be labelled with the class.
    if not (real and np.isfinite(guidance) and guidance >= 1):
        raise ValueError(
            f"guidance must be a finite number of at least 1 (1: the class alone, higher: "
            f"follow it more strictly; below 1 the cells drift from their class towards no "
            f"class), got {guidance!r}."
        )
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}.")


def summary(cells):
    """One line: how many cells of which class, and how fast."""
    kinds = sorted(set(cells.labels))
    what = kinds[0] if len(kinds) == 1 else "mixed"
    per_cell = cells.seconds / max(len(cells), 1)
    return f"{len(cells)} {what} cells in {cells.seconds:.1f} s ({per_cell:.2f} s per cell)"
