"""Counterfactual explanations: what would have to change for the model to call a cell X.

Heat map. The cell is noised with the same noise and timestep for every class (a paired
trial), and the model predicts the noise under each class. Where the prediction for the
target class differs from the prediction for the cell's current class, the model "sees" the
cell differently depending on the class: those pixels are what it would change. The
per-pixel difference is averaged over trials (so differences that are consistent across noise
draws survive and random ones cancel), and its length over the colour channels is the map.

Counterfactual image (``method="invert"``, the default). The cell is run backwards through the
deterministic DDIM sampler under its own class, to 60 % of the schedule by default, and then
forwards again through the same sampler under the target class, with guidance that
extrapolates from the cell's own class towards the target. Denoising under the cell's own
class is the exact mirror of the inversion, so the edit towards the cell's own class gives
the cell back (up to the solver's error): everything an edit changes is what the target class
changes. ``method="noise"`` (SDEdit) instead adds seeded noise and redraws the cell under the
target with classifier-free guidance: freer edits that also redraw what the class does not
decide (pose, nucleus shape), so even the edit towards its own class is another cell.

Everything here works on normalised model crops (``smear.crops``); a ``CellSite`` puts the
results back on the smear.
"""

from dataclasses import dataclass

import numpy as np

from napari_cytodiffusion.core.classes import canonical_class
from napari_cytodiffusion.core.progress import report

# Heat-map trials sample timesteps in this band: below it the prediction differences are
# pixel noise, above it the cell is gone and the class prior paints a generic cell.
TRIAL_TIMESTEPS = (100, 600)
DEFAULT_TRIALS = 24
TRIAL_CHUNK = 4  # trials per network call: a progress report (and a chance to cancel) each
DEFAULT_STRENGTH = 0.6
DEFAULT_EDIT_GUIDANCE = 3.0
DEFAULT_EDIT_STEPS = 20
EDIT_METHODS = ("invert", "noise")
DEFAULT_EDIT_METHOD = "invert"
INVERSION_REFINEMENTS = 1  # fixed-point iterations per inversion step (see sampling.invert)


@dataclass
class CellExplanation:
    """Heat maps of one cell towards every class.

    Attributes
    ----------
    maps : ndarray float32 (classes, size, size)
        ``maps[k]``: how much the model's view of each pixel changes from the source class to
        class ``k`` (zero for the source itself), in model noise units.
    errors : ndarray float32 (classes,)
        Mean paired denoising error under each class (lower fits better).
    source : str
        The class the maps start from (given, or the best-fitting class).
    predicted : str
        The class with the lowest paired error over these trials: a quick call, not the
        calibrated classifier's.
    classes : tuple of str
        The model's classes, in the order of ``maps`` and ``errors``.
    """

    maps: np.ndarray
    errors: np.ndarray
    source: str
    predicted: str
    classes: tuple

    def map_for(self, target):
        return self.maps[self.classes.index(canonical_class(target, self.classes))]


def edit_evaluations(strength, steps, method):
    """Network evaluations one edit costs (for sharing a progress bar between steps)."""
    edit_steps = max(2, int(round(steps * strength)))
    return (2 + INVERSION_REFINEMENTS) * edit_steps if method == "invert" else edit_steps


def explain_cell(model, crop, source=None, trials=DEFAULT_TRIALS, seed=0, progress=None):
    """Heat maps of one cell (a float (size, size, 3) crop in [0, 1]) towards every class.

    Parameters
    ----------
    model : DiffusionModel
    crop : ndarray
        Normalised crop, as made by ``crop_cell`` or ``normalised_cell``.
    source : str, optional
        The cell's current class (for example the classifier's call); the class with the
        lowest paired error is used when not given.
    trials : int
        Paired noise draws; the maps' noise falls as 1 / sqrt(trials).
    seed : int
        Seed of the noise and timesteps: same seed, same maps.
    progress : callable, optional
        Called with (done, total) trials.

    Returns
    -------
    CellExplanation
    """
    return explain_cells(model, np.asarray(crop)[None], [source], trials, seed, progress)[0]


def explain_cells(model, crops, sources=None, trials=DEFAULT_TRIALS, seed=0, progress=None):
    """:func:`explain_cell` for a stack of crops (n, size, size, 3); ``sources`` per cell."""
    import torch

    from napari_cytodiffusion.core.model.batches import crops_to_tensor, paired_predictions
    from napari_cytodiffusion.core.model.diffusion import add_noise

    x0 = crops_to_tensor(crops, model)
    sources = [None] * len(x0) if sources is None else list(sources)
    if len(sources) != len(x0):
        raise ValueError(f"Got {len(sources)} source classes for {len(x0)} crops.")
    trials = max(1, int(trials))
    classes = tuple(model.classes)
    k = len(classes)
    generator = torch.Generator().manual_seed(int(seed))
    low, high = TRIAL_TIMESTEPS
    # Stratified timesteps: every part of the band is visited even with few trials.
    times = (
        low
        + (torch.arange(trials) + torch.rand(trials, generator=generator)) / trials * (high - low)
    ).long()
    noise = torch.randn((trials, *x0.shape[1:]), generator=generator).to(model.device)
    times = times.to(model.device)
    chunks = [
        range(start, min(start + TRIAL_CHUNK, trials)) for start in range(0, trials, TRIAL_CHUNK)
    ]
    results = []
    with torch.no_grad():
        for i in range(len(x0)):
            # Predictions are summed per class; the mean difference between classes is linear.
            summed = torch.zeros((k, *x0.shape[1:]), device=model.device)
            squared_error = torch.zeros(k, device=model.device)
            for c, chunk in enumerate(chunks):
                t, eps = times[chunk], noise[chunk]
                noisy = add_noise(
                    x0[i : i + 1].expand(len(chunk), -1, -1, -1), t, eps, model.alpha_bars
                )
                every_class = torch.arange(k, device=model.device).expand(len(chunk), k)
                predicted = paired_predictions(model.unet, noisy, t, every_class)
                summed += predicted.sum(dim=0)
                squared_error += ((predicted - eps[:, None]) ** 2).mean(dim=(2, 3, 4)).sum(dim=0)
                report(progress, i * len(chunks) + c + 1, len(x0) * len(chunks))
            errors = (squared_error / trials).cpu().numpy().astype(np.float32)
            best = classes[int(np.argmin(errors))]
            source = canonical_class(sources[i], classes) if sources[i] is not None else best
            mean_change = (summed - summed[classes.index(source)]) / trials
            maps = mean_change.pow(2).sum(dim=1).sqrt().cpu().numpy().astype(np.float32)
            results.append(CellExplanation(maps, errors, source, best, classes))
    return results


def counterfactual_image(
    model,
    crop,
    target,
    source=None,
    strength=DEFAULT_STRENGTH,
    steps=DEFAULT_EDIT_STEPS,
    guidance=DEFAULT_EDIT_GUIDANCE,
    method=DEFAULT_EDIT_METHOD,
    seed=0,
    progress=None,
):
    """The cell edited towards ``target``: inverted (or noised) part of the way, then
    denoised under the target class.

    Parameters
    ----------
    crop : ndarray float (size, size, 3) in [0, 1]
    target : str
        Class to edit towards.
    source : str, optional
        The cell's current class; needed by ``method="invert"``.
    strength : float in (0, 1]
        How far into the noise the edit goes (fraction of the schedule): small keeps the cell
        as it is, large lets the target class redraw more of it.
    steps : int
        Sampler steps over the full schedule; an edit uses ``strength`` of them (at least 2).
    guidance : float
        Guidance towards ``target``: from ``source`` with ``invert``, from the null class
        with ``noise``.
    method : {"invert", "noise"}
        ``invert``: run the DDIM sampler backwards under ``source`` and forwards under
        ``target`` (keeps the cell: towards ``source`` it gives the cell back; twice the
        evaluations). ``noise``: add seeded noise up to ``strength`` and redraw (SDEdit).
    seed : int
        Noise seed for ``method="noise"``.
    progress : callable, optional
        Called with (done, total) network evaluations.

    Returns
    -------
    ndarray float32 (size, size, 3) in [0, 1]
    """
    import torch

    from napari_cytodiffusion.core.model.batches import crops_to_tensor, tensor_to_crops
    from napari_cytodiffusion.core.model.diffusion import NUM_TIMESTEPS, add_noise
    from napari_cytodiffusion.core.model.sampling import cell_noise, denoise, invert

    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength}.")
    if method not in EDIT_METHODS:
        raise ValueError(f"Unknown method {method!r}; use one of {', '.join(EDIT_METHODS)}.")
    if method == "invert" and source is None:
        raise ValueError("method='invert' needs the cell's current class (source).")
    x0 = crops_to_tensor(np.asarray(crop, np.float32)[None], model)
    classes = tuple(model.classes)
    target_id = torch.tensor([classes.index(canonical_class(target, classes))], device=model.device)
    t_start = int(round(strength * (NUM_TIMESTEPS - 1)))
    edit_steps = max(2, int(round(steps * strength)))
    offset = (1 + INVERSION_REFINEMENTS) * edit_steps if method == "invert" else 0
    total = offset + edit_steps
    sampler, source_id = "dpm++2m", None
    if method == "invert":
        # DDIM both ways over the same timesteps, so that the way back mirrors the way in.
        sampler = "ddim"
        source_id = torch.tensor(
            [classes.index(canonical_class(source, classes))], device=model.device
        )
        noisy = invert(
            model.unet,
            x0,
            source_id,
            model.alpha_bars,
            t_start,
            edit_steps,
            lambda done, _: report(progress, done, total),
            refinements=INVERSION_REFINEMENTS,
        )
    else:
        t = torch.tensor([t_start], device=model.device)
        noisy = add_noise(
            x0, t, cell_noise([seed], model.image_size, model.device), model.alpha_bars
        )
    edited = denoise(
        model.unet,
        noisy,
        target_id,
        model.alpha_bars,
        edit_steps,
        guidance,
        sampler,
        t_start=t_start,
        progress=lambda done, _: report(progress, offset + done, total),
        reference_ids=source_id,
    )
    return tensor_to_crops(edited)[0]


def mean_map_grid(model, crops, sources=None, trials=DEFAULT_TRIALS, seed=0, progress=None):
    """Class x class grid of mean heat maps over a set of cells.

    Cells are grouped by their source class (given, or the best-fitting class); row ``s``,
    column ``t`` of the grid is the mean map from ``s`` towards ``t`` over the cells of ``s``.
    Crops are centred on their cell, so the mean maps show where the change typically lies.

    Returns
    -------
    grid : ndarray float32 (classes, classes, size, size)
        NaN for rows with no cells.
    counts : ndarray int (classes,)
        Cells per source class.
    mean_crops : ndarray float32 (classes, size, size, 3)
        Mean crop per source class (NaN where there are none), for context in figures.
    """
    crops = np.asarray(crops, np.float32)
    explanations = explain_cells(model, crops, sources, trials, seed, progress)
    classes = tuple(model.classes)
    k, size = len(classes), crops.shape[1]
    grid = np.full((k, k, size, size), np.nan, np.float32)
    mean_crops = np.full((k, size, size, 3), np.nan, np.float32)
    counts = np.zeros(k, int)
    rows = np.array([classes.index(e.source) for e in explanations])
    for s in range(k):
        members = np.flatnonzero(rows == s)
        counts[s] = len(members)
        if len(members):
            grid[s] = np.mean([explanations[i].maps for i in members], axis=0)
            mean_crops[s] = crops[members].mean(axis=0)
    return grid, counts, mean_crops


def cell_maps_figure(crop, explanation, counterfactuals=None):
    """Matplotlib figure: the cell, then its heat map towards every class side by side.

    ``counterfactuals`` (optional dict class -> edited crop) adds a second row of edits.
    All maps share one colour scale so their strengths compare. Save with
    ``figure.savefig(path)``.
    """
    from matplotlib.figure import Figure

    classes = explanation.classes
    rows = 2 if counterfactuals else 1
    # Constrained layout keeps the title above the column headers.
    figure = Figure(figsize=(1.6 * (len(classes) + 1), 1.8 * rows + 0.6), dpi=100)
    figure.set_layout_engine("constrained")
    axes = figure.subplots(rows, len(classes) + 1, squeeze=False)
    vmax = float(np.nanmax(explanation.maps)) or 1.0
    axes[0, 0].imshow(np.clip(crop, 0, 1))
    axes[0, 0].set_title(f"cell\n({explanation.source})", fontsize=8)
    for k, name in enumerate(classes, 1):
        axes[0, k].imshow(crop.mean(axis=-1), cmap="gray", vmin=0, vmax=1)
        axes[0, k].imshow(explanation.maps[k - 1], cmap="magma", vmin=0, vmax=vmax, alpha=0.75)
        short = name.replace("immature_granulocyte", "immature gran.")
        axes[0, k].set_title(f"-> {short}\nerr {explanation.errors[k - 1]:.4f}", fontsize=7)
        if rows == 2:
            edited = counterfactuals.get(name)
            if edited is not None:
                axes[1, k].imshow(np.clip(edited, 0, 1))
    if rows == 2:
        axes[1, 0].imshow(np.clip(crop, 0, 1))
        axes[1, 0].set_title("edits", fontsize=8)
    for axis in axes.ravel():
        axis.set_axis_off()
    figure.suptitle("What would change for the model to call this cell each class", fontsize=9)
    return figure


def grid_figure(grid, counts, mean_crops, classes):
    """Matplotlib figure of the class x class mean-map grid from :func:`mean_map_grid`.

    Rows: the cells' current class (with the number of cells); columns: target class. Each
    panel is the mean map over the mean cell in grey; one colour scale for the whole grid.
    """
    from matplotlib.figure import Figure

    k = len(classes)
    figure = Figure(figsize=(1.3 * k + 1.2, 1.3 * k + 0.8), dpi=100)
    axes = figure.subplots(k, k, squeeze=False)
    finite = grid[np.isfinite(grid)]
    vmax = float(finite.max()) if finite.size else 1.0
    for s in range(k):
        for t in range(k):
            axis = axes[s, t]
            axis.set_xticks([])
            axis.set_yticks([])
            if counts[s] and s != t:
                axis.imshow(mean_crops[s].mean(axis=-1), cmap="gray", vmin=0, vmax=1)
                axis.imshow(grid[s, t], cmap="magma", vmin=0, vmax=vmax or 1.0, alpha=0.75)
            if s == 0:
                axis.set_title(classes[t].replace("_", "\n"), fontsize=7)
            if t == 0:
                axis.set_ylabel(f"{classes[s]}\n(n={counts[s]})".replace("_", "\n"), fontsize=7)
    figure.suptitle(
        "Mean counterfactual heat maps: current class (rows) -> target (columns)", fontsize=9
    )
    figure.tight_layout()
    return figure


def heat_overlay(rgb, heat, opacity=0.6):
    """``rgb`` with ``heat`` (NaN where undefined) blended on top in the magma colour map."""
    from matplotlib import colormaps

    rgb = np.asarray(rgb, np.float32)[..., :3]
    inside = np.isfinite(heat)
    if not inside.any():
        return rgb.copy()
    level = np.where(inside, heat, 0) / (float(np.nanmax(heat)) or 1.0)
    colours = colormaps["magma"](level)[..., :3].astype(np.float32)
    # Opacity follows the heat, so the cell shows through where nothing would change.
    weight = opacity * np.sqrt(np.clip(level, 0, 1))[..., None]
    return (1 - weight) * rgb + weight * colours
