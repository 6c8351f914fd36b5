"""Training the class-conditional diffusion model on packed, normalised cells.

Runs on CPU or CUDA, in bfloat16 autocast where the hardware computes in it. On CUDA the
whole training set lives on the GPU as uint8 and is augmented there (rotation by any angle,
flips, mild zoom and shift, colour jitter for stain differences). With ``augmentation="lab"``
every batch is also shown as other labs would have stained, lit, focused, photographed and
compressed it (:mod:`~napari_cytodiffusion.core.model.augment`), and the scale varies by
+-20 %.
Unlabelled cells of a pack (label -1, white cells of other labs' smears) train the null class
only. Checkpoints hold only tensors and plain values, so they load with
``torch.load(weights_only=True)``; training resumes exactly from them.
"""

import json
import math
import time
from dataclasses import dataclass

import numpy as np

from napari_cytodiffusion.core.devices import resolve_device
from napari_cytodiffusion.core.model.checkpoint import MODEL_FORMAT
from napari_cytodiffusion.core.progress import Cancelled, report

DEFAULT_CHANNELS = (64, 128, 192)


AUGMENTATIONS = ("basic", "lab")
# Zoom range (log scale, +-) of each augmentation: the lab one covers scale errors of +-20 %.
ZOOM = {"basic": 0.12, "lab": math.log(1.2)}


def augment(batch, out_size, generator, colour_jitter=0.06, zoom=0.12, shift=0.06, lab=None):
    """Random morphology-preserving views of a uint8 batch (n, s, s, 3) -> float (n, 3, o, o).

    The output is the centre ``out_size`` of a randomly rotated, flipped, zoomed and shifted
    copy; the packed crops are wider than the output, so rotated corners stay in the image.
    ``lab``: apply :func:`~napari_cytodiffusion.core.model.augment.lab_augment` afterwards
    (``True`` for its default strengths, or a dict of overrides).
    """
    import torch
    from torch.nn import functional as F

    n, size = batch.shape[0], batch.shape[1]
    device = batch.device
    x = batch.permute(0, 3, 1, 2).float() / 255.0

    def uniform(low, high):
        return torch.rand(n, device=device, generator=generator) * (high - low) + low

    angle = uniform(0, 2 * math.pi)
    scale = torch.exp(uniform(-zoom, zoom)) * out_size / size
    flip = torch.where(torch.rand(n, device=device, generator=generator) < 0.5, -1.0, 1.0)
    cos, sin = angle.cos() * scale, angle.sin() * scale
    theta = torch.stack(
        [
            torch.stack([cos * flip, -sin, uniform(-shift, shift)], 1),
            torch.stack([sin * flip, cos, uniform(-shift, shift)], 1),
        ],
        1,
    )
    grid = F.affine_grid(theta, (n, 3, out_size, out_size), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    # Stain and lamp differences: per-channel gain, a little contrast and gamma.
    gain = 1 + colour_jitter * (2 * torch.rand(n, 3, 1, 1, device=device, generator=generator) - 1)
    gamma = torch.exp(uniform(-colour_jitter, colour_jitter)).view(n, 1, 1, 1)
    x = (x.clamp(1e-4, 1) ** gamma * gain).clamp(0, 1)
    if lab:
        from napari_cytodiffusion.core.model.augment import lab_augment

        x = lab_augment(x, generator, None if lab is True else lab)
    return x


def build_model(num_classes, channels=DEFAULT_CHANNELS, image_size=64):
    """A fresh CellUNet for ``num_classes`` real classes."""
    from napari_cytodiffusion.core.model.unet import CellUNet

    return CellUNet(num_classes=num_classes, channels=tuple(channels), image_size=image_size)


@dataclass
class _TrainingSet:
    """Packed crops on the training device, with the split indices and sampling weights."""

    images: object
    labels: object
    train_index: object
    val_index: np.ndarray
    weights: object
    classes: tuple
    augmentation: str = "basic"


def _training_set(data, image_size, device, leave_out=(), unlabelled_share=0.1):
    import torch

    from napari_cytodiffusion.core.datasets import load_pack

    pack = load_pack(data)
    if pack.image_size != image_size:
        raise ValueError(f"{data} was packed for {pack.image_size}-px models, not {image_size} px.")
    unknown = sorted(set(leave_out) - set(pack.classes))
    if unknown:
        raise ValueError(f"Cannot leave out {unknown}: the pack's classes are {pack.classes}.")
    left_out = [pack.classes.index(name) for name in leave_out]
    # A left-out class is absent from training altogether (its cells train no class, not
    # even the null class), as a kind of cell the model has never seen.
    train_index = np.flatnonzero((pack.splits == "train") & ~np.isin(pack.labels, left_out))
    labels = pack.labels[train_index]
    labelled = labels >= 0
    # Square-root class balancing: rare classes are seen more often without overfitting them.
    counts = np.bincount(labels[labelled], minlength=len(pack.classes)).astype(float)
    weights = np.zeros(len(train_index))
    weights[labelled] = 1 / np.sqrt(np.maximum(counts[labels[labelled]], 1))
    if (~labelled).any():
        # Unlabelled cells (null class only) make up ``unlabelled_share`` of the batches.
        total = weights[labelled].sum()
        weights[~labelled] = unlabelled_share / (1 - unlabelled_share) * total / (~labelled).sum()
    return _TrainingSet(
        images=torch.from_numpy(pack.images).to(device),
        labels=torch.from_numpy(pack.labels).to(device),
        train_index=torch.from_numpy(train_index).to(device),
        val_index=np.flatnonzero((pack.splits == "val") & (pack.labels >= 0)),
        weights=torch.tensor(weights, device=device),
        classes=pack.classes,
    )


class _Run:
    """The state of one training run: networks, optimiser, random stream, step and history."""

    def __init__(self, classes, channels, image_size, lr, seed, device):
        import torch

        self.classes = tuple(classes)
        self.device = device
        self.model = build_model(len(classes), channels, image_size).to(device)
        self.ema = build_model(len(classes), channels, image_size).to(device)
        self.ema.load_state_dict(self.model.state_dict())
        self.ema.requires_grad_(False)
        self.optimiser = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=0.01)
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.step = 0
        self.history = {"train_loss": [], "val_loss": []}

    def resume(self, state):
        """Continue from a training checkpoint's ``state`` (see :func:`starting_point`)."""
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimiser.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"].cpu())
        self.step = int(state["step"])
        self.history = json.loads(state["history"])

    def save(self, out):
        """Write a resumable checkpoint under a temporary name, then rename it into place."""
        import torch

        state = {
            "format": MODEL_FORMAT,
            "config": json.dumps(self.ema.config),
            "classes": list(self.classes),
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimiser.state_dict(),
            "generator": self.generator.get_state(),
            "step": self.step,
            "history": json.dumps(self.history),
        }
        from napari_cytodiffusion.core.io import atomic_write

        with atomic_write(out) as partial:
            torch.save(state, partial)

    def update_ema(self, decay):
        import torch

        with torch.no_grad():
            for p_ema, p in zip(self.ema.parameters(), self.model.parameters(), strict=True):
                p_ema.lerp_(p, 1 - decay)


def train(
    data,
    out,
    steps=20000,
    batch_size=128,
    lr=3e-4,
    device="auto",
    seed=0,
    resume=None,
    init=None,
    channels=DEFAULT_CHANNELS,
    image_size=64,
    ema_decay=0.9995,
    class_dropout=0.1,
    time_limit=None,
    checkpoint_every=1000,
    validate_every=1000,
    progress=None,
    on_loss=None,
    log=print,
    augmentation="basic",
    leave_out=(),
    unlabelled_share=0.1,
):
    """Train (or resume training) the diffusion model and write checkpoints to ``out``.

    Parameters
    ----------
    data : path
        A packed ``.npz`` from :func:`napari_cytodiffusion.core.datasets.pack_cells`; the
        model learns the pack's classes.
    out : path
        Checkpoint file to write (and overwrite) as training goes.
    steps : int
        Total optimiser steps (counting those of a resumed checkpoint).
    resume : path, optional
        Checkpoint to continue from; its classes, channels and image size must match.
    init : path, optional
        Model file whose weights start a new run (fine-tuning a lab's own stain or scanner);
        ignored when resuming. Its classes, channels and image size must match.
    time_limit : float, optional
        Seconds after which training saves and stops, to fit a job's wall-clock limit.
    progress : callable, optional
        ``progress(step, steps)`` every few steps; raising
        :class:`~napari_cytodiffusion.core.progress.Cancelled` from it stops training. On a
        cancel (or Ctrl-C) the checkpoint is saved first, so the run can be resumed, and the
        exception re-raised.
    on_loss : callable, optional
        ``on_loss(step, mean training loss)`` whenever the loss is read.
    log : callable
        Receives one line of text per validation, resume or stop.
    augmentation : {"basic", "lab"}
        ``basic``: geometry and mild colour jitter (how v1 was trained); ``lab``: also every
        difference between labs (:mod:`~napari_cytodiffusion.core.model.augment`) and scale
        within +-20 %.
    leave_out : sequence of str
        Classes whose cells are not trained on at all (leave-one-class-out runs that test
        whether the anomaly score finds a kind of cell the model never saw).
    unlabelled_share : float
        Share of each batch drawn from the pack's unlabelled cells (null class only), when
        it has any.

    Returns
    -------
    dict
        The final training state summary: step, losses, validation history.
    """
    import torch

    from napari_cytodiffusion.core.model.diffusion import cosine_alpha_bars

    started = time.time()
    device = resolve_device(device)
    torch.manual_seed(seed)
    if augmentation not in AUGMENTATIONS:
        raise ValueError(
            f"Unknown augmentation {augmentation!r}; use {' or '.join(AUGMENTATIONS)}."
        )
    cells = _training_set(data, image_size, device, tuple(leave_out), unlabelled_share)
    cells.augmentation = augmentation
    run = _Run(cells.classes, channels, image_size, lr, seed, device)
    if resume:
        start = starting_point(resume, resume=True)
        start.check(cells.classes, channels, image_size)
        run.resume(start.weights)
        del start  # its tensors are copied into the run: not held through training
        log(f"resumed from {resume} at step {run.step}")
    elif init:
        load_initial_weights(run.model, run.ema, init, cells.classes)
        log(f"starting from the weights of {init}")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        run.model = run.model.to(memory_format=torch.channels_last)
    alpha_bars = cosine_alpha_bars(device=device)
    running, seen_since = 0.0, 0
    run.model.train()
    try:
        while run.step < steps:
            loss = _training_step(run, cells, alpha_bars, steps, batch_size, lr, class_dropout)
            run.update_ema(min(ema_decay, (1 + run.step) / (10 + run.step)))
            run.step += 1
            # Reading the loss synchronises with the GPU, so only do it now and then.
            if run.step % 50 == 0 or device.type == "cpu":
                running += loss.item()
                seen_since += 1
                if on_loss is not None:
                    on_loss(run.step, running / seen_since)
                report(progress, run.step, steps)
            if run.step % validate_every == 0 or run.step == steps:
                run.history["train_loss"].append([run.step, running / max(seen_since, 1)])
                running, seen_since = 0.0, 0
                _validate(run, cells, image_size, started, log)
            if run.step % checkpoint_every == 0:
                run.save(out)
            if time_limit is not None and time.time() - started > time_limit:
                log(f"time limit reached at step {run.step}")
                break
    except (Cancelled, KeyboardInterrupt):
        run.save(out)
        log(f"stopped at step {run.step}; saved to {out}, continue with resume")
        raise
    run.save(out)
    return {"step": run.step, "history": run.history, "seconds": time.time() - started}


def _training_step(run, cells, alpha_bars, steps, batch_size, lr, class_dropout):
    """One optimiser step on a class-balanced, augmented batch; returns the loss tensor."""
    import torch

    from napari_cytodiffusion.core.model.diffusion import (
        NUM_TIMESTEPS,
        add_noise,
        autocast,
        to_model_range,
    )

    device, generator = run.device, run.generator
    picks = torch.multinomial(cells.weights, batch_size, replacement=True, generator=generator)
    index = cells.train_index[picks]
    image_size = run.model.config["image_size"]
    kind = getattr(cells, "augmentation", "basic")
    x0 = to_model_range(
        augment(cells.images[index], image_size, generator, zoom=ZOOM[kind], lab=kind == "lab")
    )
    y = cells.labels[index].clone()
    dropped = torch.rand(batch_size, device=device, generator=generator) < class_dropout
    # The null class, for classifier-free guidance; unlabelled cells are always null.
    y[dropped | (y < 0)] = len(run.classes)
    t = torch.randint(0, NUM_TIMESTEPS, (batch_size,), device=device, generator=generator)
    noise = torch.randn(x0.shape, device=device, generator=generator)
    xt = add_noise(x0, t, noise, alpha_bars)
    if device.type == "cuda":
        xt = xt.contiguous(memory_format=torch.channels_last)
    for group in run.optimiser.param_groups:
        group["lr"] = _learning_rate(run.step, steps, lr)
    with autocast(device):
        loss = torch.nn.functional.mse_loss(run.model(xt, t, y).float(), noise)
    run.optimiser.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(run.model.parameters(), 1.0)
    run.optimiser.step()
    return loss


def _learning_rate(step, steps, peak):
    """Linear warm-up, then cosine decay to a tenth of the peak rate at ``steps``."""
    warmup = min(1.0, (step + 1) / 500)
    decay_to = 0.1 + 0.45 * (1 + math.cos(math.pi * min(step / steps, 1.0)))
    return peak * warmup * decay_to


def _validate(run, cells, image_size, started, log):
    if not len(cells.val_index):
        return
    import torch

    index = torch.from_numpy(cells.val_index).to(run.device)
    val = validation_loss(run.ema, cells.images[index], cells.labels[index], image_size)
    run.history["val_loss"].append([run.step, val])
    log(
        f"step {run.step}: train loss {run.history['train_loss'][-1][1]:.4f}, "
        f"val loss {val:.4f}, {time.time() - started:.0f} s"
    )


def load_initial_weights(model, ema, path, classes):
    """Copy the weights of the model file at ``path`` into ``model`` and ``ema``."""
    start = starting_point(path)
    start.check(classes, model.config["channels"], model.config["image_size"])
    model.load_state_dict(start.weights)
    ema.load_state_dict(start.weights)


# What a training checkpoint holds beyond a model file's weights: what resuming exactly needs.
RESUMABLE = ("model", "ema", "optimizer", "generator", "step")


@dataclass
class StartingPoint:
    """The model file a run starts from (``init``) or the checkpoint it continues (``resume``).

    Read once by :func:`starting_point`, so that a task can check a run against it before any
    cell is normalised, and training loads what was checked.
    """

    path: object
    classes: tuple
    channels: tuple
    image_size: int
    step: int
    weights: dict  # resume: the whole checkpoint; otherwise the network's state dict
    resume: bool = False

    def check(self, classes, channels, image_size):
        """Refuse a run of other classes, channels or image size: the weights would not fit."""
        channels, classes = tuple(int(c) for c in channels), tuple(classes)
        if (self.classes, self.channels, self.image_size) == (classes, channels, image_size):
            return
        action = "resume" if self.resume else "start from"
        raise ValueError(
            f"{self.path} holds a model with channels {_listed(self.channels)}, image size "
            f"{self.image_size} and classes {', '.join(self.classes)}; to {action} it, train "
            f"with the same channels and resolution (--channels {_listed(self.channels)} "
            f"--resolution {self.image_size}) on cells of its classes (this run: channels "
            f"{_listed(channels)}, {image_size} px, classes {', '.join(classes)})."
        )


def _listed(channels):
    return ",".join(str(c) for c in channels)


def starting_point(path, resume=False):
    """Read the :class:`StartingPoint` at ``path``: any model file (or checkpoint) whose
    weights start a run, or, with ``resume``, a training checkpoint to continue.

    Raises
    ------
    ModelFileError
        If ``path`` is no model file, or (``resume``) a model file without the optimiser state
        and step that resuming needs.
    """
    from napari_cytodiffusion.core.model.checkpoint import (
        ModelFileError,
        load_model_file,
        read_state,
    )

    if not resume:
        model = load_model_file(path, "cpu")
        channels = tuple(int(c) for c in model.unet.config["channels"])
        return StartingPoint(
            path, tuple(model.classes), channels, model.image_size, 0, model.unet.state_dict()
        )
    state = read_state(path)
    if not isinstance(state, dict) or not all(key in state for key in RESUMABLE):
        raise ModelFileError(
            f"{path} is a model file, not a training checkpoint to resume: write another "
            f"output file (with --init {path} to start from its weights)."
        )
    try:
        config = json.loads(state["config"])
        channels = tuple(int(c) for c in config["channels"])
        classes, size = tuple(str(c) for c in state["classes"]), int(config["image_size"])
    except (KeyError, TypeError, ValueError) as error:
        raise ModelFileError(
            f"{path} is an incomplete training checkpoint (missing or bad {error}); train "
            "into another output file."
        ) from error
    return StartingPoint(path, classes, channels, size, int(state["step"]), state, resume=True)


def validation_loss(model, images, labels, image_size, max_images=512, seed=1234):
    """Mean denoising loss on (up to ``max_images``) validation crops with fixed noise."""
    import torch

    from napari_cytodiffusion.core.model.diffusion import (
        NUM_TIMESTEPS,
        add_noise,
        autocast,
        cosine_alpha_bars,
        to_model_range,
    )

    device = images.device
    generator = torch.Generator(device=device).manual_seed(seed)
    images, labels = images[:max_images], labels[:max_images]
    offset = (images.shape[1] - image_size) // 2
    x0 = to_model_range(
        images[:, offset : offset + image_size, offset : offset + image_size].permute(0, 3, 1, 2)
    )
    alpha_bars = cosine_alpha_bars(device=device)
    t = torch.randint(0, NUM_TIMESTEPS, (len(x0),), device=device, generator=generator)
    noise = torch.randn(x0.shape, device=device, generator=generator)
    was_training = model.training
    model.eval()
    losses = []
    with torch.no_grad():
        for start in range(0, len(x0), 128):
            part = slice(start, start + 128)
            with autocast(device):
                pred = model(
                    add_noise(x0[part], t[part], noise[part], alpha_bars), t[part], labels[part]
                )
            losses.append(((pred.float() - noise[part]) ** 2).mean(dim=(1, 2, 3)))
    model.train(was_training)
    return float(torch.cat(losses).mean())


def export_model(checkpoint, out_path, metadata=None, calibration=None):
    """Write the EMA weights of a training checkpoint as a small float16 model file."""
    import torch

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model_file = {
        "format": MODEL_FORMAT,
        "version": 1,
        "config": state["config"],
        "classes": list(state["classes"]),
        "state_dict": {
            k: v.half() if v.is_floating_point() else v for k, v in state["ema"].items()
        },
        "step": int(state["step"]),
        "history": state["history"],
        "metadata": json.dumps(metadata or {}),
        "calibration": json.dumps(calibration or {}),
    }
    torch.save(model_file, out_path)
