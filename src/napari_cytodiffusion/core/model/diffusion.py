"""Noise schedule, bfloat16 autocast, and the paired denoising error of a batch of cells."""

import math

import torch

NUM_TIMESTEPS = 1000


def cosine_alpha_bars(num_timesteps=NUM_TIMESTEPS, device=None):
    """Cumulative signal fractions alpha_bar(t) of the cosine schedule, t = 0..T-1."""
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64, device=device) / num_timesteps
    f = torch.cos((steps + 0.008) / 1.008 * math.pi / 2) ** 2
    alpha_bars = (f[1:] / f[0]).clamp(1e-5, 0.9999)
    return alpha_bars.float()


def add_noise(x0, t, noise, alpha_bars):
    """Noisy images x_t = sqrt(a) x0 + sqrt(1 - a) noise for integer timesteps ``t``."""
    a = alpha_bars[t].view(-1, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def autocast(device):
    """bfloat16 autocast for the network on CUDA; a no-op elsewhere (CPUs run float32)."""
    import contextlib

    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_model_range(images):
    """Map uint8 or [0, 1] float images (batch, 3, H, W) to the model's [-1, 1]."""
    if images.dtype == torch.uint8:
        images = images.float() / 255.0
    return images * 2 - 1


@torch.no_grad()
def paired_denoising_errors(model, x0, t, noise, class_ids, alpha_bars, reduce=True):
    """Denoising error of every image under every candidate class, with shared noise.

    Parameters
    ----------
    model : CellUNet
    x0 : Tensor (n, 3, H, W)
        Clean images in model range.
    t : LongTensor (n,)
        One timestep per image.
    noise : Tensor (n, 3, H, W)
        One noise draw per image, shared by all its candidate classes.
    class_ids : LongTensor (n, k)
        Candidate classes per image.
    reduce : bool
        Mean squared error per (image, class) if True, else the per-pixel squared error.

    Returns
    -------
    Tensor (n, k) or (n, k, 3, H, W)
    """
    n, k = class_ids.shape
    encoded = model.encode(add_noise(x0, t, noise, alpha_bars), t)
    from napari_cytodiffusion.core.model.unet import repeat_encoded

    predicted = model.decode(repeat_encoded(encoded, k), class_ids.reshape(-1)).float()
    error = (predicted - noise.float().repeat_interleave(k, 0)) ** 2
    error = error.view(n, k, *error.shape[1:])
    return error.mean(dim=(2, 3, 4)) if reduce else error
