"""Noise schedule, noising, bfloat16 autocast and the model's value range."""

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
