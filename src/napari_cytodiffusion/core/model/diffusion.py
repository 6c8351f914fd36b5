"""Noise schedule, the paired denoising error the classifier is built on, and a DDIM sampler."""

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


def from_model_range(x):
    """Map model-range images back to float [0, 1]."""
    return ((x.clamp(-1, 1) + 1) / 2).float()


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


@torch.no_grad()
def ddim_sample(
    model,
    class_ids,
    steps=20,
    guidance=2.0,
    generator=None,
    alpha_bars=None,
    x_start=None,
    t_start=None,
    progress=None,
):
    """Generate images with deterministic DDIM and classifier-free guidance.

    Parameters
    ----------
    class_ids : LongTensor (n,)
        Class of each image to generate.
    steps : int
        Number of denoising steps.
    guidance : float
        Guidance scale; 1 disables guidance, larger follows the class more strictly.
    x_start, t_start : Tensor, int, optional
        Start from the noisy images ``x_start`` at timestep ``t_start`` instead of pure noise
        (used for counterfactual edits).
    progress : callable, optional
        Called with (step, steps) after each step; it may raise to cancel.

    Returns
    -------
    Tensor (n, 3, H, W) in model range.
    """
    device = class_ids.device
    if alpha_bars is None:
        alpha_bars = cosine_alpha_bars(device=device)
    size = model.config["image_size"]
    n = class_ids.shape[0]
    top = NUM_TIMESTEPS - 1 if t_start is None else int(t_start)
    times = torch.linspace(top, 0, steps + 1, device=device).round().long()
    if x_start is None:
        x = torch.randn((n, 3, size, size), generator=generator, device=device)
    else:
        x = x_start
    null = torch.full_like(class_ids, model.num_classes)
    for i in range(steps):
        t, t_next = times[i], times[i + 1]
        t_batch = t.repeat(n)
        if guidance == 1.0:
            eps = model(x, t_batch, class_ids).float()
        else:
            both = model(torch.cat([x, x]), t_batch.repeat(2), torch.cat([class_ids, null])).float()
            eps_class, eps_null = both.chunk(2)
            eps = eps_null + guidance * (eps_class - eps_null)
        a = alpha_bars[t]
        a_next = alpha_bars[t_next] if i < steps - 1 else torch.ones((), device=device)
        x0 = ((x - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
        if progress is not None:
            progress(i + 1, steps)
    return x
