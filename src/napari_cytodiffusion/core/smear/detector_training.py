"""Training the white-cell detector (:mod:`~napari_cytodiffusion.core.smear.detector`).

    python -m napari_cytodiffusion.core.smear.detector_training DATA OUT.npz [--steps N]

The targets come from white-cell boxes: the ellipse inside each box is the cell's *body*, its
inner half (in radius) the *core*; a band around each edge is left out of the loss, since a
box only approximates the cell's outline. Training fields are the CBC training split (Pascal
VOC boxes, microscope camera) and the phone-camera training split of ``wbc_smartphone_pig``
(YOLO boxes), never a test split; the two bundled CBC sample fields are left out too, so they
stay unseen. Each crop is seen at the detector's scale (from the field's red-cell size) with
the variation of real smears added: scale (±25 %), stain (colour mixing, strength and
contrast in optical density), background tint, blur, noise and JPEG compression, rotations
and flips.
"""

import argparse
import io
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from napari_cytodiffusion.core.datasets import voc_boxes, yolo_boxes
from napari_cytodiffusion.core.io import read_image
from napari_cytodiffusion.core.smear.detector import (
    CHANNELS,
    DETECTOR_RBC,
    density_input,
    forward,
    layer_shapes,
    save_detector,
)
from napari_cytodiffusion.core.smear.resample import rescale, scaled_boxes
from napari_cytodiffusion.core.smear.scale import background_colour
from napari_cytodiffusion.core.smear.stain import optical_density

CROP = 80  # training crops, detector pixels (eight red cells)
# Where a cell's body and core targets end, in fractions of its box's half-size; between the
# pairs of values the loss is not counted.
BODY_EDGE = (0.85, 1.1)
CORE_EDGE = (0.35, 0.6)
# Fields' red-cell diameters in detector units: CBC from its annotated red-cell boxes, the
# phone set (no red-cell boxes) from its measured cells.
CBC_BOX_TO_DIAMETER = 0.88
PHONE_RBC_DIAMETER = 11.5
# Stain hue is turned by up to this angle (radians) about the grey axis of optical density:
# nuclei from blue-purple to maroon, as other stains show them.
HUE_TURN = 0.6
# The bundled sample fields (src/napari_cytodiffusion/sample_data) stay out of training.
HELD_OUT = ("BloodImage_00010", "BloodImage_00086")


@dataclass
class Field:
    """One annotated training field."""

    rgb: np.ndarray  # uint8 (rows, cols, 3)
    boxes: np.ndarray  # (n, 4) white-cell boxes [min_row, min_col, max_row, max_col]
    rbc_diameter: float
    background: np.ndarray


def cbc_fields(folder):
    """The fields of a CBC split folder (``images/``, ``annotations/``)."""
    fields = []
    for path in sorted((Path(folder) / "images").glob("*.jpg")):
        if path.stem in HELD_OUT:
            continue
        boxes = voc_boxes(Path(folder) / "annotations" / f"{path.stem}.xml")
        red = np.asarray(boxes.get("RBC", []), float).reshape(-1, 4)
        if not len(red):
            continue
        size = np.median(((red[:, 2] - red[:, 0]) + (red[:, 3] - red[:, 1])) / 2)
        fields.append(_field(path, boxes.get("WBC", []), CBC_BOX_TO_DIAMETER * size))
    return fields


def phone_fields(folder):
    """The fields of a ``wbc_smartphone_pig`` split folder (``images/``, ``labels/``)."""
    fields = []
    for path in sorted((Path(folder) / "images").glob("*.jpg")):
        rgb = read_image(path)[..., :3]
        boxes = yolo_boxes(Path(folder) / "labels" / f"{path.stem}.txt", rgb.shape)
        fields.append(_field(path, boxes, PHONE_RBC_DIAMETER, rgb))
    return fields


def _field(path, boxes, rbc_diameter, rgb=None):
    rgb = read_image(path)[..., :3] if rgb is None else rgb
    background = background_colour(rgb.astype(np.float32) / 255)
    return Field(rgb, np.asarray(boxes, float).reshape(-1, 4), float(rbc_diameter), background)


def make_crop(field, rng):
    """One augmented crop of ``field``: (rgb uint8, background float (3,), targets uint8).

    ``targets`` is (2, CROP, CROP): body and core, 1 inside, 0 outside, 255 not counted.
    """
    zoom = DETECTOR_RBC / field.rbc_diameter * np.exp(rng.uniform(np.log(0.8), np.log(1.25)))
    centre = _crop_centre(field, rng)
    side = int(np.ceil((CROP + 4) / zoom))
    r0, c0 = int(centre[0] - side / 2), int(centre[1] - side / 2)
    window = _padded_window(field.rgb, r0, c0, side, field.background)
    small = rescale(window, zoom)[:CROP, :CROP]
    boxes = scaled_boxes(field.boxes - [r0, c0, r0, c0], zoom)
    targets = box_targets(boxes, small.shape[:2], _cut_by_edge(field))
    rgb, background = augment(small / 255.0, field.background, rng)
    return _pad_to_crop(rgb, background, targets)


def _crop_centre(field, rng):
    rows, cols = field.rgb.shape[:2]
    if len(field.boxes) and rng.random() < 0.5:
        box = field.boxes[rng.integers(len(field.boxes))]
        reach = 0.6 * CROP / 2 * field.rbc_diameter / DETECTOR_RBC
        return (
            (box[0] + box[2]) / 2 + rng.uniform(-reach, reach),
            (box[1] + box[3]) / 2 + rng.uniform(-reach, reach),
        )
    return rng.uniform(0, rows), rng.uniform(0, cols)


def _padded_window(rgb, r0, c0, side, background):
    """``rgb[r0:r0+side, c0:c0+side]``, the parts outside the field filled with background."""
    out = np.empty((side, side, 3), np.float32)
    out[:] = np.asarray(background, np.float32) * 255
    rows, cols = rgb.shape[:2]
    src_r, src_c = slice(max(0, r0), min(rows, r0 + side)), slice(max(0, c0), min(cols, c0 + side))
    if src_r.stop > src_r.start and src_c.stop > src_c.start:
        out[src_r.start - r0 : src_r.stop - r0, src_c.start - c0 : src_c.stop - c0] = rgb[
            src_r, src_c
        ]
    return out


def _pad_to_crop(rgb, background, targets):
    out = np.empty((CROP, CROP, 3), np.uint8)
    out[:] = np.clip(background * 255, 0, 255).astype(np.uint8)
    out[: rgb.shape[0], : rgb.shape[1]] = rgb
    full = np.zeros((2, CROP, CROP), np.uint8)
    full[:, : targets.shape[1], : targets.shape[2]] = targets
    return out, background.astype(np.float32), full


def _cut_by_edge(field, margin=2):
    """Whether each box of ``field`` reaches the image edge (the cell goes on beyond it)."""
    rows, cols = field.rgb.shape[:2]
    boxes = field.boxes
    return (
        (boxes[:, 0] < margin)
        | (boxes[:, 1] < margin)
        | (boxes[:, 2] > rows - margin)
        | (boxes[:, 3] > cols - margin)
    )


def box_targets(boxes, shape, cut=None):
    """Body and core targets (2, rows, cols) of white cells given by their boxes.

    A box cut by the image edge holds only part of its cell, whose true outline is unknown:
    only the inner ellipse of such a box counts.
    """
    cut = np.zeros(len(boxes), bool) if cut is None else cut
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]] + 0.5
    targets = np.zeros((2,) + tuple(shape), np.uint8)
    unsure = np.zeros((2,) + tuple(shape), bool)
    for box, partial in zip(boxes, cut, strict=True):
        half_r, half_c = max((box[2] - box[0]) / 2, 0.5), max((box[3] - box[1]) / 2, 0.5)
        dr = np.abs(rows - (box[0] + box[2]) / 2) / half_r
        dc = np.abs(cols - (box[1] + box[3]) / 2) / half_c
        q = np.hypot(dr, dc)
        in_box = np.maximum(dr, dc) < 1
        for channel, (inner, outer) in enumerate((BODY_EDGE, CORE_EDGE)):
            targets[channel][q < inner] = 1
            unsure[channel] |= (q >= inner) & ((q < outer) | (partial & in_box))
    targets[unsure & (targets == 0)] = 255
    return targets


def augment(rgb, background, rng):
    """A smear's variation added to ``rgb`` (float in [0, 1]): returns (uint8 rgb, background).

    Stain: the optical density raised to a power (pale cytoplasm beside a dark nucleus, or
    the reverse), its hue turned and its channels scaled and mixed, as another stain or
    camera would, sometimes with less colour; a new background tint; then blur, noise and
    JPEG compression.
    """
    density = optical_density(rgb, background)
    density = density ** np.float32(np.exp(rng.uniform(np.log(0.75), np.log(1.6))))
    mixing = _hue_rotation(rng.uniform(-HUE_TURN, HUE_TURN)) * rng.uniform(0.7, 1.4, 3)
    mixing = mixing + rng.normal(0, 0.05, (3, 3))
    density = density @ (mixing * rng.uniform(0.55, 1.6)).astype(np.float32)
    if rng.random() < 0.25:  # less colour, the same density: shape must tell
        grey = density.mean(axis=-1, keepdims=True)
        density = grey + rng.uniform(0.2, 1.0) * (density - grey)
    tint = _background_tint(rng)
    out = tint * np.exp(-np.clip(density, 0, 6))
    if rng.random() < 0.5:
        out = ndi.gaussian_filter(out, (rng.uniform(0.3, 1.2),) * 2 + (0,))
    out = out + rng.normal(0, rng.uniform(0, 0.02), out.shape)
    out = np.clip(out * 255, 0, 255).astype(np.uint8)
    if rng.random() < 0.5:
        out = _jpeg(out, int(rng.integers(35, 95)))
    return out, tint


def _hue_rotation(angle):
    """A rotation of optical-density colour about the grey axis (hue turned by ``angle``
    radians, total density kept)."""
    axis = np.ones(3) / np.sqrt(3)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    turn = np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross
    return turn.T


def _background_tint(rng):
    """A slide's empty colour: near white, sometimes pink, blue or yellow (another lamp)."""
    tint = 0.93 + rng.uniform(-0.1, 0.05, 3)
    if rng.random() < 0.2:
        tint[2] -= rng.uniform(0.1, 0.35)  # yellow, as a halogen lamp without a blue filter
    return np.clip(tint, 0.4, 1.0).astype(np.float32)


def _jpeg(rgb, quality):
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as image:
        return np.asarray(image.convert("RGB"))


def make_pool(fields, count, rng):
    """``count`` crops of ``fields`` (chosen at random): (rgb, background, targets) arrays."""
    crops = [make_crop(fields[rng.integers(len(fields))], rng) for _ in range(count)]
    return tuple(np.stack(part) for part in zip(*crops, strict=True))


# ----------------------------------------------------------------------------- training


def build_network():
    """The trainable network: a convolution, batch norm and ReLU per layer of ``layer_shapes``."""
    import torch.nn as nn

    layers = nn.ModuleDict()
    for name, (cin, cout) in layer_shapes(CHANNELS).items():
        if name == "head":
            layers[name] = nn.Conv2d(cin, cout, 1)
        else:
            layers[name] = nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            )
    return layers


def folded_weights(layers):
    """``{name: (kernel, bias)}`` numpy arrays with each batch norm folded into its conv."""
    weights = {}
    for name, layer in layers.items():
        if name == "head":
            weights[name] = (layer.weight.detach().numpy(), layer.bias.detach().numpy())
            continue
        conv, norm = layer[0], layer[1]
        scale = (norm.weight / (norm.running_var + norm.eps).sqrt()).detach()
        kernel = conv.weight.detach() * scale[:, None, None, None]
        bias = norm.bias.detach() - norm.running_mean * scale
        weights[name] = (kernel.numpy(), bias.numpy())
    return weights


def _batch(pool, index, rng):
    import torch

    rgb, background, targets = (part[index] for part in pool)
    density = optical_density(rgb.astype(np.float32) / 255, background[:, None, None, :])
    x = np.ascontiguousarray(density_input(density).transpose(0, 3, 1, 2))
    y = targets
    turns = int(rng.integers(4))
    x, y = np.rot90(x, turns, axes=(2, 3)), np.rot90(y, turns, axes=(2, 3))
    if rng.random() < 0.5:
        x, y = x[..., ::-1], y[..., ::-1]
    return torch.from_numpy(x.copy()), torch.from_numpy(y.copy())


def _loss(logits, targets):
    import torch
    import torch.nn.functional as F

    counted = targets != 255
    weight = counted.float() * torch.tensor([2.0, 4.0]).view(1, 2, 1, 1).pow((targets == 1).float())
    loss = F.binary_cross_entropy_with_logits(
        logits, (targets == 1).float(), weight=weight, reduction="sum"
    )
    return loss / counted.sum().clamp(min=1)


def train(fields, steps, out, batch=24, pool_size=16000, seed=0, log=print):
    """Train the detector on ``fields`` and write its folded weights to ``out`` (.npz)."""
    import torch

    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    started = time.perf_counter()
    pool = _mixed_pool(fields, pool_size, rng)
    log(f"pool of {len(pool[0])} crops in {time.perf_counter() - started:.0f} s")
    layers = build_network()

    def conv(name, x):
        return layers[name](x)

    optimiser = torch.optim.AdamW(layers.parameters(), lr=3e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, 3e-3, total_steps=steps)
    running = None
    for step in range(1, steps + 1):
        x, y = _batch(pool, rng.integers(len(pool[0]), size=batch), rng)
        loss = _loss(forward(x, conv), y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 100 == 0 or step == steps:
            log(f"step {step} loss {running:.4f} ({time.perf_counter() - started:.0f} s)")
        if step % 1000 == 0 or step == steps:
            layers.eval()
            save_detector(out, folded_weights(layers), _metadata(fields, step, batch, seed))
            layers.train()
    return layers


def _mixed_pool(fields, pool_size, rng):
    """Crops from every source in equal shares, whatever its number of fields."""
    parts = [make_pool(group, pool_size // len(fields), rng) for group in fields.values()]
    return tuple(np.concatenate(arrays) for arrays in zip(*parts, strict=True))


def _metadata(fields, steps, batch, seed):
    return {
        "trained_on": {name: len(group) for name, group in fields.items()},
        "steps": steps,
        "batch": batch,
        "crop": CROP,
        "seed": seed,
        "detector_rbc": DETECTOR_RBC,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, help="the shared data folder")
    parser.add_argument("out", type=Path, help="the .npz file to write")
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--pool", type=int, default=16000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    fields = {
        "cbc/train": cbc_fields(args.data / "cbc" / "train"),
        "wbc_smartphone_pig/train": phone_fields(args.data / "wbc_smartphone_pig" / "train"),
    }
    train(fields, args.steps, args.out, pool_size=args.pool, seed=args.seed)


if __name__ == "__main__":
    main()
