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
    return SyntheticCells(
        images=None,
        labels=labels,
        seeds=[int(seed) + i for i in range(len(labels))],
        steps=int(steps),
        guidance=float(guidance),
        sampler=sampler,
        model_name=getattr(model, "name", "custom"),
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
    steps, guidance, model, sampler), the rows of earlier runs included. ``prefix`` replaces
    the class in the names. Every file is written under a temporary name and renamed when
    complete. Returns the CSV path.

    Raises
    ------
    ValueError
        If a file name is taken by a cell made with other settings (nothing is written).
    """
    from PIL import Image

    from napari_cytodiffusion.core.io import atomic_write

    out_dir = Path(out_dir)
    rows, earlier = check_can_save(cells, out_dir, prefix)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, image in zip(rows, cells.images, strict=True):
        with atomic_write(out_dir / name) as partial:
            Image.fromarray(to_uint8(image)).save(partial)
    path = out_dir / METADATA_FILE
    with atomic_write(path) as partial, open(partial, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=METADATA_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({**earlier, **rows}.values())
    return path


def check_can_save(cells, out_dir, prefix=None):
    """Refuse (ValueError) to save ``cells`` where ``metadata.csv`` says a file of theirs
    holds a cell made another way: it would then hold another cell than the one its seed and
    settings make. ``cells`` may be :func:`planned_cells`, to check before the work.

    Returns
    -------
    (dict, dict)
        The cells' metadata rows and the folder's earlier ones, by file name.
    """
    from napari_cytodiffusion.core.io import read_table

    table = cells.features()
    pairs = zip(cells.labels, cells.seeds, strict=True)
    table.insert(0, "file", [f"{prefix or label}_{seed:04d}.png" for label, seed in pairs])
    rows = {row["file"]: row for row in table.to_dict("records")}
    path = Path(out_dir) / METADATA_FILE
    earlier = {row.get("file"): row for row in read_table(path)} if path.is_file() else {}
    for name, row in rows.items():
        before = earlier.get(name, {})
        changed = [c for c in METADATA_COLUMNS if c in before and before[c] != str(row[c])]
        if changed:
            settings = ", ".join(f"{c} {before[c]}" for c in changed)
            raise ValueError(
                f"{Path(out_dir) / name} holds a cell made with other settings ({settings}); "
                "write to another folder."
            )
    return rows, earlier


def to_uint8(image):
    """Float [0, 1] image to uint8 with rounding."""
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)
