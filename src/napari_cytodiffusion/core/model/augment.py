"""Augmentations for what differs between labs, applied batch-wise on the training device.

A cell's class does not change with the lab that stained and photographed it, so a model that
should hold up on other labs' smears is shown every cell under many labs' conditions. Each
augmentation below draws its own parameters per image and is applied to the whole batch at
once (on the GPU during training; the same code runs on a CPU in the tests):

* :func:`stain_jitter`: the stain itself, in optical-density space: the amounts of the red
  (eosin-like) and blue (azure-like) dyes and their hues, on the same stain basis the
  inference-time normalisation uses (:mod:`~napari_cytodiffusion.core.smear.normalise`);
* :func:`colour_jitter`: hue and saturation, brightness, contrast and gamma;
* :func:`illumination`: a background tint (residual white balance) and vignetting;
* :func:`greyscale`: the colours taken away (off by default: see :data:`LAB_AUGMENTATIONS`);
* :func:`blur`: defocus (Gaussian blur of random width);
* :func:`sensor_noise`: signal-dependent and constant noise;
* :func:`jpeg_artefacts`: 8 x 8 block DCT quantisation at a random quality, as a JPEG
  encoder does;
* geometry (rotation, flips, scale within +-20 %, shift) is in ``training.augment``.

Images are float tensors (n, 3, H, W) in [0, 1] with the reference background (crops made by
``crop_cell``); every function returns a new tensor of the same shape. torch is imported
inside the functions so that the core imports without it.
"""

import math

import numpy as np

# The default strength of each augmentation: (probability an image gets it, parameters).
LAB_AUGMENTATIONS = {
    "stain": (0.8, {"amount": 0.25, "hue_degrees": 8.0}),
    "colour": (
        0.8,
        {"hue": 0.03, "saturation": 0.25, "brightness": 0.08, "contrast": 0.15, "gamma": 0.2},
    ),
    "illumination": (0.5, {"tint": 0.06, "vignette": 0.25}),
    "blur": (0.4, {"sigma": 1.2}),
    "noise": (0.4, {"sigma": 0.025}),
    "jpeg": (0.3, {"quality": (30, 90)}),
    "grey": (0.0, {}),
}
# Luma weights (ITU-R BT.601) of a greyscale image.
LUMA = (0.299, 0.587, 0.114)


def _uniform(n, low, high, generator, device):
    import torch

    return torch.rand(n, device=device, generator=generator) * (high - low) + low


def _chosen(n, probability, generator, device):
    """A (n, 1, 1, 1) float mask of the images that get an augmentation."""
    import torch

    return (
        (torch.rand(n, device=device, generator=generator) < probability).float().view(n, 1, 1, 1)
    )


def _stain_basis(device):
    """Unit columns (red dye, blue dye, their normal) of the reference stain vectors."""
    import torch

    from napari_cytodiffusion.core.smear.normalise import (
        REFERENCE_NUCLEUS_DIRECTION,
        REFERENCE_RBC_DENSITY,
        _basis,
    )

    basis = _basis(
        REFERENCE_RBC_DENSITY.astype(np.float64), REFERENCE_NUCLEUS_DIRECTION.astype(np.float64)
    )
    return torch.tensor(basis, dtype=torch.float32, device=device)


def _background(device):
    import torch

    from napari_cytodiffusion.core.smear.normalise import REFERENCE_BACKGROUND

    return torch.tensor(REFERENCE_BACKGROUND, device=device).view(1, 3, 1, 1)


def _rotation(axis, angle):
    """Batch of 3 x 3 rotations about unit ``axis`` (n, 3) by ``angle`` (n,) (Rodrigues)."""
    import torch

    x, y, z = axis.unbind(1)
    zero = torch.zeros_like(x)
    k = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], 1).view(-1, 3, 3)
    eye = torch.eye(3, device=axis.device).expand_as(k)
    s, c = angle.sin().view(-1, 1, 1), angle.cos().view(-1, 1, 1)
    return eye + s * k + (1 - c) * (k @ k)


def stain_jitter(x, generator, amount=0.25, hue_degrees=8.0, probability=1.0):
    """Change the amounts and hues of the two dyes in optical-density space.

    Each pixel's OD (against the reference background) is split into red-dye, blue-dye and
    remaining parts on the reference stain basis; each dye's amount is scaled by
    ``exp(N(0, amount))`` and its direction turned by up to ``hue_degrees``; then the OD is
    recomposed.

    The dye amounts are the closest non-negative ones (:func:`_dye_amounts`): the two dye
    directions are close, so a plain unmixing splits a violet nucleus into much blue dye and
    *negative* red dye, and scaling those apart made nuclei paler than the glass.
    """
    import torch

    n, device = x.shape[0], x.device
    basis = _stain_basis(device)  # (3, 3): columns are stain directions
    background = _background(device)
    density = -torch.log((x / background).clamp(1e-3, None))  # (n, 3, H, W)
    amounts, rest = _dye_amounts(density, basis)
    # Three draws an image (the third unused) keep the random stream of earlier versions.
    scale = torch.exp(amount * torch.randn(n, 3, device=device, generator=generator))[:, :2]
    directions = []
    for column in range(2):
        axis = torch.randn(n, 3, device=device, generator=generator)
        axis = axis / axis.norm(dim=1, keepdim=True).clamp(min=1e-6)
        angle = torch.deg2rad(_uniform(n, -hue_degrees, hue_degrees, generator, device))
        directions.append(_rotation(axis, angle) @ basis[:, column])
    dyes = torch.stack(directions, dim=2) * scale[:, None, :]  # (n, 3, 2)
    jittered = torch.einsum("nij,njhw->nihw", dyes, amounts) + rest
    # A dye absorbs light: no pixel ends up brighter than the glass unless it was.
    jittered = torch.maximum(jittered, density.clamp(max=0))
    out = (background * torch.exp(-jittered)).clamp(0, 1)
    mask = _chosen(n, probability, generator, device)
    return mask * out + (1 - mask) * x


def _dye_amounts(density, basis):
    """(n, 2, H, W) amounts of the two dyes of ``basis`` that best fit ``density`` (n, 3, H, W)
    without going negative (least squares), and the rest of the density, (n, 3, H, W)."""
    import torch

    dyes = basis[:, :2]
    free = torch.einsum("ij,njhw->nihw", torch.linalg.pinv(dyes), density)
    # Where the free fit wants a negative dye, the best fit with that dye at zero is the
    # projection on the other dye alone (or nothing, if that is negative too).
    alone = torch.einsum("ij,nihw->njhw", dyes, density) / (dyes**2).sum(0).view(1, 2, 1, 1)
    alone = alone.clamp(min=0)
    zero = torch.zeros_like(free[:, :1])
    amounts = torch.where(
        free[:, :1] < 0,
        torch.cat([zero, alone[:, 1:]], 1),
        torch.where(free[:, 1:] < 0, torch.cat([alone[:, :1], zero], 1), free),
    )
    return amounts, density - torch.einsum("ij,njhw->nihw", dyes, amounts)


def colour_jitter(
    x,
    generator,
    hue=0.03,
    saturation=0.25,
    brightness=0.08,
    contrast=0.15,
    gamma=0.2,
    probability=1.0,
):
    """Hue (turns of the colour wheel), saturation, brightness, contrast and gamma."""
    import torch

    n, device = x.shape[0], x.device
    grey = x.mean(dim=1, keepdim=True)
    # Hue: rotate the chroma about the grey axis (YIQ-like, equal-weight luma).
    angle = 2 * math.pi * _uniform(n, -hue, hue, generator, device)
    axis = torch.full((n, 3), 1 / math.sqrt(3), device=device)
    rotated = torch.einsum("nij,njhw->nihw", _rotation(axis, angle), x - grey) + grey
    sat = torch.exp(_uniform(n, -saturation, saturation, generator, device)).view(n, 1, 1, 1)
    out = grey + sat * (rotated - grey)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    con = torch.exp(_uniform(n, -contrast, contrast, generator, device)).view(n, 1, 1, 1)
    out = mean + con * (out - mean)
    out = out * (1 + _uniform(n, -brightness, brightness, generator, device).view(n, 1, 1, 1))
    g = torch.exp(_uniform(n, -gamma, gamma, generator, device)).view(n, 1, 1, 1)
    out = out.clamp(1e-4, 1) ** g
    mask = _chosen(n, probability, generator, device)
    return mask * out.clamp(0, 1) + (1 - mask) * x


def illumination(x, generator, tint=0.06, vignette=0.25, probability=1.0):
    """A lamp colour left after white balance, and a darkening towards one side or the rim."""
    import torch

    n, _, h, w = x.shape
    device = x.device
    gain = 1 + tint * (2 * torch.rand(n, 3, 1, 1, device=device, generator=generator) - 1)
    rows = torch.linspace(-1, 1, h, device=device).view(1, h, 1)
    cols = torch.linspace(-1, 1, w, device=device).view(1, 1, w)
    centre_r = _uniform(n, -1, 1, generator, device).view(n, 1, 1)
    centre_c = _uniform(n, -1, 1, generator, device).view(n, 1, 1)
    radius2 = ((rows - centre_r) ** 2 + (cols - centre_c) ** 2) / 8  # 0..1 over the crop
    strength = _uniform(n, 0, vignette, generator, device).view(n, 1, 1)
    falloff = (1 - strength * radius2).unsqueeze(1)
    out = (x * gain * falloff).clamp(0, 1)
    mask = _chosen(n, probability, generator, device)
    return mask * out + (1 - mask) * x


def greyscale(x, generator, probability=1.0):
    """The image's luma in all three channels: a cell whose class must be told by its shape
    and texture alone, as where another lab's stain gives it foreign hues."""
    import torch

    weights = torch.tensor(LUMA, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    out = (x * weights).sum(dim=1, keepdim=True).expand_as(x)
    mask = _chosen(x.shape[0], probability, generator, x.device)
    return mask * out + (1 - mask) * x


def blur(x, generator, sigma=1.2, probability=1.0):
    """Gaussian blur of width uniform in [0, ``sigma``] pixels (defocus, a softer lens)."""
    import torch
    from torch.nn import functional as F

    n, c, h, w = x.shape
    device = x.device
    sigmas = _uniform(n, 0.05, sigma, generator, device)
    radius = max(1, int(math.ceil(3 * sigma)))
    taps = torch.arange(-radius, radius + 1, device=device, dtype=torch.float32)
    kernel = torch.exp(-(taps[None] ** 2) / (2 * sigmas[:, None] ** 2))
    kernel = kernel / kernel.sum(dim=1, keepdim=True)  # (n, taps)
    # One depthwise convolution for the batch: images as channels, a kernel per image.
    k = kernel.repeat_interleave(c, dim=0)  # (n*c, taps)
    flat = x.reshape(1, n * c, h, w)
    flat = F.pad(flat, (radius, radius, radius, radius), mode="reflect")
    flat = F.conv2d(flat, k.view(n * c, 1, 1, -1), groups=n * c)
    flat = F.conv2d(flat, k.view(n * c, 1, -1, 1), groups=n * c)
    out = flat.view(n, c, h, w)
    mask = _chosen(n, probability, generator, device)
    return mask * out + (1 - mask) * x


def sensor_noise(x, generator, sigma=0.025, probability=1.0):
    """Shot noise (growing with brightness) and read noise, each up to ``sigma``."""
    import torch

    n, device = x.shape[0], x.device
    shot = _uniform(n, 0, sigma, generator, device).view(n, 1, 1, 1)
    read = _uniform(n, 0, sigma / 2, generator, device).view(n, 1, 1, 1)
    noise = torch.randn(x.shape, device=device, generator=generator)
    out = (x + noise * torch.sqrt(shot**2 * x.clamp(0, 1) + read**2)).clamp(0, 1)
    mask = _chosen(n, probability, generator, device)
    return mask * out + (1 - mask) * x


_LUMA_TABLE = [
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99,
]  # fmt: skip
_CHROMA_TABLE = [
    17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99,
    24, 26, 56, 99, 99, 99, 99, 99, 47, 66, 99, 99, 99, 99, 99, 99,
] + [99] * 32  # fmt: skip


def jpeg_artefacts(x, generator, quality=(30, 90), probability=1.0):
    """JPEG-like loss: 8 x 8 block DCT of YCbCr, quantised with the standard tables scaled to
    a random quality (rounding with a straight-through nothing: this is data, not a layer)."""
    import torch

    n, c, h, w = x.shape
    device = x.device
    if h % 8 or w % 8:
        return x
    q = _uniform(n, quality[0], quality[1], generator, device)
    factor = torch.where(q < 50, 5000 / q, 200 - 2 * q) / 100  # the libjpeg scaling
    tables = torch.tensor([_LUMA_TABLE, _CHROMA_TABLE, _CHROMA_TABLE], device=device).float()
    tables = (tables[None] * factor.view(n, 1, 1)).clamp(1, 255).view(n, 3, 1, 1, 8, 8)
    to_ycc = torch.tensor(
        [[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]],
        device=device,
    )
    ycc = torch.einsum("ij,njhw->nihw", to_ycc, x * 255) + torch.tensor(
        [-128.0, 0.0, 0.0], device=device
    ).view(1, 3, 1, 1)
    k = torch.arange(8, device=device, dtype=torch.float32)
    dct = torch.cos((2 * k[None] + 1) * k[:, None] * math.pi / 16) * torch.where(
        k[:, None] == 0, math.sqrt(1 / 8), math.sqrt(2 / 8)
    )
    blocks = ycc.view(n, 3, h // 8, 8, w // 8, 8).permute(0, 1, 2, 4, 3, 5)
    coefficients = dct @ blocks @ dct.T
    quantised = torch.round(coefficients / tables) * tables
    restored = (dct.T @ quantised @ dct).permute(0, 1, 2, 4, 3, 5).reshape(n, 3, h, w)
    restored = restored + torch.tensor([128.0, 0.0, 0.0], device=device).view(1, 3, 1, 1)
    out = (torch.einsum("ij,njhw->nihw", torch.linalg.inv(to_ycc), restored) / 255).clamp(0, 1)
    mask = _chosen(n, probability, generator, device)
    return mask * out + (1 - mask) * x


def lab_augment(x, generator, strengths=None):
    """Every lab augmentation in turn, each with its probability (:data:`LAB_AUGMENTATIONS`).

    ``strengths`` overrides entries of :data:`LAB_AUGMENTATIONS` (``{"blur": (0, {})}``
    turns blur off); the order is stain, illumination, colour, greyscale, blur, noise, JPEG, as
    light meets the slide, then the optics, then the camera.
    """
    settings = {**LAB_AUGMENTATIONS, **(strengths or {})}
    steps = (
        ("stain", stain_jitter),
        ("illumination", illumination),
        ("colour", colour_jitter),
        ("grey", greyscale),
        ("blur", blur),
        ("noise", sensor_noise),
        ("jpeg", jpeg_artefacts),
    )
    for name, function in steps:
        probability, parameters = settings[name]
        if probability > 0:
            x = function(x, generator, probability=probability, **parameters)
    return x
