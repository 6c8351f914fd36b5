"""Synthetic cells on demand from the class-conditional diffusion model.

Cells are sampled from pure noise with classifier-free guidance (see ``sampling``). Every cell
gets its own seed (``seed + index``), so any single cell of a batch can be made again on its
own from the seed written next to it in the metadata.
"""

import csv
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from napari_cytodiffusion.core.classes import canonical_class
from napari_cytodiffusion.core.model.sampling import (
    DEFAULT_GUIDANCE,
    DEFAULT_SAMPLER,
    DEFAULT_STEPS,
)

METADATA_FILE = "metadata.csv"
METADATA_COLUMNS = ("file", "label", "seed", "steps", "guidance", "model", "sampler")
# The largest seed the command line's --seed takes: a cell's seed past it could not be given
# back to make the cell again.
MAX_SEED = 2**63 - 1


@dataclass
class SyntheticCells:
    """Generated cells and how they were made.

    Attributes
    ----------
    images : ndarray
        float32 (n, size, size, 3) in [0, 1].
    labels : list of str
        The class each cell was generated for.
    seeds : list of int
        Per-cell seed: ``generate_cells(model, label, 1, seed=s)`` makes that cell again.
    seconds : float
        Wall-clock time the generation took.
    """

    images: np.ndarray
    labels: list
    seeds: list
    steps: int
    guidance: float
    sampler: str
    model_name: str = "custom"
    seconds: float = 0.0

    def __len__(self):
        return len(self.labels)

    def features(self):
        """One row per cell (index, label, seed, steps, guidance, sampler, model)."""
        import pandas as pd

        return pd.DataFrame(
            {
                "index": range(len(self)),
                "label": self.labels,
                "seed": self.seeds,
                "steps": self.steps,
                "guidance": self.guidance,
                "sampler": self.sampler,
                "model": self.model_name,
            }
        )


def generate_cells(
    model,
    label,
    n=None,
    steps=DEFAULT_STEPS,
    guidance=DEFAULT_GUIDANCE,
    seed=0,
    sampler=DEFAULT_SAMPLER,
    batch_size=16,
    balance_colour=True,
    progress=None,
):
    """Generate synthetic cells of one class, or of a list of classes.

    Parameters
    ----------
    model : DiffusionModel
        From ``load_model_file`` (or ``weights.load_model``).
    label : str or sequence of str
        A class name of the model (then give ``n``) or one class name per cell.
    n : int, optional
        Number of cells when ``label`` is a single class.
    steps, guidance, sampler
        See :func:`~napari_cytodiffusion.core.model.sampling.denoise`. The defaults (15
        DPM-Solver++ steps, guidance 2) are the benchmarked ones
        (benchmarks/results/generation.md).
    seed : int
        Cell ``i`` uses seed ``seed + i``.
    batch_size : int
        Cells denoised together; results do not depend on it.
    balance_colour : bool
        White-balance each cell's background to the reference colour, as real cells are
        before the model sees them (the model learned a range of stain colours).
    progress : callable, optional
        Called with (done, total) network evaluations; may raise ``Cancelled``.

    Returns
    -------
    SyntheticCells
    """
    import torch

    from napari_cytodiffusion.core.model.batches import tensor_to_crops
    from napari_cytodiffusion.core.model.sampling import cell_noise, denoise

    started = time.perf_counter()
    plan = planned_cells(model, label, n, steps, guidance, seed, sampler)
    labels, seeds = plan.labels, plan.seeds
    class_ids = torch.tensor([model.classes.index(lab) for lab in labels], device=model.device)
    batches = range(0, len(labels), max(1, int(batch_size)))
    total = len(batches) * steps
    images = []
    for b, start in enumerate(batches):
        stop = start + batch_size
        noise = cell_noise(seeds[start:stop], model.image_size, model.device)
        x = denoise(
            model.unet,
            noise,
            class_ids[start:stop],
            model.alpha_bars,
            steps,
            guidance,
            sampler,
            progress=None
            if progress is None
            else lambda i, _s, b=b: progress(b * steps + i, total),
        )
        images.append(tensor_to_crops(x))
    images = np.concatenate(images)
    if balance_colour:
        images = balance_background(images)
    plan.images, plan.seconds = images, time.perf_counter() - started
    return plan


def planned_cells(
    model,
    label,
    n=None,
    steps=DEFAULT_STEPS,
    guidance=DEFAULT_GUIDANCE,
    seed=0,
    sampler=DEFAULT_SAMPLER,
):
    """The cells :func:`generate_cells` would make with these arguments, described but not
    made (``images`` is None): to check where they can be saved before the work."""
    labels = _labels(label, n, model.classes)
    check_seeds(seed, len(labels))
    return SyntheticCells(
        images=None,
        labels=labels,
        seeds=[int(seed) + i for i in range(len(labels))],
        steps=int(steps),
        guidance=float(guidance),
        sampler=sampler,
        model_name=getattr(model, "name", "custom"),
    )


def check_seeds(seed, count):
    """Raise ValueError unless the seeds of ``count`` cells from ``seed`` (``seed + i``) are
    all seeds from 0 to ``MAX_SEED``, so that each cell can be made again from its own."""
    largest = MAX_SEED - int(count) + 1
    if not 0 <= int(seed) <= largest:
        raise ValueError(
            f"seed must be from 0 to {largest} for {count} cells, got {seed}: cell i gets seed "
            f"+ i, which must stay at most 2**63 - 1 for the cell to be made again from it."
        )


def _labels(label, n, classes):
    if isinstance(label, str):
        if n is None or int(n) < 1:
            raise ValueError("Give the number of cells to generate (n >= 1).")
        return [canonical_class(label, classes)] * int(n)
    if n is not None:
        raise ValueError("Give either one class and n, or one class per cell, not both.")
    labels = [canonical_class(lab, classes) for lab in label]
    if not labels:
        raise ValueError("No classes given: nothing to generate.")
    return labels


def balance_background(crops):
    """White-balance each crop so its background has the reference colour.

    The same correction ``crop_cell`` applies to real cells, here estimated from the crop
    itself; use it on real and synthetic crops alike when they are compared side by side.
    """
    from napari_cytodiffusion.core.smear.crops import REFERENCE_BACKGROUND
    from napari_cytodiffusion.core.smear.scale import background_colour

    crops = np.asarray(crops, np.float32)
    out = np.empty_like(crops)
    for i, crop in enumerate(crops):
        gain = REFERENCE_BACKGROUND / np.clip(background_colour(crop), 1e-3, None)
        out[i] = np.clip(crop * gain, 0.0, 1.0)
    return out


def save_cells(cells, out_dir, prefix=None):
    """Write each cell as ``<class>_<seed>.png`` and list it in ``metadata.csv`` beside them.

    Files are named after their seed, so runs into one folder add to it and making a seed's
    cell again writes the same file. The CSV keeps one row per cell file (file, label, seed,
    steps, guidance, model, sampler, and any columns a person added), the rows of earlier runs
    included. ``prefix`` replaces the class in the names. Every file is written under a
    temporary name and renamed when complete. Returns the CSV path.

    Raises
    ------
    ValueError
        If a file would be replaced that is not the same cell (see :func:`check_can_save`;
        nothing is written).
    """
    from PIL import Image

    from napari_cytodiffusion.core.io import atomic_write

    out_dir = Path(out_dir)
    rows, earlier = check_can_save(cells, out_dir, prefix)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Columns a person added to the earlier rows are kept, not dropped.
    added = dict.fromkeys(c for row in earlier.values() for c in row if c)
    columns = [*METADATA_COLUMNS, *(c for c in added if c not in METADATA_COLUMNS)]
    path = out_dir / METADATA_FILE
    # The list first: a run killed while writing the cells leaves only files it lists, which
    # the next run may write again, never unlisted ones it would have to refuse to replace.
    with atomic_write(path) as partial, open(partial, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({**earlier, **rows}.values())
    for name, image in zip(rows, cells.images, strict=True):
        with atomic_write(out_dir / name) as partial:
            Image.fromarray(to_uint8(image)).save(partial)
    return path


def check_can_save(cells, out_dir, prefix=None):
    """Refuse (ValueError) to save ``cells`` in ``out_dir`` where they would replace what they
    did not make: a ``metadata.csv`` that is not a list of generated cells, a file of theirs
    that it does not list (a person's), or one it lists as a cell made another way (it would
    then hold another cell than the one its seed and settings make). ``cells`` may be
    :func:`planned_cells`, to check before the work.

    Returns
    -------
    (dict, dict)
        The cells' metadata rows and the folder's earlier ones, by file name.
    """
    from napari_cytodiffusion.core.io import read_table

    out_dir = Path(out_dir)
    table = cells.features()
    pairs = zip(cells.labels, cells.seeds, strict=True)
    table.insert(0, "file", [f"{prefix or label}_{seed:04d}.png" for label, seed in pairs])
    rows = {row["file"]: row for row in table.to_dict("records")}
    path = out_dir / METADATA_FILE
    earlier = {}
    if path.exists():
        try:
            earlier = {row.get("file"): row for row in read_table(path, METADATA_COLUMNS)}
        except ValueError as error:
            raise ValueError(
                f"{error} It is not a list of generated cells, and saving cells in "
                f"{out_dir} would replace it: write them to another folder."
            ) from None
    for name, row in rows.items():
        if name not in earlier and (out_dir / name).exists():
            raise ValueError(
                f"{out_dir / name} exists and {path} does not list it as a generated cell; "
                "saving would replace it: write to another folder."
            )
        # A listed cell whose file is missing (a run stopped midway) is free to be made anew.
        before = earlier.get(name, {}) if (out_dir / name).exists() else {}
        changed = [c for c in METADATA_COLUMNS if c in before and before[c] != str(row[c])]
        if changed:
            settings = ", ".join(f"{c} {before[c]}" for c in changed)
            raise ValueError(
                f"{out_dir / name} holds a cell made with other settings ({settings}); "
                "write to another folder."
            )
    return rows, earlier


def to_uint8(image):
    """Float [0, 1] image to uint8 with rounding."""
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)
