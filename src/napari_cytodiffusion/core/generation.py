"""Synthetic cells on demand from the class-conditional diffusion model.

Sampling solves the model's probability-flow ODE from pure noise with classifier-free
guidance. Two solvers are offered: DPM-Solver++(2M), a second-order multistep solver that
reaches DDIM-quality cells in about half the steps, and plain DDIM. Because the UNet's encoder
does not see the class, each guided step encodes the noisy batch once and decodes it twice
(class and null class) instead of running the whole network twice.

Every cell gets its own seed (``seed + index``), so any single cell of a batch can be made
again on its own from the seed written next to it in the metadata.
"""

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from napari_cytodiffusion.core.classes import CLASSES, canonical_class
from napari_cytodiffusion.core.progress import report

SAMPLERS = ("dpm++2m", "ddim")
DEFAULT_SAMPLER = "dpm++2m"
DEFAULT_STEPS = 15
DEFAULT_GUIDANCE = 2.0
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
    """

    images: np.ndarray
    labels: list
    seeds: list
    steps: int
    guidance: float
    sampler: str
    model_name: str = "custom"
    metadata: dict = field(default_factory=dict)

    def __len__(self):
        return len(self.labels)


def guided_noise(unet, x, t, class_ids, guidance):
    """Classifier-free guided noise prediction at one timestep ``t`` (a 0-d LongTensor)."""
    import torch

    from napari_cytodiffusion.core.model.unet import repeat_encoded

    n = x.shape[0]
    t_batch = t.reshape(1).expand(n)
    if guidance == 1.0:
        return unet(x, t_batch, class_ids).float()
    null = torch.full_like(class_ids, unet.num_classes)
    encoded = unet.encode(x, t_batch)
    both = unet.decode(repeat_encoded(encoded, 2), torch.stack([class_ids, null], 1).reshape(-1))
    eps_class, eps_null = both.float().view(n, 2, *x.shape[1:]).unbind(1)
    return eps_null + guidance * (eps_class - eps_null)


def denoise(
    unet,
    x,
    class_ids,
    alpha_bars,
    steps=DEFAULT_STEPS,
    guidance=DEFAULT_GUIDANCE,
    sampler=DEFAULT_SAMPLER,
    t_start=None,
    progress=None,
):
    """Integrate the probability-flow ODE from noisy ``x`` at ``t_start`` down to clean images.

    Parameters
    ----------
    unet : CellUNet
    x : Tensor (n, 3, H, W)
        Pure noise (``t_start`` None) or images noised to ``t_start``.
    class_ids : LongTensor (n,)
    alpha_bars : Tensor
        The model's noise schedule.
    steps : int
        Network evaluations (each one encode and, with guidance, two decodes).
    guidance : float
        Classifier-free guidance scale; 1 disables it.
    sampler : {"dpm++2m", "ddim"}
    t_start : int, optional
        Timestep ``x`` is at; the last timestep when not given.
    progress : callable, optional
        Called with (step, steps); may raise ``Cancelled``.

    Returns
    -------
    Tensor (n, 3, H, W) in model range [-1, 1].
    """
    import torch

    from napari_cytodiffusion.core.model.diffusion import NUM_TIMESTEPS, autocast

    if sampler not in SAMPLERS:
        raise ValueError(f"Unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}.")
    if steps < 1:
        raise ValueError("steps must be at least 1.")
    top = NUM_TIMESTEPS - 1 if t_start is None else int(t_start)
    times = sampling_times(alpha_bars, top, steps).to(x.device)
    steps = len(times) - 1
    alphas = alpha_bars.to(x.device)[times].double()
    # The last step lands on clean images: signal 1, noise 0.
    alphas[-1] = 1.0
    signal, noise = alphas.sqrt(), (1 - alphas).sqrt()
    log_snr = torch.log(signal / noise.clamp_min(1e-12))
    previous_x0, previous_h = None, None
    with torch.no_grad(), autocast(x.device):
        for i in range(steps):
            eps = guided_noise(unet, x, times[i], class_ids, guidance)
            x0 = ((x - noise[i] * eps) / signal[i]).clamp(-1, 1)
            if i == steps - 1:
                x = x0
            elif sampler == "ddim":
                eps = (x - signal[i] * x0) / noise[i]
                x = signal[i + 1] * x0 + noise[i + 1] * eps
            else:
                h = log_snr[i + 1] - log_snr[i]
                estimate = x0
                if previous_x0 is not None:
                    r = previous_h / h
                    estimate = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * previous_x0
                x = (noise[i + 1] / noise[i]) * x - signal[i + 1] * torch.expm1(-h) * estimate
                previous_x0, previous_h = x0, h
            x = x.float()
            report(progress, i + 1, steps)
    return x


def sampling_times(alpha_bars, top, steps):
    """``steps + 1`` timesteps from ``top`` down to 0, evenly spaced in log signal-to-noise.

    Even spacing in log-SNR rather than in t puts steps where the image actually changes
    (see docs/generation.md for the measured effect). Steps that would gain no signal (in
    the clamped ends of the schedule; only with very many steps) are dropped.
    """
    import torch

    alpha_bars = alpha_bars.double().cpu()
    log_snr = 0.5 * torch.log(alpha_bars / (1 - alpha_bars))
    wanted = torch.linspace(float(log_snr[top]), float(log_snr[0]), steps + 1, dtype=torch.float64)
    nearest = (log_snr[None, : top + 1] - wanted[:, None]).abs().argmin(dim=1).tolist()
    # Start where asked (the schedule is clamped flat near T, so the nearest may be earlier),
    # then keep only steps that gain signal: a zero log-SNR step would divide by zero.
    times = [top]
    for t in nearest[1:]:
        if log_snr[t] > log_snr[times[-1]]:
            times.append(t)
    return torch.tensor(times, dtype=torch.long)


def invert(unet, x0, class_ids, alpha_bars, t_end, steps, progress=None):
    """Run deterministic DDIM backwards: clean images ``x0`` to their noisy latents at ``t_end``.

    Denoising the result under the same class gives ``x0`` back (up to solver error); under
    another class it gives the same cell edited towards that class.
    """
    import torch

    times = sampling_times(alpha_bars, int(t_end), steps).flip(0).to(x0.device)
    steps = len(times) - 1
    alphas = alpha_bars.to(x0.device)[times]
    x = x0
    with torch.no_grad():
        for i in range(steps):
            eps = guided_noise(unet, x, times[i], class_ids, 1.0)
            a, a_next = alphas[i], alphas[i + 1]
            clean = (x - (1 - a).sqrt() * eps) / a.sqrt()
            x = a_next.sqrt() * clean + (1 - a_next).sqrt() * eps
            report(progress, i + 1, steps)
    return x


def cell_noise(seeds, size, device="cpu"):
    """Starting noise for each cell, drawn on the CPU from its own seed (same on every device)."""
    import torch

    noise = []
    for seed in seeds:
        generator = torch.Generator().manual_seed(int(seed))
        noise.append(torch.randn((3, size, size), generator=generator))
    return torch.stack(noise).to(device)


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
        A class name (then give ``n``) or one class name per cell.
    n : int, optional
        Number of cells when ``label`` is a single class.
    steps, guidance, sampler
        See :func:`denoise`. The defaults (15 DPM-Solver++ steps, guidance 2) are the
        benchmarked ones (benchmarks/results/generation.md).
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

    labels = _labels(label, n)
    class_ids = torch.tensor([CLASSES.index(lab) for lab in labels], device=model.device)
    seeds = [int(seed) + i for i in range(len(labels))]
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
        images.append(((x + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy())
    images = np.concatenate(images).astype(np.float32)
    if balance_colour:
        images = balance_background(images)
    return SyntheticCells(
        images=images,
        labels=labels,
        seeds=seeds,
        steps=int(steps),
        guidance=float(guidance),
        sampler=sampler,
        model_name=getattr(model, "name", "custom"),
    )


def _labels(label, n):
    if isinstance(label, str):
        if n is None or int(n) < 1:
            raise ValueError("Give the number of cells to generate (n >= 1).")
        return [canonical_class(label)] * int(n)
    if n is not None:
        raise ValueError("Give either one class and n, or one class per cell, not both.")
    labels = [canonical_class(lab) for lab in label]
    if not labels:
        raise ValueError("No classes given: nothing to generate.")
    return labels


def balance_background(crops):
    """White-balance each crop so its background has the reference colour.

    The same correction ``crop_cell`` applies to real cells, here estimated from the crop
    itself; use it on real and synthetic crops alike when they are compared side by side.
    """
    from napari_cytodiffusion.core.crops import REFERENCE_BACKGROUND
    from napari_cytodiffusion.core.scale import background_colour

    crops = np.asarray(crops, np.float32)
    out = np.empty_like(crops)
    for i, crop in enumerate(crops):
        gain = REFERENCE_BACKGROUND / np.clip(background_colour(crop), 1e-3, None)
        out[i] = np.clip(crop * gain, 0.0, 1.0)
    return out


def save_cells(cells, out_dir, prefix=None):
    """Write each cell as a PNG and a ``metadata.csv`` next to them; returns the CSV path.

    The CSV has one row per cell: file, label, seed, steps, guidance, model, sampler.
    """
    from PIL import Image

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (image, label, seed) in enumerate(
        zip(cells.images, cells.labels, cells.seeds, strict=True)
    ):
        name = f"{prefix or label}_{i:04d}.png"
        Image.fromarray(to_uint8(image)).save(out_dir / name)
        rows.append(
            {
                "file": name,
                "label": label,
                "seed": seed,
                "steps": cells.steps,
                "guidance": cells.guidance,
                "model": cells.model_name,
                "sampler": cells.sampler,
            }
        )
    path = out_dir / METADATA_FILE
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=METADATA_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def to_uint8(image):
    """Float [0, 1] image to uint8 with rounding."""
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)
