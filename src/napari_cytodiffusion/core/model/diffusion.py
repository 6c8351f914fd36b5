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
    """bfloat16 autocast for the network on CUDA and on CPUs that compute in bfloat16 (AMX or
    AVX-512 BF16); a no-op elsewhere, where bfloat16 would be emulated and slower.

    On 2 cores of an AMD EPYC with AVX-512 BF16 it makes classification 1.7 times faster
    (0.436 -> 0.253 s per cell, the same calls for 99.5 % of PBC test cells) and adaptation's
    training steps 1.7 times faster; 2.4 times on an Intel Xeon with AMX. Weights stay float32.
    """
    import contextlib

    if device.type == "cuda" or (device.type == "cpu" and _cpu_computes_in_bfloat16()):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _cpu_computes_in_bfloat16():
    capabilities = getattr(torch.cpu, "get_capabilities", dict)()
    return bool(capabilities.get("amx_bf16") or capabilities.get("avx512_bf16"))


def to_model_range(images):
    """Map uint8 or [0, 1] float images (batch, 3, H, W) to the model's [-1, 1]."""
    if images.dtype == torch.uint8:
        images = images.float() / 255.0
    return images * 2 - 1
