"""Train or adapt the model: normalise a folder of labelled cells once, then train on it.

The normalised crops are cached beside the output under a name that is a digest of the
folder's content, so the cache is reused while the images are unchanged and can never be
stale after images are added, removed or edited.
"""

from dataclasses import dataclass
from pathlib import Path

from napari_cytodiffusion.core.checks import is_whole_number
from napari_cytodiffusion.core.model.training import DEFAULT_CHANNELS
from napari_cytodiffusion.core.progress import phases

# Relative cost of normalising one image and of one training step, to share the bar.
_PACK_COST, _STEP_COST = 1, 4


@dataclass
class TrainRequest:
    """A training or fine-tuning run.

    Attributes
    ----------
    data : path
        A folder of class subfolders, a CSV with file, label and split columns, or a packed
        ``.npz``.
    out : path
        The checkpoint to write (a model file any widget or command loads by its path).
    init : str, optional
        Name or path of a model whose weights start the run (adapting it); its classes and
        resolution are then used. Ignored with ``resume``.
    resume : path, optional
        A checkpoint to continue.
    rbc_diameter : float, optional
        Red-cell diameter of the images in pixels (one scanner). If None, each scanner's
        images (three or more of one size) share one estimate, and others are measured alone.
    resolution : int, optional
        Model image size: None for 64 in a new model, the ``init`` or ``resume`` model's
        otherwise (which a given one must equal). 0, and any size the network's levels do not
        halve evenly, are refused.
    overwrite : bool
        Whether an existing ``out`` may be replaced (it is continued, not replaced, when it
        is also ``resume``).
    """

    data: Path
    out: Path
    steps: int = 20000
    batch_size: int = 128
    lr: float = 3e-4
    device: str = "auto"
    seed: int = 0
    resume: Path | None = None
    init: str | None = None
    rbc_diameter: float | None = None
    channels: tuple = DEFAULT_CHANNELS
    resolution: int | None = None
    time_limit: float | None = None
    overwrite: bool = False


def train_model(request, progress=None, on_loss=None, log=print, on_data=None):
    """Normalise the labelled cells (once) and train; see :class:`TrainRequest`.

    Parameters
    ----------
    request : TrainRequest
    progress : callable, optional
        ``progress(done, total)`` over normalising and training; raising ``Cancelled`` stops
        the run, after training saved a checkpoint that ``resume`` continues.
    on_loss : callable, optional
        ``on_loss(step, loss)`` while training.
    log : callable
        Receives lines about the data (cells per class, folders left out) and training.
    on_data : callable, optional
        ``on_data(counts, skipped, classes)`` once the folder is listed, before any training:
        {class: cells}, the names of the subfolders with cells left out (not classes of the
        model) and the classes of the model trained (a new model's: those with cells).

    Returns
    -------
    dict
        ``step``, ``history``, ``seconds`` (see ``training.train``) and ``pack``, the path of
        the normalised cells used.
    """
    from napari_cytodiffusion.core.model import training

    _validate_request(request)
    init = _init_path(request)
    classes, resolution = _model_shape(request, init)
    pack, records, classes = _pack_for(request, classes, resolution, log, on_data)
    packing, stepping = phases(
        progress, [_PACK_COST * len(records), _STEP_COST * max(request.steps, 1)]
    )
    if records:
        from napari_cytodiffusion.core import datasets

        log(f"normalising {len(records)} cells into {pack.name}")
        datasets.pack_cells(
            records, pack, resolution, request.rbc_diameter, progress=packing, classes=classes
        )
        datasets.remove_other_packs(pack)
    summary = training.train(
        pack,
        request.out,
        steps=request.steps,
        batch_size=request.batch_size,
        lr=request.lr,
        device=request.device,
        seed=request.seed,
        resume=request.resume,
        init=init,
        channels=request.channels,
        image_size=resolution,
        time_limit=request.time_limit,
        progress=stepping,
        on_loss=on_loss,
        log=log,
    )
    return {**summary, "pack": pack}


def _validate_request(request):
    checks = (
        ("steps", request.steps >= 1, "at least 1"),
        ("batch_size", request.batch_size >= 1, "at least 1"),
        ("lr", 0 < request.lr < 1, "between 0 and 1"),
        ("channels", all(int(c) >= 4 for c in request.channels), "4 or more per level"),
    )
    for name, ok, allowed in checks:
        if not ok:
            raise ValueError(f"{name} must be {allowed}, got {getattr(request, name)}.")
    if request.time_limit is not None and request.time_limit <= 0:
        raise ValueError(f"time_limit must be more than 0 seconds, got {request.time_limit}.")
    if not Path(request.data).exists():
        raise ValueError(f"No such file or folder: {request.data}")
    if request.resume is not None and not Path(request.resume).is_file():
        raise ValueError(f"No checkpoint to resume at {request.resume}.")
    _validate_out(request)


def _validate_out(request):
    """Refuse an output the run could not write, or would replace unasked, before any work."""
    out = Path(request.out)
    if out.is_dir():
        raise ValueError(
            f"{out} is a folder; give the model file to write, such as {out / 'model.pt'}."
        )
    if not out.parent.is_dir():
        raise ValueError(f"The folder of the output {out} does not exist; create it first.")
    continued = request.resume is not None and Path(request.resume).resolve() == out.resolve()
    if out.exists() and not (request.overwrite or continued):
        raise ValueError(
            f"{out} exists: choose another output, resume it (--resume {out}) or replace it "
            "(--overwrite)."
        )


def _validate_resolution(request, resolution):
    """The model's resolution must halve evenly at every level of the network."""
    levels = 2 ** len(request.channels)
    if not is_whole_number(resolution) or resolution < 8 or resolution % levels:
        raise ValueError(
            f"resolution must be a positive multiple of {levels} px for {len(request.channels)} "
            f"levels of channels, got {resolution}."
        )


def _init_path(request):
    """The sha256-checked file of the model to start from, or None."""
    if not request.init or request.resume:
        return None
    from napari_cytodiffusion.core.model.weights import model_path

    return model_path(request.init)


def _model_shape(request, init):
    """(classes, resolution) of the model this run trains, once the model it starts from or
    continues is found to fit the run: before any cell is normalised, not after."""
    from napari_cytodiffusion.core.classes import CLASSES
    from napari_cytodiffusion.core.model.training import starting_point

    # None is "not given"; 0 is refused with the other bad sizes, not read as the default.
    given = request.resolution
    if request.resume is None and init is None:
        resolution = 64 if given is None else given
        _validate_resolution(request, resolution)
        return CLASSES, resolution
    start = starting_point(request.resume or init, resume=request.resume is not None)
    resolution = start.image_size if given is None else given
    _validate_resolution(request, resolution)
    start.check(start.classes, request.channels, resolution)
    # Steps count those of the resumed run: fewer would save the checkpoint untrained.
    if start.resume and start.step >= request.steps:
        raise ValueError(
            f"{request.resume} is at step {start.step} already; give more than {start.step} "
            "steps (--steps, which count the resumed ones) to train on."
        )
    return start.classes, resolution


def _with_scanner_scales(records, log):
    """``records`` whose scale is unknown given their scanner's (one per image size).

    Each image measured alone varies by 10-20 % (and a large cell can sway its own image's
    estimate), which would teach the model sizes that depend on the estimate; a scanner's
    images share one scale, as the shipped model's training cells did.
    """
    from dataclasses import replace

    from napari_cytodiffusion.core.tasks.classify import batch_rbc_diameters

    unknown = [i for i, record in enumerate(records) if not record.rbc_diameter]
    paths = sorted({records[i].path for i in unknown})
    scales = dict(zip(paths, batch_rbc_diameters(paths), strict=True))
    shared = sorted({round(scale, 1) for scale in scales.values() if scale})
    if shared:
        log(
            "red-cell scale shared by each scanner's images: "
            + ", ".join(f"{s} px" for s in shared)
        )
    records = list(records)
    for i in unknown:
        records[i] = replace(records[i], rbc_diameter=scales[records[i].path])
    return records


def _pack_for(request, classes, resolution, log, on_data=None):
    """(pack path, records still to pack, classes to pack them as): a given pack, a cached
    one, or one to make."""
    from napari_cytodiffusion.core import datasets

    data = Path(request.data)
    if data.suffix.lower() == ".npz":
        return data, [], classes
    records = datasets.list_labelled_images(data, classes=classes)
    tested = sum(r.split == "test" for r in records)
    records = [r for r in records if r.split in ("train", "val")]
    if tested:
        log(f"{_cells(tested)} of the test split left out (kept for testing, never trained on)")
    counts = datasets.class_counts(records, classes)
    log("cells per class: " + ", ".join(f"{name} {n}" for name, n in counts.items()))
    taught = _taught_classes(request, counts, tested, log)
    skipped = [n for n in datasets.unknown_classes(data, classes) if _has_cells(data, n)]
    if skipped:
        log(
            f"warning: cells of classes this model does not have were left out: "
            f"{', '.join(skipped)} (its classes: {', '.join(taught)})"
        )
    if on_data is not None:
        on_data(counts, skipped, taught)
    classes = taught
    records = [r for r in records if r.label in classes]
    if request.rbc_diameter is None:
        records = _with_scanner_scales(records, log)
    pack = datasets.pack_cache_path(
        request.out, records, resolution, request.rbc_diameter, classes=classes
    )
    if pack.is_file():
        log(f"using the normalised cells in {pack.name} (the folder is unchanged)")
        return pack, [], classes
    return pack, records, classes


def _cells(n):
    return f"{n} cell" if n == 1 else f"{n} cells"


def _has_cells(data, name):
    """Whether the subfolder (or label) ``name`` of ``data`` holds any cell: an empty folder
    holds none to leave out, so it is not named among the classes left out."""
    from napari_cytodiffusion.core.io import folder_images

    folder = Path(data) / name
    return not folder.is_dir() or bool(folder_images(folder))


def _taught_classes(request, counts, tested, log):
    """The classes of the model trained from {class: cells} ``counts``: a new model learns the
    classes it has cells of (a class without cells would be noise to it); a model continued
    or fine-tuned keeps all of its own, and is told which get no new cells. ``tested``: the
    test-split cells left out, named when too few cells remain."""
    present = tuple(name for name, n in counts.items() if n)
    left_out = f" ({_cells(tested)} of the test split left out: training uses train and val)"
    left_out = left_out if tested else ""
    if not present:
        raise ValueError(
            f"{request.data} has no cells to train on{left_out}. Give cells of the classes "
            f"{', '.join(counts)}: subfolders named after them, or CSV rows with split train "
            "or val."
        )
    empty = [name for name, n in counts.items() if not n]
    if request.resume is not None or request.init is not None:
        if empty:
            log(f"warning: no cells of {', '.join(empty)}: the model keeps what it knew of them")
        return tuple(counts)
    if len(present) < 2:
        raise ValueError(
            f"A new model needs cells of at least two classes; {request.data} has cells of "
            f"{present[0]} only{left_out}. Add cells of another class (a subfolder, or CSV "
            "rows with split train or val), or fine-tune the default model (--init default, "
            "or 'start from: default' in the widget), which keeps the classes it knows."
        )
    if empty:
        log(f"a new model of the classes with cells: {', '.join(present)}")
    return present
