"""Adapt a model to a lab's stain and scanner, and calibrate it on the lab's own cells.

A lab gives a folder of labelled cells (class subfolders, the layout ``train`` reads and the
annotation export writes). Each class's cells are split once, by the seed: most adapt the
model (:mod:`~napari_cytodiffusion.core.model.adaptation`), the rest are held back and
calibrate it (:func:`~napari_cytodiffusion.core.model.calibration.fit_calibration`: timestep
spreads, class biases, temperature, anomaly reference, review thresholds), so its
probabilities and review flags mean for that lab what the shipped model's mean for PBC, and
"unlike the training smears" means unlike the lab's smears. The result is saved as a named
local model (``weights.register_local_model``) that every command and widget offers. With
``steps=0`` the model is only calibrated, on all the cells.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from napari_cytodiffusion.core.model.adaptation import ADAPT_STEPS
from napari_cytodiffusion.core.model.domain import CELLS_PER_COMPONENT
from napari_cytodiffusion.core.progress import phases

CALIBRATION_TRIALS = 32
# Trials per class and adapting cell for the class biases (calibration.fit_calibration's
# bias_cells): the biases need each class's mean score, not the tails the thresholds need.
BIAS_TRIALS = 16
HELD_BACK = 0.3
MIN_HELD_BACK = 2
FEW_CELLS = 5  # fewer a class: warned (the smallest K the adaptation benchmark measures)
# The lab's "unlike the training smears" reference: one principal component needs
# CELLS_PER_COMPONENT fitting cells, and its threshold at least as many cells as a class is
# calibrated on. Fewer make it degenerate (on one cell its variances are 0 and its threshold
# NaN, which switches the check off without a word).
MIN_REFERENCE_FITTED = CELLS_PER_COMPONENT
MIN_REFERENCE_THRESHOLDED = MIN_HELD_BACK
# A calibrate-only run fits on every other cell and thresholds on the rest.
MIN_REFERENCE_CALIBRATING = max(2 * MIN_REFERENCE_FITTED - 1, 2 * MIN_REFERENCE_THRESHOLDED)
# Rough seconds per unit on a CPU, to share one progress bar between the phases.
_PACK_COST, _STEP_COST, _EVAL_COST = 0.05, 0.3, 0.015


@dataclass
class AdaptRequest:
    """Adapting (or only calibrating) a model with a lab's labelled cells.

    Attributes
    ----------
    data : path
        A folder of class subfolders or a CSV with file, label (and split) columns; cells of
        the ``test`` split are never used.
    name : str
        The local model to save.
    replace : bool
        Whether an existing local model ``name`` may be replaced; without it that is refused,
        unless it is ``base`` itself being calibrated again.
    base : str
        Name or path of the model to start from.
    steps : int
        Adaptation steps; 0 calibrates ``base`` on all the cells without changing its weights.
    held_back : float
        Share of each class's cells kept for calibration (at least 2 per class).
    add_classes : bool
        Subfolders that are not classes of ``base`` become new classes (for example blast);
        otherwise they are left out with a warning.
    calibration_trials : int
        Trials per class and cell of the exhaustive calibration run.
    rbc_diameter : float, optional
        Red-cell diameter of the images in pixels. When None, one scale is estimated for
        all of them (the median over the images, as ``classify`` does for several
        single-cell images of one scanner); cells exported with their scale keep it.
    """

    data: Path
    name: str
    base: str = "default"
    steps: int = ADAPT_STEPS
    held_back: float = HELD_BACK
    add_classes: bool = False
    calibration_trials: int = CALIBRATION_TRIALS
    device: str = "auto"
    seed: int = 0
    rbc_diameter: float | None = None
    replace: bool = False


# Said when a calibrate-only run keeps the base model's domain reference.
BASE_REFERENCE_NOTE = (
    "'unlike the training smears' still means unlike the base model's training smears: too "
    "few cells to fit the lab's own reference; calibrate again on more of the lab's cells"
)


@dataclass
class AdaptResult:
    """A registered adapted or calibrated model and what it was made from.

    Attributes
    ----------
    entry : ModelEntry
        The local model (name, file, sha256, classes).
    adapted_on, calibrated_on : dict
        Cells per class used for adapting and for calibrating.
    new_classes : tuple of str
    held_back_balanced_accuracy : float
        Of the adapted model on its calibration cells (optimistic: the calibration was fitted
        on them). NaN when no class had calibration cells.
    held_back_flagged : float
        Share of the calibration cells the model flags for review.
    training : dict or None
        ``steps``, ``seconds``, ``loss`` of adapting; None when only calibrated.
    seconds : float
    rbc_diameter : float or None
        The red-cell scale the cells were cut at and the model keeps for the lab's images
        (``DiffusionModel.lab_rbc_diameter``); None when every cell came with its own.
    domain_reference : str
        ``lab`` when the "unlike the training smears" reference was fitted on the lab's cells,
        ``base`` when it is the base model's (calibrated on too few cells for one of its own).
    """

    entry: object
    adapted_on: dict
    calibrated_on: dict
    new_classes: tuple
    held_back_balanced_accuracy: float
    held_back_flagged: float
    training: dict | None
    seconds: float
    rbc_diameter: float | None = None
    domain_reference: str = "lab"

    def summary(self):
        """Lines a person reads after the run."""
        lines = [
            f"saved local model {self.entry.name!r} ({self.entry.sha256[:12]}), classes: "
            + ", ".join(self.entry.classes)
        ]
        if self.new_classes:
            lines.append("new classes: " + ", ".join(self.new_classes))
        if self.training:
            lines.append(
                f"adapted on {sum(self.adapted_on.values())} cells in {self.training['steps']} "
                f"steps ({self.training['seconds']:.0f} s)"
            )
        if self.rbc_diameter:
            lines.append(f"red-cell scale of the lab's images: {self.rbc_diameter:.1f} px")
        cells = "held-back cells" if self.training else "cells"
        lines.append(
            f"calibrated on {sum(self.calibrated_on.values())} {cells}: on them (optimistic: "
            f"fitted on them) balanced accuracy {self.held_back_balanced_accuracy:.3f}, "
            f"{100 * self.held_back_flagged:.0f}% flagged for review"
        )
        if self.domain_reference == "base":
            lines.append(BASE_REFERENCE_NOTE)
        lines.append(f"use it with --model {self.entry.name}; took {self.seconds:.0f} s")
        return lines


def adapt_model(request, progress=None, log=print):
    """Adapt ``request.base`` to the labelled cells of ``request.data``, calibrate it on held-back
    cells, and register the result as a local model; see :class:`AdaptRequest`.

    Parameters
    ----------
    request : AdaptRequest
    progress : callable, optional
        ``progress(done, total)`` over normalising, adapting and calibrating; raising
        ``Cancelled`` stops the run and registers nothing.
    log : callable
        Receives lines about the data and the run.

    Returns
    -------
    AdaptResult

    Raises
    ------
    ValueError
        For bad settings or too few cells, with what to change.

    Examples
    --------
    >>> from napari_cytodiffusion.core.tasks.adapt import AdaptRequest, adapt_model
    >>> result = adapt_model(AdaptRequest("lab_cells/", "lab-a"))  # doctest: +SKIP
    >>> print("\\n".join(result.summary()))  # doctest: +SKIP
    """
    import time

    from napari_cytodiffusion.core import datasets
    from napari_cytodiffusion.core.model import adaptation, weights

    started = time.perf_counter()
    check_request(request)
    model = weights.load_model(request.base, request.device)
    base_calibration = dict(model.calibration)
    records, new_classes = _records(request, model.classes, log)
    adaptation.add_classes(model, new_classes)
    classes = tuple(model.classes)
    counts = datasets.class_counts(records, classes)
    log("cells per class: " + ", ".join(f"{c} {n}" for c, n in counts.items() if n))
    _check_new_classes(new_classes, counts, request)
    _warn_few_cells(counts, request, log)
    # Too few cells for the domain reference are refused before any work on the planned split
    # (and again on the split itself, once copies of a cell are kept together).
    planned = sum(_held_count(n, request) for n in counts.values())
    _reference_cells(
        np.arange(sum(counts.values()) - planned), np.arange(planned), request, base_calibration
    )
    labels = np.array([classes.index(record.label) for record in records])
    packing, adapting, calibrating = _phases(progress, labels, len(classes), request)
    scale = request.rbc_diameter or _lab_scale(records, log)
    images = _packed(records, request, model, classes, scale, packing, log).images
    crops = _model_crops(images, model.image_size)
    groups = datasets.copy_groups(crops)
    labels = _without_disagreeing_copies(labels, groups, records, request.data, log)
    adapt_ids, held_ids = _split(labels, groups, len(classes), request)
    reference_cells = _reference_cells(adapt_ids, held_ids, request, base_calibration)
    if reference_cells is None:
        log(
            f"warning: {len(held_ids)} cells are too few to fit the lab's own 'unlike the "
            f"training smears' reference (it needs {MIN_REFERENCE_CALIBRATING}); the base "
            "model's is kept"
        )
    training = None
    if request.steps:
        log(f"adapting on {len(adapt_ids)} cells, {request.steps} steps")
        training = adaptation.adapt_weights(
            model,
            images[adapt_ids],
            labels[adapt_ids],
            steps=request.steps,
            seed=request.seed,
            progress=adapting,
        )
    log(
        f"calibrating on {len(held_ids)} held-back cells"
        + (f" (the class biases on all {len(labels)})" if len(adapt_ids) else "")
    )
    calls = _calibrate(
        model,
        (crops[held_ids], labels[held_ids]),
        (crops[adapt_ids], labels[adapt_ids]),
        request,
        _extended(base_calibration, len(new_classes)),
        calibrating,
    )
    if reference_cells is not None:
        model.calibration["domain"] = _lab_domain_reference(model, crops, *reference_cells)
    else:  # calibrate only, on too few cells: the base's network, so the base's reference
        model.calibration["domain"] = base_calibration["domain"]
    _keep_base_measures(model, base_calibration)
    _check_thresholds(model.calibration)
    domain_reference = "base" if reference_cells is None else "lab"
    held_labels = labels[held_ids]
    model.metadata = {
        **model.metadata,
        "base": request.base,
        "adapted_on": _per_class(labels[adapt_ids], classes),
        "calibrated_on": _per_class(held_labels, classes),
        "data": str(request.data),
        "steps": request.steps,
        "seed": request.seed,
        "rbc_diameter": scale,
        "domain_reference": domain_reference,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    kind = "adapted" if request.steps else "calibrated"
    entry = weights.register_local_model(
        model,
        request.name,
        f"{request.base} {kind} on {len(records)} cells of {Path(request.data).name}",
    )
    return AdaptResult(
        entry=entry,
        adapted_on=_per_class(labels[adapt_ids], classes),
        calibrated_on=_per_class(held_labels, classes),
        new_classes=tuple(new_classes),
        held_back_balanced_accuracy=_balanced_accuracy(calls, held_labels, classes),
        held_back_flagged=float(np.mean([call.needs_review for call in calls])),
        training=training,
        seconds=time.perf_counter() - started,
        rbc_diameter=scale,
        domain_reference=domain_reference,
    )


def _phases(progress, labels, class_count, request):
    """(packing, adapting, calibrating) progress callbacks sharing one bar by rough cost."""
    held_count = sum(_held_count(n, request) for n in np.bincount(labels))
    adapt_count = len(labels) - held_count
    evaluations = held_count * request.calibration_trials + adapt_count * BIAS_TRIALS
    costs = [
        _PACK_COST * len(labels),
        _STEP_COST * request.steps,
        _EVAL_COST * class_count * evaluations,
    ]
    return phases(progress, costs)


def _keep_base_measures(model, base_calibration):
    """A lab's few cells cannot say how calls degrade off its smears, nor how large each
    class may be (a physical size, in red cells): the base model's measures stand (a new
    class has none)."""
    base_calibration = base_calibration or {}
    decay = (base_calibration.get("domain") or {}).get("trust_decay")
    if decay is not None:
        model.calibration["domain"]["trust_decay"] = decay
    if "size" in base_calibration:
        model.calibration["size"] = base_calibration["size"]


def _balanced_accuracy(calls, labels, classes):
    """Mean recall over the classes present in ``labels`` (NaN when there are none)."""
    if len(labels) == 0:
        return float("nan")
    predicted = np.array([classes.index(call.label) for call in calls])
    return float(np.mean([np.mean(predicted[labels == c] == c) for c in np.unique(labels)]))


def check_request(request):
    """Raise ValueError, saying what to change, for settings :func:`adapt_model` refuses before
    any work (also an existing local model ``name`` without ``replace``); the widget checks its
    fields with it before starting."""
    from napari_cytodiffusion.core.devices import check_device_name
    from napari_cytodiffusion.core.model.weights import check_local_name
    from napari_cytodiffusion.core.smear.prepare import validate_rbc_diameter

    checks = (
        ("steps", request.steps >= 0, "0 or more"),
        ("held_back", 0 < request.held_back < 1, "between 0 and 1"),
        ("calibration_trials", 4 <= request.calibration_trials <= 64, "between 4 and 64"),
    )
    for name, ok, allowed in checks:
        if not ok:
            raise ValueError(f"{name} must be {allowed}, got {getattr(request, name)}.")
    if not Path(request.data).exists():
        raise ValueError(f"No such file or folder: {request.data}")
    check_local_name(request.name)
    _refuse_replacing(request)
    validate_rbc_diameter(request.rbc_diameter)
    check_device_name(request.device)


def _refuse_replacing(request):
    """A local model of that name is only replaced when asked, or recalibrated in place."""
    from napari_cytodiffusion.core.model.weights import find_model, model_path

    existing = find_model(request.name)
    if existing is None or not existing.local or request.replace:
        return
    base = Path(str(request.base)).expanduser()
    in_place = find_model(str(request.base)) == existing or (
        base.is_file() and base.resolve() == model_path(existing.name).resolve()
    )
    if request.steps == 0 and in_place:
        return
    raise ValueError(
        f"A local model '{request.name}' exists: choose another name, or replace it "
        "(--replace; in the widget, tick 'replace the local model of this name')."
    )


def _records(request, classes, log):
    """(records of the train and val splits, names of new classes)."""
    from napari_cytodiffusion.core import datasets
    from napari_cytodiffusion.core.classes import class_key

    unknown = datasets.unknown_classes(request.data, classes)
    new_classes = []
    if unknown and request.add_classes:
        new_classes = list(dict.fromkeys(class_key(name) for name in unknown))
        log("new classes: " + ", ".join(new_classes))
    elif unknown:
        log(
            "warning: cells of classes this model does not have were left out: "
            f"{', '.join(unknown)} (add them as new classes with add_classes / --add-classes)"
        )
    records = datasets.list_labelled_images(
        request.data, classes=tuple(classes) + tuple(new_classes)
    )
    records = [r for r in records if r.split in ("train", "val")]
    return sorted(records, key=lambda r: str(r.path)), new_classes


def _check_new_classes(new_classes, counts, request):
    if new_classes and request.steps == 0:
        raise ValueError(
            f"New classes ({', '.join(new_classes)}) must be learned: adapt with steps > 0, "
            "or leave their folders out."
        )
    few = [name for name in new_classes if counts[name] <= MIN_HELD_BACK]
    if few:
        raise ValueError(
            f"A new class needs at least {MIN_HELD_BACK + 1} labelled cells (to learn it and to "
            f"calibrate it); {', '.join(few)} has fewer."
        )


def _warn_few_cells(counts, request, log):
    """Say which classes have too few cells for calls a lab can trust (calibrating only, too:
    its probabilities and review thresholds are then fitted on those few cells)."""
    few = {name: n for name, n in counts.items() if 0 < n < FEW_CELLS}
    if not few:
        return
    listed = ", ".join(f"{name} ({n})" for name, n in few.items())
    if request.steps:
        log(
            f"warning: few labelled cells for {listed}: give each class at least {FEW_CELLS}, "
            f"some to adapt on and {MIN_HELD_BACK} or more to calibrate on (a class of "
            f"{MIN_HELD_BACK} or fewer is not calibrated on cells of its own)"
        )
    else:
        log(
            f"warning: few labelled cells for {listed}: give each class at least {FEW_CELLS} "
            "to calibrate on (its probabilities and review thresholds are fitted on them)"
        )


def _held_count(cells, request):
    """How many of a class's ``cells`` calibrate: ``held_back`` of them, at least
    ``MIN_HELD_BACK``, at least one left to adapt; none of a smaller class; all of them
    when only calibrating."""
    if request.steps == 0:
        return cells
    if cells <= MIN_HELD_BACK:
        return 0
    return int(np.clip(round(request.held_back * cells), MIN_HELD_BACK, cells - 1))


def _without_disagreeing_copies(labels, groups, records, data, log):
    """``labels`` with -1 (left out) for copies of one cell that carry different classes."""
    from napari_cytodiffusion.core.datasets import disagreeing_copies, has_a_copy

    disagreeing = disagreeing_copies(labels, groups)
    root = Path(data) if Path(data).is_dir() else Path(data).parent
    for group in np.unique(groups[disagreeing]):
        names = [_shown_path(records[i].path, root) for i in np.flatnonzero(groups == group)]
        log(
            "warning: the same cell is labelled differently in "
            + " and ".join(names)
            + "; left out (correct or remove one of them to use it)"
        )
    copied = int(np.sum(has_a_copy(groups)))
    if copied:
        log(
            f"{copied} images show the same cell as another image; a cell's copies are kept "
            "on one side of the split into adapting and calibration cells"
        )
    return np.where(disagreeing, -1, labels)


def _shown_path(path, root):
    path = Path(path)
    return str(path.relative_to(root)) if path.is_relative_to(root) else path.name


def _split(labels, groups, num_classes, request):
    """(adapting cell ids, calibration cell ids) of cells with class ids ``labels`` (-1: left
    out) and copy groups ``groups`` (:func:`~napari_cytodiffusion.core.datasets.copy_groups`).

    Every class with at least ``MIN_HELD_BACK + 1`` cells gives ``held_back`` of them (at
    least ``MIN_HELD_BACK``) to calibration, a cell's copies all on one side; smaller classes
    only adapt. With ``steps=0`` all cells calibrate.
    """
    from napari_cytodiffusion.core.datasets import pick_whole_copies

    rng = np.random.default_rng(request.seed)
    adapt_ids, held_ids = [], []
    for c in range(num_classes):
        ids = np.flatnonzero(labels == c)
        held = pick_whole_copies(ids, groups, _held_count(len(ids), request), rng)
        held_ids += held
        adapt_ids += np.setdiff1d(ids, held).tolist()
    if not held_ids:
        raise ValueError(
            f"Too few cells to calibrate: give at least {MIN_HELD_BACK + 1} labelled cells of "
            "a class."
        )
    return np.sort(adapt_ids).astype(int), np.sort(held_ids).astype(int)


def _packed(records, request, model, classes, scale, progress, log):
    """The normalised crops of ``records``, packed once (losslessly) and cached beside the
    local models.

    Lossless, because a lab's few dozen cells are adapted on, calibrated on and measured
    for the domain reference, and JPEG changes the fine detail the classifier and the
    reference see in live crops (at quality 92 a dataset-1 crop's sharpness moves by 0.2,
    two thirds of PBC's spread).
    """
    from napari_cytodiffusion.core import datasets
    from napari_cytodiffusion.core.model.weights import local_registry_path

    folder = local_registry_path().parent / "cells"
    folder.mkdir(parents=True, exist_ok=True)
    pack = datasets.pack_cache_path(
        folder / f"{request.name}.pt",
        records,
        model.image_size,
        scale,
        quality=None,
        classes=classes,
    )
    if pack.is_file():
        log(f"using the normalised cells in {pack.name} (the data are unchanged)")
    else:
        log(f"normalising {len(records)} cells")
        datasets.pack_cells(
            records,
            pack,
            model.image_size,
            scale,
            quality=None,
            progress=progress,
            classes=classes,
        )
        datasets.remove_other_packs(pack)
    return datasets.load_pack(pack)


def _lab_scale(records, log):
    """One red-cell scale for the lab's images whose scale is not known (None if none).

    A tight single-cell image holds too few red cells to measure, and its fallback, the white
    cell's own size, makes a lymphocyte look as large as a monocyte; one scanner's images
    share one scale, so the median over them keeps the sizes that tell the classes apart.
    """
    from napari_cytodiffusion.core.tasks.classify import shared_rbc_diameter, size_groups

    unknown = sorted({record.path for record in records if not record.rbc_diameter})
    if not unknown:
        return None
    groups = size_groups(unknown)
    if len(groups) > 1:
        sizes = ", ".join(f"{len(members)} of {h} x {w} px" for (h, w), members in groups)
        log(
            f"warning: the images come in sizes of more than one scanner ({sizes}) but share "
            "one red-cell scale; adapt to each scanner's images separately, or give the scale "
            "(--rbc-diameter)"
        )
    scale = shared_rbc_diameter(unknown)
    if scale is not None:
        log(f"red-cell scale {scale:.1f} px, shared by the {len(unknown)} images (their median)")
    return scale


def _model_crops(images, size):
    """The model's input (float crops of ``size``) from the centre of wider packed crops."""
    offset = (images.shape[1] - size) // 2
    window = slice(offset, offset + size)
    return images[:, window, window].astype(np.float32) / 255


def _reference_cells(adapt_ids, held_ids, request, base_calibration):
    """(fitting ids, thresholding ids) of the lab's domain reference: the adapting and the
    held-back cells (a calibrate-only run splits its cells: every other one fits).

    None when they are too few and the base's reference stands: only when calibrating, since
    then the network is the base's. Adapting changes the encoder the reference measures, so
    too few cells there, or a base without a reference, are refused.
    """
    fitted, thresholded = adapt_ids, held_ids
    if request.steps == 0:
        fitted, thresholded = held_ids[::2], held_ids[1::2]
    if len(fitted) >= MIN_REFERENCE_FITTED and len(thresholded) >= MIN_REFERENCE_THRESHOLDED:
        return fitted, thresholded
    if request.steps == 0:
        if (base_calibration or {}).get("domain"):
            return None
        raise ValueError(
            f"Too few cells ({len(held_ids)}) to fit the 'unlike the training smears' "
            f"reference of the lab's smears (at least {MIN_REFERENCE_CALIBRATING}), and the "
            "base model has none to keep: give more labelled cells."
        )
    raise ValueError(
        "Too few cells for the adapted model's 'unlike the training smears' reference: it is "
        f"fitted on at least {MIN_REFERENCE_FITTED} adapting cells and thresholded on at least "
        f"{MIN_REFERENCE_THRESHOLDED} held-back ones; these cells give {len(fitted)} and "
        f"{len(thresholded)}. Give more labelled cells, or only calibrate (steps 0)."
    )


def _lab_domain_reference(model, crops, fitted, thresholded):
    """The adapted model's "unlike the training smears" reference, fitted on the lab's cells.

    The base model's reference describes the smears the base was trained on, which are no
    longer this model's; without one of its own, an adapted model would call cells of other
    smears (PBC's among them) without a word. Its cells' encoder features are fitted on the
    ``fitted`` cells and thresholded on the ``thresholded`` ones (:func:`_reference_cells`); no
    smear colours, since packed cells do not keep their smears'.
    """
    from napari_cytodiffusion.core.model.domain import cell_features, fit_domain_reference

    features = cell_features(model, crops)
    return fit_domain_reference(features[fitted], None, features[thresholded], None)


def _check_thresholds(calibration):
    """Refuse to save a calibration with an undefined (NaN or infinite) threshold: a check
    with one never flags, and no one would be told it is off."""
    bad = sorted(_undefined_thresholds(calibration))
    if bad:
        raise ValueError(
            f"The calibration's {', '.join(bad)} came out undefined on these cells; nothing "
            "was saved. Give more labelled cells."
        )


def _undefined_thresholds(tree, prefix=""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _undefined_thresholds(value, f"{prefix}{key}.")
        elif key.endswith("threshold") and isinstance(value, int | float):
            if not np.isfinite(value):
                yield prefix + key


def _calibrate(model, held, adapting, request, base, progress):
    """Fit the calibration on the held-back cells, the class biases on the adapting cells too;
    return the held-back cells' calls under it.

    ``held`` and ``adapting`` are (crops, class ids); ``base`` is the base model's calibration.
    """
    from napari_cytodiffusion.core.model.calibration import fit_calibration
    from napari_cytodiffusion.core.model.classifier import (
        calls_from_errors,
        class_errors,
        replay_adaptive,
    )

    held_crops, held_labels = held
    adapting_crops, adapting_labels = adapting
    on_held, on_adapting = phases(
        progress,
        [len(held_labels) * request.calibration_trials, len(adapting_labels) * BIAS_TRIALS],
    )
    # With the null class: the anomaly score compares each class with it (core/model/anomaly).
    errors, _ = class_errors(
        model,
        held_crops,
        "exhaustive",
        request.seed,
        request.calibration_trials,
        progress=on_held,
        null=True,
    )
    bias_cells = None
    if len(adapting_labels):
        bias_errors, _ = class_errors(
            model, adapting_crops, "exhaustive", request.seed, BIAS_TRIALS, progress=on_adapting
        )
        bias_cells = (bias_errors, adapting_labels)
    fit_calibration(model, errors, held_labels, base=base, bias_cells=bias_cells)
    adaptive, spent = replay_adaptive(model, errors)
    return calls_from_errors(model, adaptive, spent)


def _extended(base, added):
    """``base`` calibration with neutral entries for ``added`` new classes (which always have
    calibration cells of their own, so these are only starting values)."""
    if not base or not added:
        return base or None
    extended = dict(base)
    extended["class_bias"] = list(base["class_bias"]) + [0.0] * added
    for key in ("class_log_error_mean", "class_log_error_sd"):
        extended[key] = list(base[key]) + [base[key][0]] * added
    return extended


def _per_class(labels, classes):
    counts = np.bincount(labels, minlength=len(classes))
    return {name: int(n) for name, n in zip(classes, counts, strict=True) if n}
