"""A blinded Turing test: can an expert tell real cells from synthetic ones?

A panel holds N real cells and N synthetic cells of the same classes (one synthetic cell per
real one, so the class mix is identical and class gives nothing away), shuffled with a seed.
Real and synthetic cells go through the same last steps (background white balance, 8-bit
quantisation, same crop size and scale), so only the cells themselves differ.

The expert answers "real" or "synthetic" for each cell. Accuracy 0.5 is chance; the score gives
a 95 % Clopper-Pearson interval and a one-sided binomial test of "better than chance", overall,
per class and per truth (real / synthetic).
"""

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from napari_cytodiffusion.core.progress import report

REAL, SYNTHETIC = "real", "synthetic"
ANSWER_WORDS = {
    "real": REAL,
    "r": REAL,
    "synthetic": SYNTHETIC,
    "s": SYNTHETIC,
    "fake": SYNTHETIC,
    "generated": SYNTHETIC,
}
KEY_COLUMNS = ("item", "file", "truth", "label", "origin")
ANSWER_COLUMNS = ("item", "file", "answer", "seconds")
SCORE_COLUMNS = ("group", "n", "correct", "accuracy", "ci_low", "ci_high", "p_value")
ALPHA = 0.05


@dataclass
class Panel:
    """A shuffled, blinded set of real and synthetic cells.

    Attributes
    ----------
    images : ndarray float32 (n, size, size, 3)
        The cells in the order they are shown.
    key : list of dict
        Per item (same order): item (1-based), file, truth ("real" / "synthetic"), label,
        origin (the real cell's file, or the synthetic cell's seed).
    """

    images: np.ndarray
    key: list
    seed: int

    def __len__(self):
        return len(self.key)


def choose(count, n, seed=0):
    """Indices of ``n`` of ``count`` items, chosen at random (seeded), in ascending order.

    Raises
    ------
    ValueError
        If there are fewer than ``n`` items.
    """
    if count < n:
        raise ValueError(f"Asked for {n} items but there are only {count}.")
    return sorted(int(i) for i in np.random.default_rng(seed).choice(count, size=n, replace=False))


def select_real_cells(data, n, seed=0, split=None, classes=None):
    """Pick ``n`` labelled cell images at random (seeded) from a class-folder tree or CSV.

    ``split`` ("train", "val" or "test") keeps only that split of a splits CSV; evaluate on
    ``test`` cells, which the model never saw. ``classes`` are the model's classes (the
    standard ones when not given).

    Returns
    -------
    list of datasets.Record
    """
    from napari_cytodiffusion.core.classes import CLASSES
    from napari_cytodiffusion.core.datasets import list_labelled_images

    records = list_labelled_images(data, classes=classes or CLASSES)
    if split is not None:
        records = _of_split(records, data, split)
    if len(records) < n:
        raise ValueError(f"Asked for {n} real cells but {data} holds only {len(records)}.")
    return [records[i] for i in choose(len(records), n, seed)]


def _of_split(records, data, split):
    """The records of ``split``; an error saying why when there are none (without a split
    column every cell counts as training data, so "0 cells" would hide the reason)."""
    from napari_cytodiffusion.core.io import read_table

    kept = [r for r in records if r.split == split]
    if kept:
        return kept
    if not (Path(data).is_file() and "split" in read_table(data)[0]):
        raise ValueError(
            f"{data} has no split column, so none of its cells is of split {split!r}: "
            "choosing a split needs a CSV with file, label and split columns (such as PBC's "
            "splits.csv); or leave the split out to choose among all its cells."
        )
    raise ValueError(
        f"None of the cells of {data} is of split {split!r}: choose another split, or leave "
        "the split out to choose among all its cells."
    )


def normalise_real_cells(cells, size, rbc_diameter=None, progress=None):
    """Normalised crops (n, size, size, 3) of single-cell images, as the model sees cells.

    ``cells`` holds image arrays or :class:`~napari_cytodiffusion.core.datasets.Record`s (read
    from disk); a ``size`` x ``size`` image is taken as a crop already. ``rbc_diameter`` is
    one red-cell diameter for every cell, one per cell, or None to estimate each image's own.
    """
    from napari_cytodiffusion.core.io import read_image
    from napari_cytodiffusion.core.smear.crops import single_cell_crop

    scales = rbc_diameter if np.ndim(rbc_diameter) else [rbc_diameter] * len(cells)
    crops = []
    for done, (cell, scale) in enumerate(zip(cells, scales, strict=True), 1):
        image = read_image(cell.path) if hasattr(cell, "path") else cell
        name = cell.path if hasattr(cell, "path") else f"image {done - 1} (counted from 0)"
        crops.append(single_cell_crop(image, size, scale, name))
        report(progress, done, len(cells))
    return np.stack(crops).astype(np.float32)


def build_panel(real, real_labels, synthetic, synthetic_labels, seed=0, origins=None):
    """Shuffle real and synthetic crops into a :class:`Panel` after the same last steps.

    Parameters
    ----------
    real, synthetic : ndarray float (n, size, size, 3) in [0, 1]
    real_labels, synthetic_labels : sequence of str
    seed : int
        Seed of the shuffle.
    origins : dict, optional
        ``{"real": [...], "synthetic": [...]}``: where each cell came from, kept in the key.
    """
    from napari_cytodiffusion.core.model.generation import balance_background

    real, synthetic = np.asarray(real, np.float32), np.asarray(synthetic, np.float32)
    if real.shape[1:] != synthetic.shape[1:]:
        raise ValueError(
            f"Real cells {real.shape[1:]} and synthetic cells {synthetic.shape[1:]} differ in "
            "size; normalise both to the model's crop size."
        )
    images = np.concatenate([real, synthetic])
    # Same white balance and 8-bit quantisation for both, so neither shows a tell-tale.
    images = np.round(balance_background(images) * 255) / 255
    truths = [REAL] * len(real) + [SYNTHETIC] * len(synthetic)
    labels = list(real_labels) + list(synthetic_labels)
    origins = origins or {}
    sources = list(origins.get(REAL, [""] * len(real))) + list(
        origins.get(SYNTHETIC, [""] * len(synthetic))
    )
    order = np.random.default_rng(seed).permutation(len(images))
    key = [
        {
            "item": item,
            "file": f"item_{item:03d}.png",
            "truth": truths[i],
            "label": labels[i],
            "origin": str(sources[i]),
        }
        for item, i in enumerate(order, 1)
    ]
    return Panel(images=images[order].astype(np.float32), key=key, seed=int(seed))


def make_panel(
    model,
    real,
    real_labels,
    seed=0,
    steps=None,
    guidance=None,
    origins=None,
    progress=None,
):
    """Generate one synthetic cell per real cell (same class) and build the blinded panel.

    ``steps`` and ``guidance`` default to the generator's defaults.
    """
    from napari_cytodiffusion.core.model import generation, sampling

    cells = generation.generate_cells(
        model,
        list(real_labels),
        steps=sampling.DEFAULT_STEPS if steps is None else steps,
        guidance=sampling.DEFAULT_GUIDANCE if guidance is None else guidance,
        seed=seed,
        progress=progress,
    )
    origins = {
        REAL: origins or [""] * len(real_labels),
        SYNTHETIC: [f"seed {s}" for s in cells.seeds],
    }
    return build_panel(real, real_labels, cells.images, cells.labels, seed, origins)


def normalise_answer(answer):
    """'real' / 'synthetic' from the ways people write them; None for a blank answer."""
    text = str(answer or "").strip().lower()
    if not text:
        return None
    if text not in ANSWER_WORDS:
        raise ValueError(f"Answer {answer!r} is neither real (R) nor synthetic (S).")
    return ANSWER_WORDS[text]


def binomial_summary(correct, n):
    """Accuracy, 95 % Clopper-Pearson interval and one-sided p-value against chance (0.5)."""
    from scipy.stats import binomtest

    if n == 0:
        nan = float("nan")
        return {
            "n": 0,
            "correct": 0,
            "accuracy": nan,
            "ci_low": nan,
            "ci_high": nan,
            "p_value": nan,
        }
    interval = binomtest(correct, n, 0.5).proportion_ci(0.95, method="exact")
    return {
        "n": int(n),
        "correct": int(correct),
        "accuracy": correct / n,
        "ci_low": float(interval.low),
        "ci_high": float(interval.high),
        "p_value": float(binomtest(correct, n, 0.5, alternative="greater").pvalue),
    }


def score(answers, key):
    """Score answers against the key.

    Parameters
    ----------
    answers : dict or list of dict
        ``{item: answer}`` or rows with ``item`` and ``answer`` columns; answers as accepted by
        :func:`normalise_answer`. Unanswered items are left out of the score and counted.
    key : list of dict
        Rows with ``item``, ``truth`` and ``label``.

    Returns
    -------
    dict
        ``overall``, ``by_class`` and ``by_truth`` (each a :func:`binomial_summary`),
        ``better_than_chance`` (one-sided p < 0.05), ``unanswered``.
    """
    if not isinstance(answers, dict):
        answers = _by_item([(row["item"], row.get("answer")) for row in answers], "answers")
    answers = {_item(item): normalise_answer(answer) for item, answer in answers.items()}
    key = _checked_key(key)
    known = {row["item"] for row in key}
    unknown = sorted(set(answers) - known)
    if unknown:
        raise ValueError(f"Answers for items not in the key: {unknown[:10]}; wrong key file?")
    answered = [row for row in key if answers.get(row["item"]) is not None]
    hits = {row["item"]: answers[row["item"]] == row["truth"] for row in answered}

    def summary(rows):
        return binomial_summary(sum(hits[r["item"]] for r in rows), len(rows))

    overall = summary(answered)
    return {
        "overall": overall,
        "better_than_chance": bool(overall["n"] and overall["p_value"] < ALPHA),
        "by_class": {
            label: summary([r for r in answered if r["label"] == label])
            for label in sorted({r["label"] for r in answered})
        },
        "by_truth": {
            truth: summary([r for r in answered if r["truth"] == truth])
            for truth in (REAL, SYNTHETIC)
        },
        "unanswered": len(key) - len(answered),
    }


def _item(value):
    """An item number, from however a spreadsheet wrote it ("7", " 7 ", "7.0")."""
    try:
        number = float(str(value).strip())
    except ValueError:
        raise ValueError(f"Item {value!r} is not an item number.") from None
    if not number.is_integer() or number < 1:
        raise ValueError(f"Item {value!r} is not an item number (1, 2, 3, ...).")
    return int(number)


def _by_item(pairs, what):
    """{item: value}, refusing an item given twice with different values."""
    out = {}
    for item, value in pairs:
        item = _item(item)
        if item in out and normalise_answer(out[item]) != normalise_answer(value):
            raise ValueError(f"Item {item} appears twice in the {what} with different values.")
        out[item] = value
    return out


def _checked_key(key):
    """Key rows with integer items and canonical truths; each item once."""
    rows, seen = [], set()
    for row in key:
        item = _item(row["item"])
        if item in seen:
            raise ValueError(f"Item {item} appears twice in the key; the key is damaged.")
        seen.add(item)
        truth = normalise_answer(row["truth"])
        if truth is None:
            raise ValueError(f"Item {item} of the key has no truth (real or synthetic).")
        rows.append({**row, "item": item, "truth": truth})
    return rows


def score_rows(result):
    """The score as CSV rows: overall, then per truth, then per class."""
    rows = [{"group": "overall", **result["overall"]}]
    rows += [{"group": f"truth={t}", **s} for t, s in result["by_truth"].items()]
    rows += [{"group": f"class={c}", **s} for c, s in result["by_class"].items()]
    return rows


def score_text(result):
    """A short human-readable report of a score."""
    overall = result["overall"]
    if not overall["n"]:
        return "No answers to score."
    verdict = (
        "better than chance: the expert can tell them apart"
        if result["better_than_chance"]
        else "not better than chance"
    )
    lines = [
        f"accuracy {overall['accuracy']:.3f} ({overall['correct']}/{overall['n']}), "
        f"95% CI {overall['ci_low']:.3f}-{overall['ci_high']:.3f}",
        f"one-sided p = {overall['p_value']:.3g}: {verdict}",
    ]
    for label, s in result["by_class"].items():
        lines.append(
            f"  {label}: {s['accuracy']:.2f} ({s['correct']}/{s['n']}), "
            f"CI {s['ci_low']:.2f}-{s['ci_high']:.2f}"
        )
    if result["unanswered"]:
        lines.append(f"  {result['unanswered']} item(s) unanswered, not scored")
    return "\n".join(lines)


def write_csv(path, rows, columns):
    """Write dict rows with the given columns (extra keys are ignored), atomically."""
    from napari_cytodiffusion.core.io import atomic_write

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as partial, open(partial, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def read_csv(path, required):
    """Read dict rows, checking that the ``required`` columns are there.

    Accepts what spreadsheets write: a byte-order mark, and ``;`` as the separator.
    """
    from napari_cytodiffusion.core.io import read_table

    return read_table(path, required)


def check_panel_folder(out_dir):
    """Refuse an ``out_dir`` that holds a panel already (its key, or anything in ``panel/``).

    Writing over it would lose the key the expert's answers are scored with, or leave items
    of the old panel that no key row names.

    Raises
    ------
    ValueError
        If ``out_dir`` holds a panel.
    """
    out_dir = Path(out_dir)
    folder = out_dir / "panel"
    if (out_dir / "key.csv").exists() or (folder.is_dir() and any(folder.iterdir())):
        raise ValueError(
            f"{out_dir} holds a Turing panel already (key.csv or panel/); choose an empty "
            "folder or remove the old panel."
        )


def export_panel(panel, out_dir):
    """Write a panel for an expert and its key, kept apart.

    ``out_dir/panel/`` holds the shuffled images and an ``answers.csv`` to fill in (answer:
    real or synthetic); hand that folder to the expert. ``out_dir/key.csv`` is the key: keep
    it away from the expert and score with ``turing score``. A folder holding a panel already
    is refused (:func:`check_panel_folder`).

    Returns
    -------
    (panel folder, key path)
    """
    from PIL import Image

    from napari_cytodiffusion.core.io import atomic_write
    from napari_cytodiffusion.core.model.generation import to_uint8

    check_panel_folder(out_dir)
    folder = Path(out_dir) / "panel"
    folder.mkdir(parents=True, exist_ok=True)
    for image, row in zip(panel.images, panel.key, strict=True):
        with atomic_write(folder / row["file"]) as partial:
            Image.fromarray(to_uint8(image)).save(partial)
    template = [
        {"item": r["item"], "file": r["file"], "answer": "", "seconds": ""} for r in panel.key
    ]
    write_csv(folder / "answers.csv", template, ANSWER_COLUMNS)
    key_path = write_csv(Path(out_dir) / "key.csv", panel.key, KEY_COLUMNS)
    return folder, key_path
