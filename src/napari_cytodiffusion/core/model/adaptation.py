"""Adapting a trained model to a lab's stain and scanner from a few labelled cells.

Only a small part of the network learns: the class embeddings, the scale and shift of every
normalisation layer, and the layers that turn the class and timestep embedding into each
block's modulation (about a tenth of the weights). The convolutions, which hold what cells
look like, stay as they are, so a few dozen cells move the model towards the lab's colours
and rendering without it forgetting the morphology it learned from thousands. The objective
is the model's own denoising loss, conditioned on each cell's class, plus a small
discriminative term: a few cells a step are denoised under every class with the same noise,
and a cross-entropy over those errors (the classifier's own decision rule) teaches what
separates the lab's classes, not only what each looks like. The adapted model stays a
generative model, classifies by the same paired errors, and still generates cells.
"""

import time

import numpy as np

from napari_cytodiffusion.core.progress import report

ADAPT_STEPS = 300
# Cells a step, each denoised under its own class; the first PAIRED_CELLS of them are also
# denoised under every class. 24 with 8 costs about 6 % more than 32 with 6 did (2026-12-06).
ADAPT_BATCH = 24
ADAPT_LR = 1e-3
# The noise levels the classifier scores cells at (classifier.TIMESTEP_RANGE): adapting
# spends its few steps where the calls are made.
ADAPT_TIMESTEPS = (40, 900)
NULL_CLASS_RATE = 0.1  # keeps the unconditional (null) class, which guidance needs, adapted too
# The discriminative term: cells a step denoised under every class, the weight of its
# cross-entropy beside the denoising loss, and the logits' scale (errors relative to the
# cell's mean over classes differ by about 1 % between classes, so 100 makes that one unit).
PAIRED_CELLS, PAIRED_WEIGHT, PAIRED_SCALE = 8, 0.02, 100.0


def adaptable_parameters(unet):
    """The parameters adapting trains: class embeddings, normalisation, modulation layers."""
    import torch

    chosen = [unet.class_emb.weight]
    for module in unet.modules():
        if isinstance(module, torch.nn.GroupNorm):
            chosen += [module.weight, module.bias]
        emb = getattr(module, "emb", None)
        if isinstance(emb, torch.nn.Linear):
            chosen += list(emb.parameters())
    return chosen


def add_classes(model, names):
    """Give ``model`` new classes (for example blast) that start from the average class.

    The null class stays the last embedding row. Calibration is cleared: a model with new
    classes must be calibrated again. Returns ``model``.
    """
    import torch

    if not names:
        return model
    unet = model.unet
    old = unet.class_emb.weight.data
    k = model.num_classes
    start = old[:k].mean(dim=0, keepdim=True).repeat(len(names), 1)
    weights = torch.cat([old[:k], start, old[k:]])
    unet.class_emb = torch.nn.Embedding(weights.shape[0], weights.shape[1]).to(old.device)
    unet.class_emb.weight.data.copy_(weights)
    unet.num_classes = unet.config["num_classes"] = k + len(names)
    model.classes = tuple(model.classes) + tuple(names)
    model.calibration = {}
    return model


def adapt_weights(
    model,
    images,
    labels,
    steps=ADAPT_STEPS,
    batch_size=ADAPT_BATCH,
    lr=ADAPT_LR,
    seed=0,
    progress=None,
    on_loss=None,
):
    """Train the adaptable part of ``model`` on a lab's labelled crops, in place.

    The loss is the denoising loss of each cell under its class (the null class for a tenth
    of them), plus :func:`paired_loss` on the first ``PAIRED_CELLS`` cells of each batch.

    Parameters
    ----------
    model : DiffusionModel
    images : ndarray uint8 (n, s, s, 3)
        Packed crops (``datasets.PackedCells.images``), wider than the model's input so that
        rotated views stay inside them.
    labels : ndarray int (n,)
        Class ids in ``model.classes``.
    progress : callable, optional
        ``progress(step, steps)``; raising ``Cancelled`` stops (the model is left partly
        adapted: the caller discards it).
    on_loss : callable, optional
        ``on_loss(step, loss)`` after every step.

    Returns
    -------
    dict
        ``steps``, ``seconds`` and ``loss`` (the mean of the last 50 steps).
    """
    import torch

    from napari_cytodiffusion.core.model.diffusion import add_noise, autocast, to_model_range
    from napari_cytodiffusion.core.model.training import augment

    unet, device = model.unet, model.device
    generator = torch.Generator(device=device).manual_seed(int(seed))
    cells = torch.from_numpy(np.ascontiguousarray(images)).to(device)
    targets = torch.from_numpy(np.asarray(labels, np.int64)).to(device)
    # Square-root class balancing, as in training: rare classes are seen more often.
    counts = np.bincount(labels, minlength=model.num_classes).astype(float)
    weights = torch.tensor(1 / np.sqrt(counts[labels]), device=device)
    trainable = adaptable_parameters(unet)
    unet.requires_grad_(False)
    for parameter in trainable:
        parameter.requires_grad_(True)
    optimiser = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    losses, started = [], time.perf_counter()
    done = [0]  # the steps done, which a Cancel seen inside a step reports
    cancel_points = _CancelPoints(unet, lambda: report(progress, done[0], steps))
    unet.train()
    try:
        for step in range(1, steps + 1):
            pick = torch.multinomial(weights, batch_size, replacement=True, generator=generator)
            x0 = to_model_range(augment(cells[pick], model.image_size, generator))
            y = targets[pick].clone()
            null = torch.rand(batch_size, device=device, generator=generator) < NULL_CLASS_RATE
            y[null] = model.num_classes
            low, high = ADAPT_TIMESTEPS
            t = torch.randint(low, high, (batch_size,), device=device, generator=generator)
            noise = torch.randn(x0.shape, device=device, generator=generator)
            xt = add_noise(x0, t, noise, model.alpha_bars)
            for group in optimiser.param_groups:  # a short warm-up keeps early steps gentle
                group["lr"] = lr * min(1.0, step / 20)
            with autocast(device):
                loss = torch.nn.functional.mse_loss(unet(xt, t, y).float(), noise)
                paired = slice(0, PAIRED_CELLS)
                rule = paired_loss(
                    unet, xt[paired], t[paired], noise[paired], targets[pick][paired]
                )
                loss = loss + PAIRED_WEIGHT * rule
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            losses.append(loss.item())
            if on_loss is not None:
                on_loss(step, losses[-1])
            done[0] = step
            report(progress, step, steps)
    finally:
        cancel_points.remove()
        unet.eval().requires_grad_(False)
    return {
        "steps": steps,
        "seconds": time.perf_counter() - started,
        "loss": float(np.mean(losses[-50:])) if losses else None,
    }


class _CancelPoints:
    """Calls ``check()`` (which raises ``Cancelled`` after a Cancel) after every residual block
    of ``unet``, in the forward pass and again in the backward pass, until :meth:`remove`.

    A step's forward and backward passes each take about a second in float32 on a 2-core CPU
    without bfloat16 units (the paired term denoises 8 cells under every class), longer than
    a Cancel may wait; the hooks leave what is computed as it is."""

    def __init__(self, unet, check):
        import torch

        from napari_cytodiffusion.core.model.unet import ResBlock

        def after_block(module, inputs, output):
            check()
            if torch.is_grad_enabled() and output.requires_grad:
                output.register_hook(lambda grad: check())

        blocks = [module for module in unet.modules() if isinstance(module, ResBlock)]
        self._handles = [block.register_forward_hook(after_block) for block in blocks]

    def remove(self):
        for handle in self._handles:
            handle.remove()


def paired_loss(unet, xt, t, noise, labels):
    """Cross-entropy of the classifier's rule on noisy cells ``xt``: each is denoised under
    every class with its own noise and timestep (the encoder run once), and the class whose
    error is lowest, relative to the cell's mean over classes, should be its label."""
    import torch

    from napari_cytodiffusion.core.model.unet import select_encoded

    cells, classes = len(xt), unet.num_classes
    rows = torch.arange(cells, device=xt.device).repeat_interleave(classes)
    every_class = torch.arange(classes, device=xt.device).repeat(cells)
    predicted = unet.decode(select_encoded(unet.encode(xt, t), rows), every_class).float()
    errors = ((predicted - noise[rows]) ** 2).mean(dim=(1, 2, 3)).view(cells, classes)
    logits = -PAIRED_SCALE * errors / errors.mean(dim=1, keepdim=True).detach()
    return torch.nn.functional.cross_entropy(logits, labels)
