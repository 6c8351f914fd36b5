"""Solving the model's probability-flow ODE: sampling, partial denoising and inversion.

Two solvers are offered: DPM-Solver++(2M), a second-order multistep solver that reaches
DDIM-quality cells in about half the steps, and plain DDIM. Classifier-free guidance runs the
encoder once per step and decodes class and null class from it (see ``batches``).
"""

from napari_cytodiffusion.core.progress import report

SAMPLERS = ("dpm++2m", "ddim")
DEFAULT_SAMPLER = "dpm++2m"
DEFAULT_STEPS = 15
DEFAULT_GUIDANCE = 2.0


def guided_noise(unet, x, t, class_ids, guidance, reference_ids=None):
    """Classifier-free guided noise prediction at one timestep ``t`` (a 0-d LongTensor).

    Guidance extrapolates from the prediction under ``reference_ids`` (default: the null
    class) towards the one under ``class_ids``. With the cell's own class as reference, an
    edit towards that same class is its plain prediction, whatever the guidance.
    """
    import torch

    from napari_cytodiffusion.core.model.batches import paired_predictions

    n = x.shape[0]
    t_batch = t.reshape(1).expand(n)
    if guidance == 1.0:
        return unet(x, t_batch, class_ids).float()
    if reference_ids is None:
        reference_ids = torch.full_like(class_ids, unet.num_classes)
    both = paired_predictions(unet, x, t_batch, torch.stack([class_ids, reference_ids], 1))
    eps_class, eps_reference = both.unbind(1)
    return eps_reference + guidance * (eps_class - eps_reference)


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
    reference_ids=None,
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
    reference_ids : LongTensor (n,), optional
        What guidance extrapolates from (see :func:`guided_noise`); the null class if None.

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
            eps = guided_noise(unet, x, times[i], class_ids, guidance, reference_ids)
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


def invert(unet, x0, class_ids, alpha_bars, t_end, steps, progress=None, refinements=1):
    """Run deterministic DDIM backwards: clean images ``x0`` to their noisy latents at ``t_end``.

    The mirror of :func:`denoise` with ``sampler="ddim"`` over the same timesteps: denoising
    the result under the same class gives ``x0`` back; under another class it gives the same
    cell edited towards that class. Plain inversion predicts each step's noise at its start,
    while denoising predicts it at the other end; ``refinements`` fixed-point iterations per
    step re-predict it there, which brings the round trip's error from about 4/255 to under
    1/255 (one iteration) at one more network call per step each.

    ``progress`` is called with (done, total) network calls.
    """
    import torch

    times = sampling_times(alpha_bars, int(t_end), steps).flip(0).to(x0.device)
    steps = len(times) - 1
    alphas = alpha_bars.to(x0.device)[times].double()
    alphas[0] = 1.0  # x0 is clean, as denoise's last step assumes
    calls = steps * (1 + refinements)
    x = x0.double()
    with torch.no_grad():
        for i in range(steps):
            a, a_next = alphas[i], alphas[i + 1]
            clean_x, at = x, times[i]
            for k in range(1 + refinements):
                eps = guided_noise(unet, clean_x.float(), at, class_ids, 1.0).double()
                next_x = a_next.sqrt() * (x - (1 - a).sqrt() * eps) / a.sqrt()
                next_x = next_x + (1 - a_next).sqrt() * eps
                clean_x, at = next_x, times[i + 1]
                report(progress, i * (1 + refinements) + k + 1, calls)
            x = next_x
    return x.float()


def cell_noise(seeds, size, device="cpu"):
    """Starting noise for each cell, drawn on the CPU from its own seed (same on every device)."""
    import torch

    noise = []
    for seed in seeds:
        generator = torch.Generator().manual_seed(int(seed))
        noise.append(torch.randn((3, size, size), generator=generator))
    return torch.stack(noise).to(device)
