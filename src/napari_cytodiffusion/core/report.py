"""The files of an analysed smear, and the self-contained HTML report a person reads.

``DIR/<smear>/`` holds ``cells.csv`` (one row per white cell), ``differential.csv``,
``triage.json`` and ``report.html``; ``done.json`` is written last and marks the folder
finished for its source, as it was, with the model and settings used (:func:`fingerprint`).
Every file's content is made before any is written, so a smear whose report cannot be made
leaves the folder's earlier files as they were, not a mix of old and new. Each is written under
a temporary name and renamed when complete, so a run killed at any moment leaves no
half-written file under a final name, and a folder without a finished ``done.json`` is simply
analysed again. Before a folder's results are made again its marker is turned unfinished
(:func:`mark_unfinished`): it still names the folder's source, but the old results leave the
summary until the new ones are complete. A batch's files are covered by its marker from the
first one written, so a batch stopped and started again knows them for its own.
"""

import base64
import html
import io
import json
import math
from pathlib import Path

import numpy as np

from napari_cytodiffusion.core.io import atomic_write

FINISHED = "done.json"
SUMMARY = "summary.csv"
# The files of a smear's results, besides its marker.
RESULT_FILES = ("cells.csv", "differential.csv", "triage.json", "report.html")
# Bump when the files a smear gets change, so older results are made again.
# 2: cells.csv gives each cell's area, diameter and nucleus fraction;
# 3: triage.json writes null for a missing rate; the marker records the settings;
# 4: triage.json names the source and lists the reasons; cells.csv of a smear without white
# cells has every column; the report names the source and the leukocytes counted.
OUTPUT_VERSION = 4
# summary.csv's first columns (then percent_<class>), there even when no smear is finished.
SUMMARY_COLUMNS = (
    "smear",
    "source",
    "decision",
    "reasons",
    "white_cells",
    "leukocytes",
    "flagged",
    "red_cells",
    "platelets",
    "rbc_diameter_px",
)
# summary.csv joins a smear's reasons with this: a reason may hold a semicolon.
REASONS_SEPARATOR = " | "


def file_identity(path):
    """A file's resolved path, size and modification time; size and time None when absent."""
    path = Path(path).resolve()
    try:
        stat = path.stat()
    except FileNotFoundError:
        return {"path": str(path), "size": None, "mtime_ns": None}
    return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def fingerprint(source, settings=None, inputs=()):
    """What a smear's results depend on, for resuming: ``done.json`` of a finished folder.

    Parameters
    ----------
    source : path
        The smear's file or OME-Zarr folder, identified by :func:`file_identity`.
    settings : dict, optional
        The model and settings the results were made with (JSON-serialisable).
    inputs : sequence of path
        Other files the results depend on (a smear's annotations), present or not: one
        appearing, changing or going away makes the results stale too.
    """
    return {
        "version": OUTPUT_VERSION,
        "finished": True,
        "source": file_identity(source),
        "inputs": [file_identity(path) for path in inputs],
        "settings": settings or {},
    }


def read_marker(folder):
    """The ``done.json`` of ``folder`` as a dict; None when it has none or it is unreadable."""
    try:
        marker = json.loads((Path(folder) / FINISHED).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def finished(folder, expected):
    """True if ``folder`` holds complete results made as the :func:`fingerprint` ``expected``
    describes."""
    return read_marker(folder) == expected


def marker_source(marker):
    """The resolved path of the source a marker's folder belongs to, or None."""
    source = (marker or {}).get("source")
    # Version 2 markers named the source by its path alone.
    return source.get("path") if isinstance(source, dict) else source


def folder_source(folder):
    """The resolved path of the source whose results ``folder`` holds: its marker's (a
    batch's results), else its ``triage.json``'s (the *Analyze smear* widget's); None when
    neither names one."""
    source = marker_source(read_marker(folder))
    if source:
        return source
    try:
        row = json.loads((Path(folder) / "triage.json").read_text())
    except (OSError, ValueError):
        return None
    return row.get("source") if isinstance(row, dict) else None


def up_to_date(marker):
    """True if a marker says finished, by this version, and its source and other inputs are
    still as they were when the results were made."""
    if not marker or not marker.get("finished") or marker.get("version") != OUTPUT_VERSION:
        return False
    recorded = [marker["source"], *marker["inputs"]]
    return all(file_identity(item["path"]) == item for item in recorded)


def mark_unfinished(folder, remade_with=None):
    """Mark ``folder``'s results as no longer finished, atomically, keeping whose they are;
    nothing to do for a folder without a marker.

    ``remade_with``: the :func:`fingerprint` of the run that makes them again, recorded
    instead, so that the run, stopped and started again, knows the folder for its own.
    """
    marker = read_marker(folder)
    if marker is None:
        return
    unfinished = {**(remade_with or marker), "finished": False}
    if unfinished != marker:
        _write_text(Path(folder) / FINISHED, json.dumps(unfinished))


def write_smear(analysis, folder, source=None, marker=None):
    """Write every file of one analysed smear into ``folder``; ``done.json`` last.

    Parameters
    ----------
    analysis : SmearAnalysis
    folder : path
    source : path, optional
        The smear's file: ``done.json`` marks the folder finished for it as it is now.
    marker : dict, optional
        The :func:`fingerprint` to mark the folder with instead, taken before the smear was
        read, so that a file changed meanwhile is analysed again.

    Returns
    -------
    Path
        The HTML report.
    """
    folder = Path(folder)
    # "\n": writing the text gives the platform's line ends.
    contents = {
        "cells.csv": analysis.cells.to_csv(index=False, lineterminator="\n"),
        "differential.csv": analysis.differential().to_csv(index=False, lineterminator="\n"),
        "triage.json": json_text(analysis.summary(), indent=1),
        "report.html": report_html(analysis),
    }
    if marker is None and source is not None:
        marker = fingerprint(source)
    folder.mkdir(parents=True, exist_ok=True)
    if marker is not None:
        # The files under way are this run's: stopped, it continues without asking.
        _write_text(folder / FINISHED, json.dumps({**marker, "finished": False}))
    for name, text in contents.items():
        _write_text(folder / name, text)
    if marker is not None:
        _write_text(folder / FINISHED, json.dumps(marker))
    return folder / "report.html"


def json_text(row, **options):
    """``row`` (a dict of numbers, strings and lists) as strict JSON: a missing number (NaN)
    is written as null."""
    finite = {
        key: None if isinstance(value, float) and not math.isfinite(value) else value
        for key, value in row.items()
    }
    return json.dumps(finite, allow_nan=False, **options)


def write_summary_rows(out_dir, rows):
    """``DIR/summary.csv``: one row per smear (decision, reasons joined by
    :data:`REASONS_SEPARATOR`, counts, differential); the header alone without any.

    A class one smear has and another lacks (a person's ``blast``, say) is 0 per 100 in the
    other; blank only where there is no rate (a smear without leukocytes).
    """
    import pandas as pd

    lines = [{**row, "reasons": REASONS_SEPARATOR.join(row["reasons"])} for row in rows]
    table = pd.DataFrame(lines) if lines else pd.DataFrame(columns=SUMMARY_COLUMNS)
    counted = table["leukocytes"] > 0
    for column in (name for name in table.columns if name.startswith("percent_")):
        table.loc[counted & table[column].isna(), column] = 0.0
    path = Path(out_dir) / SUMMARY
    with atomic_write(path) as partial:
        table.to_csv(partial, index=False)
    return path


def summary_rows(out_dir):
    """The triage rows of every smear folder under ``out_dir`` whose results are finished and
    still match their source and annotations (:func:`up_to_date`), by folder name."""
    rows = []
    for path in sorted(Path(out_dir).glob(f"*/{FINISHED}")):
        if not up_to_date(read_marker(path.parent)):
            continue
        try:
            rows.append(json.loads((path.parent / "triage.json").read_text()))
        except (OSError, ValueError):
            continue
    return rows


def _write_text(path, text):
    with atomic_write(path) as partial:
        Path(partial).write_text(text, encoding="utf-8")


def count_text(count, noun):
    """A count and its noun, singular for one.

    Examples
    --------
    >>> count_text(1, "white cell"), count_text(0, "platelet")
    ('1 white cell', '0 platelets')
    """
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def percent_text(percent):
    """A differential's rate per 100 leukocytes as shown: one decimal, or a dash where there
    is none (no leukocyte to count per).

    Examples
    --------
    >>> percent_text(12.345), percent_text(float("nan"))
    ('12.3', '-')
    """
    return "-" if np.isnan(percent) else f"{percent:.1f}"


def report_html(analysis):
    """A self-contained HTML page: triage, counts, differential plot, overview, flagged cells."""
    title = html.escape(analysis.name)
    # Two smears may share a file name: the path tells them apart.
    source = f"<p>{html.escape(analysis.source)}</p>" if analysis.source else ""
    decision = analysis.decision.upper()
    reasons = "".join(f"<li>{html.escape(r)}</li>" for r in analysis.reasons) or (
        "<li>nothing needs a person's eyes</li>"
    )
    counts = analysis.differential()
    labels = class_labels(counts)
    rows = "".join(
        f"<tr><td>{html.escape(label)}</td><td>{n}</td><td>{percent_text(p)}</td></tr>"
        for label, n, p in zip(labels, counts["count"], counts["percent"], strict=True)
    )
    found = analysis.counts
    # The segmentation's platelets, apart from the white-cell detections called platelet.
    summary = (
        f"{count_text(len(analysis.cells), 'white cell')} classified, "
        f"{int(analysis.cells['needs_review'].sum())} flagged. "
        f"{count_text(found['rbc'], 'red cell')} and {count_text(found['platelet'], 'platelet')}"
        " found by segmentation"
    )
    leukocytes = count_text(analysis.leukocytes(counts), "leukocyte")
    plot = _png(_rgb(_differential_figure(counts)))
    overview = _png(_overview(analysis))
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{title}: napari-cytodiffusion report</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}
.review{{color:#b00020}}.release{{color:#1b5e20}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 8px;text-align:right}}
figure{{display:inline-block;margin:4px;text-align:center;font-size:11px;width:140px}}
img.cell{{width:128px;height:128px;image-rendering:pixelated}}</style></head>
<body><h1>{title}</h1>{source}
<h2 class="{analysis.decision}">{decision}</h2><ul>{reasons}</ul>
<p>{summary}. Image
{analysis.shape[1]} x {analysis.shape[0]} px, red-cell diameter {analysis.rbc_diameter:.1f} px.</p>
<h2>Differential count</h2><p>Per 100 leukocytes: {leukocytes}, the white cells of the classes
without *.</p>
<table><tr><th>class</th><th>count</th><th>per 100</th></tr>{rows}</table>
<p>* counted per 100 leukocytes, not among them: not part of the 100 %.</p>
<p><img alt="differential" src="data:image/png;base64,{plot}"></p>
<h2>The smear</h2><p>White cells outlined in the colour of their class; flagged cells in red.</p>
<p><img alt="overview" style="max-width:100%" src="data:image/png;base64,{overview}"></p>
<h2>Flagged cells</h2>{_contact_sheet(analysis)}
<p style="color:#666">Made by napari-cytodiffusion. Calls and flags support, and do not
replace, a person's review.</p></body></html>
"""


def _contact_sheet(analysis):
    if not analysis.flagged_crops:
        return "<p>No cell was flagged.</p>"
    cells = analysis.cells.set_index("id")
    figures = []
    for cell_id, crop in analysis.flagged_crops.items():
        row = cells.loc[cell_id]
        caption = html.escape(f"cell {cell_id}: {row['label']}; {row['why']}")
        figures.append(
            f'<figure><img class="cell" src="data:image/png;base64,{_png(crop)}">'
            f"<figcaption>{caption}</figcaption></figure>"
        )
    return "".join(figures)


def _overview(analysis):
    """The overview image with every white cell's box drawn in its class colour."""
    from PIL import Image, ImageDraw

    colours = class_colours(tuple(analysis.differential()["class"]))  # a person's new too
    image = Image.fromarray(analysis.overview)
    draw = ImageDraw.Draw(image)
    factor = analysis.overview_factor
    width = max(1, int(round(image.width / 400)))
    for row in analysis.cells.itertuples():
        box = [
            row.bbox_min_col / factor,
            row.bbox_min_row / factor,
            row.bbox_max_col / factor,
            row.bbox_max_row / factor,
        ]
        colour = "#ff0000" if row.needs_review else colours.get(row.label, "#ffffff")
        draw.ellipse(box, outline=colour, width=width)
    return np.asarray(image)


def class_labels(counts):
    """A differential's classes as the report shows them: those counted apart marked *."""
    return [
        name if inside else f"{name} *"
        for name, inside in zip(counts["class"], counts["in_differential"], strict=True)
    ]


def _differential_figure(counts):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 2.6), dpi=100)
    axis = figure.subplots()
    colours = class_colours(tuple(counts["class"]))
    positions = np.arange(len(counts))
    axis.barh(positions, counts["percent"], color=[colours[c] for c in counts["class"]])
    # Plain text: matplotlib reads a person's class name with two "$" as maths, or fails.
    axis.set_yticks(positions, class_labels(counts), parse_math=False)
    axis.set_xlabel("per 100 leukocytes (* not among them)")
    axis.invert_yaxis()
    figure.tight_layout()
    return figure


def _rgb(figure):
    from PIL import Image

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))


def _png(image):
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image)).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


# Colour-blind-friendly colours (Okabe-Ito and Tol) for the standard classes; other classes
# take the remaining colours of the palette in turn.
KNOWN_COLOURS = {
    "basophil": "#0072B2",
    "eosinophil": "#E69F00",
    "erythroblast": "#CC79A7",
    "immature_granulocyte": "#D55E00",
    "lymphocyte": "#56B4E9",
    "monocyte": "#009E73",
    "neutrophil": "#F0E442",
    "platelet": "#999999",
}
SPARE_COLOURS = ("#882255", "#44AA99", "#117733", "#332288", "#AA4499", "#DDCC77", "#88CCEE")


def class_colours(classes):
    """{class: colour} for a model's classes, the same in the viewer and the report."""
    spare = iter(SPARE_COLOURS * (1 + len(classes) // len(SPARE_COLOURS)))
    return {name: KNOWN_COLOURS.get(name) or next(spare) for name in classes}
