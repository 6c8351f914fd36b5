"""Diffusion classification: a cell belongs to the class whose denoiser explains it best.

For every candidate class the model predicts the noise added to the cell, with the *same*
noise and timestep for all classes (the CytoDiffusion pairing), so the class scores differ
only by what the class conditioning contributes. Evaluation is adaptive (after Li et al.'s
Diffusion Classifier): one trial for every class, then a paired test after each further trial
drops the classes that are clearly worse than the best, and only the survivors get more
trials; a cell stops when one class is left or its budget is spent. The ``exhaustive``
strategy spends the whole budget on every class and is the reference the adaptive one is
measured against.

Errors at different noise levels have different spreads, so each trial's errors are divided
by the spread of paired class differences at its timestep (fitted on the validation split)
before they are summed. The summed differences are the evidence against each class; a
temperature fitted on the validation split turns them into calibrated probabilities.

Alongside the classes, the null (unconditional) class is scored on the same noisy inputs.
How much better the best class explains a cell than the null class does is the anomaly
score's evidence: an image that is cheap to denoise (smooth, blurred, low in contrast) is
cheap for both, so its own denoising cost cancels, and what is left is how much knowing the
class helps. A cell of a kind the model never saw gains little from any class.

A soft (defocused) cell lacks the fine detail of the training cells, so the denoisers of smooth
classes win its fine band whatever it shows. A model calibrated for soft cells
(``calibration["soft"]``) scores the cells softer than its training cells (softness above 1,
see :mod:`~napari_cytodiffusion.core.model.domain`) on the error's low band instead: the paired
error is blurred by a Gaussian before its mean square, leaving only the detail a soft cell
still has, with spreads, class biases, temperature and anomaly reference fitted on blurred
validation cells scored the same way (the review thresholds are the main ones).

Four reasons to review a call are kept apart (:data:`REASONS`): the classes are close
(*uncertain*), the cell is unlike every class (*unlike any known class*: anomaly score), the
cell or its smear is unlike the training smears (*unlike the training smears*: the
domain-shift score of :mod:`~napari_cytodiffusion.core.model.domain`), and the cell's
chromatin is larger than any of its class's (*too large for its class*:
:mod:`~napari_cytodiffusion.core.model.cell_size`).
"""

import copy
import time
from dataclasses import dataclass

import numpy as np

from napari_cytodiffusion.core.progress import forward_only, phases, report

MAX_TRIALS = 64
DEFAULT_BUDGET = 64  # trials per class at most
# Trials done before each paired test: few tests early, when most classes drop out, and
# geometric steps later, so a GPU gets large batches and few synchronisations.
STAGE_ENDS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
PRUNE_Z = 1.5  # classes this many standard errors worse than the best are dropped (tuned on val)
TIMESTEP_RANGE = (40, 900)  # small t is all texture, t near T is all noise
CPU_BATCH = 16  # noise predictions per network call on a CPU
# The best class and the null class are compared on at least this many trials (a cell that
# is decided after fewer trials gets a few more, for those two classes only).
ANOMALY_TRIALS = 6
# Why a call needs review; the same words in the tables, the CSV and the viewer.
UNCERTAIN = "uncertain"
UNKNOWN_KIND = "unlike any known class"
UNFAMILIAR_SMEAR = "unlike the training smears"
TOO_LARGE = "too large for its class"
REASONS = (UNCERTAIN, UNKNOWN_KIND, UNFAMILIAR_SMEAR, TOO_LARGE)
# Cells softer than this (in units of the sharpness review threshold) are scored on the low
# band where the model has a calibration for it.
SOFT_SCORING = 1.0


def trial_timesteps(count=MAX_TRIALS):
    """Timesteps of the trials in the order they are spent.

    A van der Corput sequence over ``TIMESTEP_RANGE``: every prefix of trials covers the
    informative noise levels evenly, so stopping early never leaves a level unexplored.
    """
    low, high = TIMESTEP_RANGE
    out = []
    for k in range(1, count + 1):
        fraction, denominator, n = 0.0, 1.0, k
        while n:
            denominator *= 2
            n, bit = divmod(n, 2)
            fraction += bit / denominator
        out.append(int(round(low + (high - low) * fraction)))
    return np.array(out)


@dataclass
class CellCall:
    """The classification of one cell.

    Attributes
    ----------
    label : str
        The class whose denoiser explains the cell best.
    probabilities : dict
        Calibrated probability per class.
    uncertainty : float
        Normalised entropy of ``probabilities``: 0 when sure, 1 when every class is equally
        likely.
    anomaly_score : float
        How much worse the best class explains this cell than typical validation cells of that
        class, in standard deviations; high for cells unlike anything the model was trained on.
    needs_review : bool
        Uncertainty, anomaly score or domain shift past its review threshold.
    unet_evals : int
        Noise predictions spent on the cell (the null class's included).
    domain_shift : float
        How far the cell and its smear are from the training smears, in units of the
        review threshold (above 1: flagged); NaN where the model has no reference.
    softness : float
        How much softer the crop is than the training cells, in the same units (above 1: the
        domain shift is at least partly defocus, and a model calibrated for soft cells scored
        this one on the error's low band); NaN where the model has no reference.
    size_ratio : float
        The cell's chromatin area over the largest its called class has in training (above
        1: too large for its class); NaN where the model or the class has no bound.
    why : str
        The reasons the call needs review (:data:`REASONS`, "; "-separated), "" when none.
    """

    label: str
    probabilities: dict
    uncertainty: float
    anomaly_score: float
    needs_review: bool
    unet_evals: int
    seconds: float = 0.0
    domain_shift: float = float("nan")
    why: str = ""
    softness: float = float("nan")
    size_ratio: float = float("nan")

    def as_dict(self):
        return {
            "label": self.label,
            "probabilities": self.probabilities,
            "uncertainty": self.uncertainty,
            "anomaly_score": self.anomaly_score,
            "domain_shift": None if np.isnan(self.domain_shift) else self.domain_shift,
            "softness": None if np.isnan(self.softness) else self.softness,
            "size_ratio": None if np.isnan(self.size_ratio) else self.size_ratio,
            "needs_review": self.needs_review,
            "why": self.why,
            "unet_evals": self.unet_evals,
            "seconds": self.seconds,
        }


def classify_crops(
    model,
    crops,
    strategy="adaptive",
    seed=0,
    budget=DEFAULT_BUDGET,
    batch_size=None,
    uncertainty_threshold=None,
    anomaly_threshold=None,
    progress=None,
    colour_statistics=None,
    domain_threshold=None,
):
    """Classify normalised cell crops with the diffusion model.

    Parameters
    ----------
    model : DiffusionModel
    crops : ndarray (n, size, size, 3)
        Float RGB crops in [0, 1] made by :func:`~napari_cytodiffusion.core.smear.crops.crop_cell`.
    strategy : {"adaptive", "exhaustive"}
    seed : int
        Seeds the shared noise; the same seed gives the same calls.
    budget : int
        Most trials per class (at most ``MAX_TRIALS``).
    batch_size : int, optional
        Noise predictions per network call; by default 16 on a CPU, 4096 on a GPU.
    uncertainty_threshold, anomaly_threshold, domain_threshold : float, optional
        Review thresholds; the model's calibrated values when not given (the domain-shift
        score is in units of its calibrated threshold, so 1 is the calibrated value).
    progress : callable, optional
        ``progress(done, total)``; raise ``Cancelled`` from it to stop.
    colour_statistics : ndarray (n, 9), optional
        The colour references of each crop's smear
        (:meth:`~napari_cytodiffusion.core.smear.normalise.ColourMap.statistics`), for the
        smear part of the domain-shift score; only the cells' own features are used when
        not given.

    Returns
    -------
    list of CellCall
    """
    from napari_cytodiffusion.core.model.cell_size import central_chromatin_area
    from napari_cytodiffusion.core.model.domain import domain_scores

    started = time.perf_counter()
    crops = np.asarray(crops)
    shift, softness = domain_scores(model, crops, colour_statistics)
    area = central_chromatin_area(crops)
    calls = [None] * len(crops)
    groups = _scoring_groups(model, softness)
    shares = phases(progress, [len(cells) for _, cells in groups])
    for (scorer, cells), share in zip(groups, shares, strict=True):
        errors, spent = class_errors(
            scorer,
            crops[cells],
            strategy,
            seed,
            budget,
            batch_size,
            share,
            null=uses_null_class(scorer),
        )
        scored = calls_from_errors(
            scorer,
            errors,
            spent,
            uncertainty_threshold,
            anomaly_threshold,
            domain_shift=shift[cells],
            domain_threshold=domain_threshold,
            chromatin_area=area[cells],
        )
        for i, call in zip(cells, scored, strict=True):
            calls[i] = call
    report(progress, 1, 1)
    seconds = (time.perf_counter() - started) / max(len(calls), 1)
    for call, soft in zip(calls, softness, strict=True):
        call.seconds, call.softness = seconds, float(soft)
    return calls


def _scoring_groups(model, softness):
    """[(model as it scores them, cell indices)]: soft cells apart where the model has a
    calibration for them; groups without cells left out."""
    soft_model = soft_scoring_model(model)
    soft = np.zeros(len(softness), bool)
    if soft_model is not None:
        soft = np.nan_to_num(np.asarray(softness, np.float64), nan=0.0) > SOFT_SCORING
    groups = [(model, np.flatnonzero(~soft)), (soft_model, np.flatnonzero(soft))]
    return [(scorer, cells) for scorer, cells in groups if len(cells)]


def soft_scoring_model(model):
    """The model as it scores soft cells (its calibration for errors in the low band in place
    of the main one), or None when it has no such calibration."""
    soft = (model.calibration or {}).get("soft")
    if not soft:
        return None
    view = copy.copy(model)
    view.calibration = {**{k: v for k, v in model.calibration.items() if k != "soft"}, **soft}
    return view


def error_band(model):
    """Sigma (model pixels) of the Gaussian the paired error is blurred by before its mean
    square; 0: the whole band."""
    return float((model.calibration or {}).get("error_band", 0.0))


def uses_null_class(model):
    """Whether the model's anomaly score needs the null class scored alongside the classes."""
    method = ((model.calibration or {}).get("anomaly") or {}).get("method")
    return method in ("null_gain", "profile")


def class_errors(
    model,
    crops,
    strategy="adaptive",
    seed=0,
    budget=DEFAULT_BUDGET,
    batch_size=None,
    progress=None,
    classes=None,
    null=False,
):
    """Paired denoising errors per cell, trial and class.

    Parameters
    ----------
    classes : sequence of int, optional
        Class ids to evaluate (default: all real classes; the null class id may be included).
    null : bool
        Also score the null class, as an extra last column, on every trial a cell is scored
        on; an adaptive run then scores the best class and the null class on at least
        :data:`ANOMALY_TRIALS` trials (for the anomaly score) without changing the call.

    Returns
    -------
    errors : ndarray (n, budget, k) or (n, budget, k + 1) with ``null``
        Mean squared noise-prediction error; NaN where a (trial, class) was not evaluated.
    spent : ndarray (n,)
        Noise predictions spent per cell.
    """
    import torch

    from napari_cytodiffusion.core.model.batches import crops_to_tensor

    if strategy not in ("adaptive", "exhaustive"):
        raise ValueError(f"Unknown strategy {strategy!r}; use 'adaptive' or 'exhaustive'.")
    x0 = crops_to_tensor(crops, model)
    budget = int(min(max(budget, 1), MAX_TRIALS))
    class_ids = np.arange(model.num_classes) if classes is None else np.asarray(classes)
    real = len(class_ids)
    if null:
        class_ids = np.append(class_ids, model.num_classes)
    # On a CPU, small calls keep progress (and so Cancel) coming: on one thread of a 2-core
    # machine a call of 16 takes 0.24 s against 1.3 s for 64, and is not slower overall (an
    # exhaustive cell in 7.8 s against 10.5 s).
    batch_size = batch_size or (4096 if model.device.type == "cuda" else CPU_BATCH)
    n, k = len(x0), len(class_ids)
    generator = torch.Generator().manual_seed(int(seed))
    size = model.image_size
    noise = torch.randn((budget, 3, size, size), generator=generator).to(model.device)
    timesteps = trial_timesteps(budget)
    errors = np.full((n, budget, k), np.nan, np.float32)
    exhaustive = strategy == "exhaustive"
    progress = forward_only(progress)  # the total grows as stages are added
    done = [0]

    def run(jobs, final):
        # The total grows as stages are added; it is exact once the last stage has started.
        total = done[0] + len(jobs) + (0 if final else n)
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start : start + batch_size]
            errors[chunk[:, 0], chunk[:, 1], chunk[:, 2]] = _evaluate(
                model, x0, noise, timesteps, chunk, class_ids
            )
            done[0] += len(chunk)
            report(progress, done[0], total)

    spent = _schedule(model, errors, real, exhaustive, null, run)
    report(progress, 1, 1)
    return errors, spent


def _schedule(model, errors, real, exhaustive, null, run):
    """The adaptive (or exhaustive) schedule of (cell, trial, class) jobs over ``errors``.

    ``run(jobs, final)`` fills ``errors`` at the jobs (a live run evaluates the network; a
    replay copies them from an exhaustive run). Returns the evaluations spent per cell.
    """
    n, budget, k = errors.shape
    alive = np.ones((n, real), bool)
    spent = np.zeros(n, np.int64)
    trials = np.zeros(n, np.int64)
    stages = (budget,) if exhaustive else _stage_ends(budget)
    extra = null and not exhaustive and budget > 1
    trial = 0
    for stop in stages:
        cells = np.arange(n) if trial == 0 else np.flatnonzero(alive.sum(axis=1) > 1)
        if len(cells) == 0:
            break
        columns = np.concatenate([alive, np.ones((n, k - real), bool)], axis=1)
        jobs = np.array(
            [
                (i, j, c)
                for i in cells
                for j in range(trial, stop)
                for c in np.flatnonzero(columns[i])
            ]
        )
        run(jobs, stop == stages[-1] and not extra)
        np.add.at(spent, jobs[:, 0], 1)
        trials[cells] = stop
        trial = stop
        if not exhaustive:
            alive = prune(model, errors[:, :trial, :real], alive)
    if extra:
        # A cell decided early: its best class and the null class on a few more trials.
        short = np.flatnonzero(trials < min(ANOMALY_TRIALS, budget))
        if len(short):
            _, best = evidence(model, errors[short, :, :real])
            jobs = np.array(
                [
                    (i, j, c)
                    for i, b in zip(short, best, strict=True)
                    for j in range(trials[i], min(ANOMALY_TRIALS, budget))
                    for c in (b, k - 1)
                ]
            )
            run(jobs, True)
            np.add.at(spent, jobs[:, 0], 1)
    return spent


def _stage_ends(budget):
    return tuple(end for end in STAGE_ENDS if end < budget) + (budget,)


def replay_adaptive(model, errors, null=None):
    """The adaptive strategy's choices, replayed on errors of an exhaustive run.

    Gives exactly the errors an adaptive run with the same seed would have computed (the
    shared noise makes each (cell, trial, class) error independent of the others), which lets
    the calibration be fitted without running the network again. ``null``: whether the last
    column is the null class (by default, when there is one column more than the model's
    classes).
    """
    n, budget, k = errors.shape
    if null is None:
        null = k == model.num_classes + 1
    out = np.full_like(errors, np.nan)

    def run(jobs, final):
        out[jobs[:, 0], jobs[:, 1], jobs[:, 2]] = errors[jobs[:, 0], jobs[:, 1], jobs[:, 2]]

    spent = _schedule(model, out, k - int(bool(null)), False, bool(null), run)
    return out, spent


def _evaluate(model, x0, noise, timesteps, jobs, class_ids):
    """Errors of (cell, trial, class) jobs; the encoder runs once per (cell, trial)."""
    import torch

    from napari_cytodiffusion.core.model.batches import class_predictions
    from napari_cytodiffusion.core.model.diffusion import add_noise, autocast

    pairs, rows = np.unique(jobs[:, :2], axis=0, return_inverse=True)
    device = model.device
    cells = torch.from_numpy(pairs[:, 0]).to(device)
    trials = torch.from_numpy(pairs[:, 1]).to(device)
    t = torch.from_numpy(timesteps).to(device)[trials]
    eps = noise[trials]
    rows = torch.from_numpy(rows.reshape(-1)).to(device)
    labels = torch.from_numpy(class_ids[jobs[:, 2]]).to(device)
    with torch.inference_mode():
        with autocast(device):
            x = _orient(x0[cells], pairs[:, 1])
            noisy = add_noise(x, t, eps, model.alpha_bars)
            predicted = class_predictions(model.unet, noisy, t, rows, labels)
        difference = predicted.float() - eps[rows].float()
        sigma = error_band(model)
        if sigma > 0:
            difference = _low_band(difference, sigma)
        error = (difference**2).mean(dim=(1, 2, 3))
    return error.cpu().numpy()


def _low_band(images, sigma):
    """``images`` (n, c, h, w) blurred by a Gaussian of ``sigma`` pixels (reflected edges)."""
    import torch
    import torch.nn.functional as F

    radius = int(np.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    channels = images.shape[1]
    rows = kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1)
    cols = kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1)
    padded = F.pad(images, (radius, radius, radius, radius), mode="reflect")
    return F.conv2d(F.conv2d(padded, rows, groups=channels), cols, groups=channels)


def _orient(x, trials):
    """Show each trial the cell in one of its 8 rotations and reflections.

    A cell has no up or down, and the model was trained on every orientation; varying it
    across trials makes their errors less correlated, so each trial adds more evidence.
    """
    import torch

    out = torch.empty_like(x)
    views = trials % 8
    for view in np.unique(views):
        index = torch.from_numpy(np.flatnonzero(views == view)).to(x.device)
        oriented = torch.rot90(x[index], int(view % 4), dims=(2, 3))
        out[index] = oriented.flip(3) if view >= 4 else oriented
    return out


def normalised_scores(model, errors):
    """Errors in units of the per-timestep spread, minus each class's calibrated bias.

    Some class-conditional denoisers are simply better than others on every cell (the
    platelet one mostly sees background); the bias, fitted on the validation split, removes
    that head start so that only the fit to this cell counts.
    """
    calibration = model.calibration or {}
    scale = timestep_scale(model, trial_timesteps(errors.shape[1]))
    scores = errors / scale[None, :, None]
    bias = calibration.get("class_bias")
    if bias is not None and len(bias) == errors.shape[2]:
        scores = scores - np.asarray(bias, np.float32)[None, None, :]
    return scores


def prune(model, errors, alive):
    """Drop classes significantly worse than each cell's best over the shared trials.

    After normalisation a paired difference has about unit spread per trial, so the sum over
    ``t`` trials has ``sqrt(t)``; classes more than ``PRUNE_Z`` of those behind are dropped.
    """
    scores = normalised_scores(model, errors)
    trials = errors.shape[1]
    totals = np.where(alive, np.nansum(scores, axis=1), np.inf)
    best = totals.min(axis=1, keepdims=True)
    z = (totals - best) / np.sqrt(trials)
    return alive & (z <= PRUNE_Z)


def timestep_scale(model, timesteps):
    """Spread of paired class differences at each timestep (from the model's calibration).

    Without a calibration the spread of the errors themselves is used, which ranks classes
    the same way but prunes less sharply.
    """
    calibration = model.calibration or {}
    grid = calibration.get("timestep_grid")
    if not grid:
        return np.ones(len(timesteps), np.float32)
    values = np.interp(timesteps, grid, np.log(calibration["timestep_sd"]))
    return np.exp(values).astype(np.float32)


def evidence(model, errors):
    """Evidence against each class: its mean excess score over the best class per trial.

    Classes are compared on the trials both were evaluated on (a pruned class has fewer).
    The best class is the one with the lowest mean score among those evaluated on the most
    trials. Returns (evidence (n, k) with 0 on the best class, best class ids (n,)).
    """
    scores = normalised_scores(model, errors)
    counts = np.sum(~np.isnan(scores), axis=1)
    means = np.nanmean(scores, axis=1)
    survivors = counts == counts.max(axis=1, keepdims=True)
    best = np.argmin(np.where(survivors, means, np.inf), axis=1)
    rows = np.arange(len(errors))
    excess = scores - scores[rows, :, best][:, :, None]
    return np.clip(np.nanmean(excess, axis=1), 0, None), best


def split_null(model, errors, null=None):
    """(errors of the real classes, errors of the null class or None) of an errors array whose
    last column may be the null class (by default when it has one column more than the
    model's classes)."""
    if null is None:
        null = errors.shape[2] == model.num_classes + 1
    if null:
        return errors[:, :, :-1], errors[:, :, -1]
    return errors, None


def review_thresholds(model):
    """The model's calibrated (uncertainty, anomaly) review thresholds, exact; (0.3, 3.0) for a
    model without calibration."""
    calibration = model.calibration or {}
    return (
        float(calibration.get("uncertainty_threshold", 0.3)),
        float(calibration.get("anomaly_threshold", 3.0)),
    )


def calls_from_errors(
    model,
    errors,
    spent,
    uncertainty_threshold=None,
    anomaly_threshold=None,
    domain_shift=None,
    domain_threshold=None,
    chromatin_area=None,
):
    """Turn paired errors into labels, calibrated probabilities, uncertainty, anomaly scores
    and review flags with their reasons.

    ``errors`` may carry the null class as its last column (see :func:`class_errors`);
    ``domain_shift`` (n,) is the cells' domain-shift score (see
    :func:`~napari_cytodiffusion.core.model.domain.domain_scores`), NaN or None where
    unknown; ``chromatin_area`` (n,) the central cells' chromatin in red-cell areas (see
    :func:`~napari_cytodiffusion.core.model.cell_size.central_chromatin_area`), None when
    not measured.
    """
    from napari_cytodiffusion.core.model.cell_size import size_ratios

    calibration = model.calibration or {}
    # Evidence is in per-trial standard deviations; the fitted inverse temperature turns it
    # into log-odds. Without calibration one SD of mean excess counts as one nat.
    temperature = float(calibration.get("inverse_temperature", 1.0))
    calibrated = review_thresholds(model)
    if uncertainty_threshold is None:
        uncertainty_threshold = calibrated[0]
    if anomaly_threshold is None:
        anomaly_threshold = calibrated[1]
    if domain_threshold is None:
        domain_threshold = 1.0
    real, null = split_null(model, errors)
    against, best = evidence(model, real)
    logits = -against * temperature
    probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    shift = np.full(len(errors), np.nan) if domain_shift is None else np.asarray(domain_shift)
    decay = (calibration.get("domain") or {}).get("trust_decay")
    if decay is not None:  # calls on unfamiliar smears are right less often than calibrated
        from napari_cytodiffusion.core.model.domain import trusted_probabilities

        probabilities = trusted_probabilities(probabilities, shift, decay)
    k = probabilities.shape[1]
    entropy = -np.sum(probabilities * np.log(np.clip(probabilities, 1e-12, None)), axis=1)
    uncertainty = entropy / np.log(k)
    anomaly = anomaly_scores(model, real, best, null)
    called = [model.classes[b] for b in best]
    area = np.full(len(errors), np.nan) if chromatin_area is None else chromatin_area
    size = size_ratios(calibration.get("size"), area, called)
    calls = []
    for i in range(len(errors)):
        why = review_reasons(
            uncertainty[i],
            anomaly[i],
            shift[i],
            (uncertainty_threshold, anomaly_threshold, domain_threshold),
            size_ratio=size[i],
        )
        calls.append(
            CellCall(
                label=model.classes[best[i]],
                probabilities={
                    c: float(p) for c, p in zip(model.classes, probabilities[i], strict=True)
                },
                uncertainty=float(uncertainty[i]),
                anomaly_score=float(anomaly[i]),
                needs_review=bool(why),
                unet_evals=int(spent[i]),
                domain_shift=float(shift[i]),
                size_ratio=float(size[i]),
                why="; ".join(why),
            )
        )
    return calls


def review_reasons(
    uncertainty, anomaly, domain_shift, limits, with_scores=False, size_ratio=np.nan
):
    """The reasons (:data:`REASONS`) a call needs review, given ``limits`` = (uncertainty,
    anomaly, domain-shift) thresholds and the call's ``size_ratio`` (above 1: too large for
    its class); a NaN score never flags. ``with_scores``: each reason with its score, as in
    ``"uncertain (0.42)"``."""
    checks = (
        (UNCERTAIN, uncertainty, limits[0], "{:.2f}"),
        (UNKNOWN_KIND, anomaly, limits[1], "anomaly {:.1f}"),
        (
            UNFAMILIAR_SMEAR,
            domain_shift,
            limits[2] if len(limits) > 2 else np.nan,
            "domain shift {:.1f}",
        ),
        (TOO_LARGE, size_ratio, 1.0, "{:.1f} x its largest"),
    )
    return [
        f"{name} ({form.format(score)})" if with_scores else name
        for name, score, limit, form in checks
        if score > limit
    ]


def anomaly_scores(model, errors, best, null_errors=None):
    """How unlike every known class each cell is, with the image's own denoising cost
    cancelled (see :mod:`~napari_cytodiffusion.core.model.anomaly`).

    Uses the model's calibrated score (``calibration["anomaly"]``, by default ``null_gain``:
    the best class's gain over the null class on the same noisy inputs, against validation
    cells of that class). Models calibrated before, or errors without the null class, fall
    back to the best class's error against validation cells of that class. 0 without any
    reference; NaN never (a cell scored on no common trial gets 0). Scores of soft cells
    are scaled (``calibration["anomaly_scale"]``) so that the main calibration's threshold
    flags them as often as their own would.
    """
    from napari_cytodiffusion.core.model import anomaly

    calibration = model.calibration or {}
    timesteps = trial_timesteps(errors.shape[1])
    reference = calibration.get("anomaly")
    if reference and (null_errors is not None or reference["method"] in ("margin", "best_error")):
        scores = anomaly.score(reference, errors, null_errors, best, timesteps)
        return np.nan_to_num(scores, nan=0.0) * float(calibration.get("anomaly_scale", 1.0))
    grid = calibration.get("timestep_grid")
    if not grid or "class_log_error_mean" not in calibration:
        return np.zeros(len(errors))
    legacy = {
        "method": "best_error",
        "timestep_grid": grid,
        "mean": calibration["class_log_error_mean"],
        "sd": calibration["class_log_error_sd"],
    }
    return np.nan_to_num(anomaly.score(legacy, errors, None, best, timesteps), nan=0.0)
