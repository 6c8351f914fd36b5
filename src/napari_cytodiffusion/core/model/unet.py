"""A small class-conditional UNet for 64-px cell images.

Two choices keep it cheap enough for a CPU to classify cells with it:

* a space-to-depth stem: the 64-px image is folded into 2x2 patches, so the highest-resolution
  level works at 32 px;
* class information enters only the middle and the decoder. The encoder sees the noisy image
  and the timestep alone, so when every class is scored with the same noise and timestep
  (the CytoDiffusion pairing) the encoder runs once per trial, not once per class.

Class id ``num_classes`` is the null class used for classifier-free guidance.
"""

import math

import torch
from torch import nn
from torch.nn import functional as F


def timestep_embedding(t, dim):
    """Sinusoidal embedding of (possibly fractional) timesteps, shape (batch, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def _norm(channels):
    return nn.GroupNorm(min(32, channels // 4), channels)


class ResBlock(nn.Module):
    """Residual block whose normalisation is modulated (scale and shift) by the embedding."""

    def __init__(self, in_channels, out_channels, emb_dim, dropout=0.0):
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_channels)
        self.norm2 = _norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = (
            nn.Conv2d(in_channels, out_channels, 1)
            if in_channels != out_channels
            else nn.Identity()
        )

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head self-attention over the pixels of the coarsest level."""

    def __init__(self, channels, heads=4):
        super().__init__()
        self.heads = heads
        self.norm = _norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        out = F.scaled_dot_product_attention(
            q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2)
        )
        return x + self.out(out.transpose(-1, -2).reshape(b, c, h, w))


class CellUNet(nn.Module):
    """Class-conditional epsilon-predicting UNet.

    Parameters
    ----------
    num_classes : int
        Number of real classes; id ``num_classes`` is the null class.
    channels : tuple of int
        Channels per level; the first level works at half the image size.
    image_size : int
        Side of the (square) input images; must be divisible by ``2 ** len(channels)``.
    """

    def __init__(self, num_classes=8, channels=(64, 128, 192), image_size=64, dropout=0.0):
        super().__init__()
        self.config = {
            "num_classes": num_classes,
            "channels": list(channels),
            "image_size": image_size,
            "dropout": dropout,
        }
        self.num_classes = num_classes
        emb_dim = 4 * channels[0]
        self.time_mlp = nn.Sequential(
            nn.Linear(channels[0], emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        self.class_emb = nn.Embedding(num_classes + 1, emb_dim)
        self.stem = nn.Conv2d(12, channels[0], 3, padding=1)

        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        previous = channels[0]
        for level, width in enumerate(channels):
            self.down.append(ResBlock(previous, width, emb_dim, dropout))
            previous = width
            last = level == len(channels) - 1
            self.downsample.append(
                nn.Identity() if last else nn.Conv2d(width, width, 3, stride=2, padding=1)
            )
        self.mid1 = ResBlock(previous, previous, emb_dim, dropout)
        self.mid_attn = Attention(previous)
        self.mid2 = ResBlock(previous, previous, emb_dim, dropout)

        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for level, width in reversed(list(enumerate(channels))):
            self.up.append(ResBlock(previous + width, width, emb_dim, dropout))
            previous = width
            self.upsample.append(
                nn.Identity() if level == 0 else nn.Conv2d(width, channels[level - 1], 3, padding=1)
            )
            if level > 0:
                previous = channels[level - 1]
        self.out_norm = _norm(previous)
        self.out = nn.Conv2d(previous, 12, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def encode(self, x, t):
        """Class-free half of the network: returns what :meth:`decode` needs."""
        t_emb = self.time_mlp(timestep_embedding(t, self.config["channels"][0]))
        h = self.stem(F.pixel_unshuffle(x, 2))
        skips = []
        for block, down in zip(self.down, self.downsample, strict=True):
            h = block(h, t_emb)
            skips.append(h)
            h = down(h)
        return h, skips, t_emb

    def decode(self, encoded, y):
        """Class-conditional half: noise prediction for class ids ``y``."""
        h, skips, t_emb = encoded
        emb = t_emb + self.class_emb(y)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for block, up, skip in zip(self.up, self.upsample, reversed(skips), strict=True):
            h = block(torch.cat([h, skip], dim=1), emb)
            if not isinstance(up, nn.Identity):
                h = up(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return F.pixel_shuffle(self.out(F.silu(self.out_norm(h))), 2)

    def forward(self, x, t, y):
        """Predict the noise in ``x`` (batch, 3, H, W) at timesteps ``t`` for classes ``y``."""
        return self.decode(self.encode(x, t), y)


def select_encoded(encoded, rows):
    """The items ``rows`` (a LongTensor, repeats allowed) of an :meth:`CellUNet.encode` result."""
    h, skips, t_emb = encoded
    return h[rows], [s[rows] for s in skips], t_emb[rows]
