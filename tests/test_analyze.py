"""Analysing smears: tiles counted once, lazily read images, triage, reports, a resumable
batch on a dask LocalCluster, and the command and widget over the same pipeline."""

import html
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from napari_cytodiffusion._sample_data import sample_path
from napari_cytodiffusion.cli import main
from napari_cytodiffusion.core import report
from napari_cytodiffusion.core.io import open_image, read_image
from napari_cytodiffusion.core.tasks.analyze import (
    BatchRequest,
    analysis_settings,
    analyze_files,
    analyze_smear,
    result_names,
    triage,
)

COLUMNS = ["id", "centroid_row", "centroid_col", "bbox_min_row", "bbox_max_col", "label"]


@pytest.fixture(scope="module")
def field_analysis(default_model):
    return analyze_smear(read_image(sample_path("cbc_lymphocyte")), default_model, "cbc")


def test_one_field_gives_cells_counts_and_a_triage(field_analysis, default_model):
    cells = field_analysis.cells
    assert len(cells) == 1 and set(COLUMNS) <= set(cells.columns)
    assert {f"p_{c}" for c in default_model.classes} <= set(cells.columns)
    assert {"uncertainty", "anomaly_score", "needs_review", "why"} <= set(cells.columns)
    # The cell's size and nucleus, in image pixels: what a nucleus-to-cell ratio needs.
    cell = cells.iloc[0]
    box = (cell.bbox_max_row - cell.bbox_min_row) * (cell.bbox_max_col - cell.bbox_min_col)
    assert 0.5 * box < cell.area < box and 0 < cell.nucleus_fraction < 1
    assert cell.equivalent_diameter == pytest.approx(2 * np.sqrt(cell.area / np.pi), rel=1e-3)
    assert field_analysis.counts["rbc"] > 5 and field_analysis.counts["wbc"] == 1
    assert field_analysis.differential()["count"].sum() == 1
    assert field_analysis.decision == "review"
    assert any("too few white cells" in reason for reason in field_analysis.reasons)


def test_tiles_count_each_cell_once(default_model):
    field = read_image(sample_path("cbc_lymphocyte"))
    mosaic = np.concatenate([field, field[:, ::-1], field], axis=1)  # 480 x 1920
    whole = analyze_smear(mosaic, default_model, rbc_diameter=80, tile_size=4096)
    tiled = analyze_smear(mosaic, default_model, rbc_diameter=80, tile_size=600)
    assert len(whole.cells) == len(tiled.cells) == 3
    # The same cells: the detector network sees a tile's edge within a few red cells of it,
    # so an outline may move by a few pixels, never by a tenth of a red cell (8 px here).
    np.testing.assert_allclose(
        np.sort(whole.cells["centroid_col"]), np.sort(tiled.cells["centroid_col"]), atol=8
    )
    # Red cells at a tile's edge are split differently, so their counts may differ a little.
    assert abs(whole.counts["rbc"] - tiled.counts["rbc"]) <= 0.15 * whole.counts["rbc"]


def test_a_large_tiff_is_read_lazily(tmp_path):
    import tifffile

    field = read_image(sample_path("cbc_lymphocyte"))
    big = np.tile(field, (9, 9, 1))  # 4320 x 5760: opened through zarr, not read whole
    tifffile.imwrite(tmp_path / "slide.tif", big, tile=(512, 512), compression="zlib")
    lazy = open_image(tmp_path / "slide.tif")
    assert not isinstance(lazy, np.ndarray) and lazy.shape == big.shape
    np.testing.assert_array_equal(np.asarray(lazy[1000:1010, 2000:2010]), big[1000:1010, 2000:2010])


def test_triage_reasons():
    rows = {
        "label": ["neutrophil"] * 150,
        "needs_review": [False] * 150,
        "anomaly_score": [0.0] * 150,
        "why": [""] * 150,
    }
    assert triage(pd.DataFrame(rows)) == ("release", [])
    # A differential counts leukocytes: platelets and erythroblasts called are not among them.
    few = {**rows, "label": ["neutrophil"] * 90 + ["platelet"] * 40 + ["erythroblast"] * 20}
    assert triage(pd.DataFrame(few)) == (
        "review",
        ["too few white cells counted: 90 (a differential needs 100)"],
    )
    rows["why"][3], rows["needs_review"][3] = "unlike any known class (anomaly 4.0)", True
    decision, reasons = triage(pd.DataFrame(rows))
    assert decision == "review" and "possible blasts" in reasons[0]
    large = {**rows, "why": [""] * 149 + ["too large for its class (1.4 x its largest)"]}
    assert triage(pd.DataFrame(large)) == (
        "review",
        [
            "1 cell(s) too large for the class they were called: those calls are likely wrong "
            "(defocus, compression or another stain?)"
        ],
    )
    shifted = {**rows, "anomaly_score": [2.0] * 150}
    assert any("unfamiliar stain" in r for r in triage(pd.DataFrame(shifted))[1])
    unfamiliar = {**rows, "domain_shift": [1.5] * 150, "softness": [0.2] * 150}
    (reason,) = [r for r in triage(pd.DataFrame(unfamiliar))[1] if "unfamiliar stain" in r]
    assert "domain shift 1.5" in reason and "check the focus" not in reason
    defocused = {**unfamiliar, "softness": [1.8] * 150}
    (reason,) = [r for r in triage(pd.DataFrame(defocused))[1] if "unfamiliar stain" in r]
    assert "softer than the training cells" in reason and "check the focus" in reason


def test_a_class_a_person_added_is_counted_and_reported(field_analysis, tmp_path):
    cells = field_analysis.cells.copy()
    cells["label"] = "blast"  # a person's call of a class the model lacks
    analysis = replace(field_analysis, cells=cells)
    counts = analysis.differential().set_index("class")
    assert counts.loc["blast", "count"] == 1 and counts.loc["blast", "percent"] == 100
    assert counts.loc[list(field_analysis.classes), "count"].sum() == 0
    assert analysis.summary()["percent_blast"] == 100
    page = report.write_smear(analysis, tmp_path / "cbc", sample_path("cbc_lymphocyte"))
    assert "blast" in page.read_text()


def test_class_names_are_shown_as_plain_text(field_analysis, tmp_path):
    name = r"a$\foo$b"  # matplotlib would read it as maths, and fail
    analysis = replace(field_analysis, cells=field_analysis.cells.assign(label=name))
    page = report.write_smear(analysis, tmp_path / "cbc")
    assert f"<td>{html.escape(name)}</td>" in page.read_text()
    labels = report._differential_figure(analysis.differential()).axes[0].get_yticklabels()
    assert name in [label.get_text() for label in labels]
    assert not any(label.get_parse_math() for label in labels)


def test_report_says_what_its_counts_count(field_analysis):
    cells = pd.concat([field_analysis.cells] * 2, ignore_index=True)
    cells["id"], cells["label"] = [1, 2], ["lymphocyte", "platelet"]
    analysis = replace(field_analysis, cells=cells)
    page = report.report_html(analysis)
    # Every call, the leukocytes the differential is per, and the segmentation's platelets.
    assert "2 white cells classified" in page and "Per 100 leukocytes: 1 leukocyte," in page
    platelets = report.count_text(field_analysis.counts["platelet"], "platelet")
    assert f"{platelets} found by segmentation" in page
    # The classes counted apart are marked in the plot as in the table.
    assert "<td>platelet *</td>" in page
    labels = report._differential_figure(analysis.differential()).axes[0].get_yticklabels()
    assert "platelet *" in [label.get_text() for label in labels]


def test_a_smear_without_white_cells_has_every_column(field_analysis, default_model, tmp_path):
    blank = np.full((300, 300, 3), (230, 220, 210), np.uint8)
    analysis = analyze_smear(blank, default_model, "blank", rbc_diameter=30)
    report.write_smear(analysis, tmp_path / "blank")
    cells = pd.read_csv(tmp_path / "blank" / "cells.csv")
    assert cells.empty and list(cells.columns) == list(field_analysis.cells.columns)


def test_reasons_are_a_list_and_keep_their_semicolons(field_analysis, tmp_path):
    from napari_cytodiffusion.core.model.domain import SOFT_ADVICE

    reasons = [f"unfamiliar stain or scanner; {SOFT_ADVICE}; review", "too few white cells"]
    analysis = replace(field_analysis, reasons=reasons)
    report.write_smear(analysis, tmp_path / "cbc", sample_path("cbc_lymphocyte"))
    assert json.loads((tmp_path / "cbc" / "triage.json").read_text())["reasons"] == reasons
    report.write_summary_rows(tmp_path, report.summary_rows(tmp_path))
    (joined,) = pd.read_csv(tmp_path / "summary.csv")["reasons"]
    assert joined.split(report.REASONS_SEPARATOR) == reasons


def test_results_of_an_earlier_version_leave_the_summary(field_analysis, tmp_path):
    source = sample_path("cbc_lymphocyte")
    folder = tmp_path / "cbc"
    report.write_smear(field_analysis, folder, source)
    # Version 3 wrote the reasons as one string: such results are made again, not read.
    row = json.loads((folder / "triage.json").read_text())
    (folder / "triage.json").write_text(json.dumps({**row, "reasons": "; ".join(row["reasons"])}))
    marker = report.read_marker(folder)
    (folder / report.FINISHED).write_text(json.dumps({**marker, "version": 3}))
    assert not report.finished(folder, report.fingerprint(source))
    assert report.summary_rows(tmp_path) == []


def test_a_summary_without_finished_smears_has_its_header(field_analysis, tmp_path):
    report.write_summary_rows(tmp_path, [])
    empty = pd.read_csv(tmp_path / "summary.csv")
    columns = [name for name in field_analysis.summary() if not name.startswith("percent_")]
    assert empty.empty and list(empty.columns) == columns


def test_report_files_are_written_atomically(field_analysis, tmp_path, monkeypatch):
    folder = tmp_path / "cbc"
    source = sample_path("cbc_lymphocyte")
    page = report.write_smear(field_analysis, folder, source)
    # The differential plot, the overview, and one image per flagged cell.
    images = 2 + len(field_analysis.flagged_crops)
    assert page.read_text().count("data:image/png;base64,") == images
    assert report.finished(folder, report.fingerprint(source))
    written = {p.name for p in folder.iterdir()}
    assert written == {"cells.csv", "differential.csv", "triage.json", "report.html", "done.json"}
    # New results whose report fails leave every earlier file as it was, not a mix of old and
    # new, and no "finished" marker.
    (folder / "done.json").unlink()
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def crash(_):
        raise OSError("disk full")

    monkeypatch.setattr(report, "report_html", crash)
    again = replace(field_analysis, cells=field_analysis.cells.assign(label="blast"))
    with pytest.raises(OSError, match="disk full"):
        report.write_smear(again, folder, source)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert not report.finished(folder, report.fingerprint(source))


def test_batch_on_a_local_cluster_resumes_and_reports_failures(tmp_path, capfd):
    smears = tmp_path / "smears"
    smears.mkdir()
    for name in ("pbc_lymphocyte", "cbc_lymphocyte"):
        shutil.copy(sample_path(name), smears / f"{name}.jpg")
    (smears / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    ended = []
    request = BatchRequest(paths=[smears], out=out, workers=1)
    result = analyze_files(request, on_smear=lambda name, a, e: ended.append((name, e is None)))
    assert sorted(result.analysed) == ["cbc_lymphocyte.jpg", "pbc_lymphocyte.jpg"]
    assert "broken.png" in result.failed and ("broken.png", False) in ended
    assert result.failed["broken.png"].startswith("Cannot read")
    # A person's unreadable file is reported in one line, not logged by dask as a crash.
    assert "Compute Failed" not in capfd.readouterr().err
    summary = pd.read_csv(out / "summary.csv")
    assert sorted(summary["smear"]) == ["cbc_lymphocyte.jpg", "pbc_lymphocyte.jpg"]
    triage_row = json.loads((out / "pbc_lymphocyte.jpg" / "triage.json").read_text())
    assert triage_row["white_cells"] == triage_row["leukocytes"] == 1
    again = analyze_files(request)
    assert sorted(again.skipped) == ["cbc_lymphocyte.jpg", "pbc_lymphocyte.jpg"]
    assert not again.analysed and "broken.png" in again.failed


def _batch(paths, out, **settings):
    """``analyze_files`` on a local cluster of one worker."""
    return analyze_files(BatchRequest(paths=paths, out=out, workers=1, **settings))


def test_a_smear_is_analysed_again_when_its_annotations_or_settings_change(tmp_path):
    from napari_cytodiffusion.core.annotations import Annotations, CellAnnotation, save_annotations

    smear = tmp_path / "a.jpg"
    shutil.copy(sample_path("pbc_lymphocyte"), smear)
    out = tmp_path / "out"
    assert _batch([smear], out).analysed == ["a.jpg"]
    cell = pd.read_csv(out / "a.jpg" / "cells.csv").iloc[0]
    review = CellAnnotation((cell.centroid_row, cell.centroid_col), "platelet")
    save_annotations(Annotations("a.jpg", read_image(smear).shape, [review]), smear)
    assert _batch([smear], out).analysed == ["a.jpg"]
    assert pd.read_csv(out / "a.jpg" / "cells.csv")["annotated"].tolist() == ["platelet"]
    changed = {"rbc_diameter": 40, "tile_size": 300, "seed": 3}
    assert _batch([smear], out, **changed).analysed == ["a.jpg"]
    assert _batch([smear], out, **changed).skipped == ["a.jpg"]


def test_every_setting_that_changes_the_results_is_part_of_their_fingerprint(tmp_path):
    from napari_cytodiffusion.core.model.weights import model_path

    base = BatchRequest(paths=[], out=tmp_path)
    changes = {
        "model": str(model_path("default")),
        "rbc_diameter": 40.0,
        "tile_size": 300,
        "strategy": "full",
        "seed": 3,
        "ignore_annotations": True,
    }
    for name, value in changes.items():
        assert analysis_settings(replace(base, **{name: value})) != analysis_settings(base), name
    assert analysis_settings(replace(base, workers=3)) == analysis_settings(base)


def test_a_smear_that_now_fails_leaves_the_summary(tmp_path):
    smears = tmp_path / "smears"
    smears.mkdir()
    for name in ("pbc_lymphocyte", "cbc_lymphocyte"):
        shutil.copy(sample_path(name), smears / f"{name}.jpg")
    out = tmp_path / "out"
    _batch([smears], out)
    broken = smears / "pbc_lymphocyte.jpg"
    broken.write_bytes(broken.read_bytes()[:2000])  # a truncated JPEG
    result = _batch([smears], out)
    assert list(result.failed) == ["pbc_lymphocyte.jpg"]
    assert result.skipped == ["cbc_lymphocyte.jpg"]
    assert pd.read_csv(out / "summary.csv")["smear"].tolist() == ["cbc_lymphocyte.jpg"]
    assert report.summary_rows(out) == [
        json.loads((out / "cbc_lymphocyte.jpg/triage.json").read_text())
    ]


def test_results_folders_stay_with_their_source(tmp_path):
    first, second = tmp_path / "d1" / "x.jpg", tmp_path / "d2" / "x.jpg"
    for path, name in ((first, "pbc_lymphocyte"), (second, "cbc_lymphocyte")):
        path.parent.mkdir()
        shutil.copy(sample_path(name), path)
    out = tmp_path / "out"
    both = _batch([first, second], out)
    assert len(set(both.analysed)) == 2
    written = {path: path.read_bytes() for path in out.glob("*/cells.csv")}
    again = _batch([second], out)
    assert not again.analysed and again.skipped == result_names([second], out)
    assert {path: path.read_bytes() for path in out.glob("*/cells.csv")} == written
    summary = pd.read_csv(out / "summary.csv")
    assert sorted(summary["smear"]) == sorted(both.analysed)
    # The folder names alone do not tell the two apart: the summary and each smear's files
    # name the input.
    assert sorted(summary["source"]) == sorted(str(path.resolve()) for path in (first, second))
    for name, source in zip(summary["smear"], summary["source"], strict=True):
        assert json.loads((out / name / "triage.json").read_text())["source"] == source
        page = (out / name / "report.html").read_text()
        assert f"<h1>{name}</h1><p>{html.escape(source)}</p>" in page


def test_a_folder_holding_another_smear_is_never_reused(field_analysis, tmp_path):
    first, second = tmp_path / "d1" / "x.jpg", tmp_path / "d2" / "x.jpg"
    for path in (first, second):
        path.parent.mkdir()
        shutil.copy(sample_path("cbc_lymphocyte"), path)
    out = tmp_path / "out"
    report.write_smear(field_analysis, out / "x.jpg", first)
    (name,) = result_names([second], out)
    assert name.startswith("x.jpg-") and result_names([first], out) == ["x.jpg"]
    # The same names whatever the order and company of the sources.
    assert result_names([second, first], out) == [name, "x.jpg"]


def test_triage_json_is_valid_json_without_leukocytes(field_analysis, tmp_path):
    cells = field_analysis.cells.copy()
    cells["label"] = "platelet"  # no leukocyte: no rate per 100 of them
    report.write_smear(replace(field_analysis, cells=cells), tmp_path / "cbc")

    def reject(constant):
        raise ValueError(f"{constant} is not JSON")

    row = json.loads((tmp_path / "cbc" / "triage.json").read_text(), parse_constant=reject)
    assert row["leukocytes"] == 0 and row["percent_platelet"] is None


def _maths_threads():
    import os

    return os.environ.get("OMP_NUM_THREADS")


def test_workers_share_the_cores_whatever_the_shell_says(tmp_path, monkeypatch):
    import os

    from napari_cytodiffusion.core.tasks.analyze import _client

    monkeypatch.setenv("OMP_NUM_THREADS", "7")  # a shell's setting; an earlier cluster's too
    request = BatchRequest(paths=[], out=tmp_path, workers=2)
    with _client(request) as (client, threads):
        expected = str(max(1, (os.cpu_count() or 1) // 2))
        assert threads == int(expected)
        assert set(client.run(_maths_threads).values()) == {expected}
    assert os.environ["OMP_NUM_THREADS"] == "7"


def test_analyze_command(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(
        ["analyze", str(sample_path("pbc_lymphocyte")), "--out", str(out), "--workers", "1"]
    )
    captured = capsys.readouterr()
    assert code == 0
    source = Path(sample_path("pbc_lymphocyte")).resolve()  # the whole path, not the name
    assert f"{source}: review (1 white cell," in captured.out
    assert (out / "pbc_lymphocyte.jpg" / "report.html").is_file()
    assert main(["analyze", str(tmp_path / "missing.png"), "--out", str(out)]) == 2
    assert "No such file" in capsys.readouterr().err
    elsewhere = tmp_path / "elsewhere"
    image = str(sample_path("pbc_lymphocyte"))
    assert main(["analyze", image, "--out", str(elsewhere), "--model", "no-such-model"]) == 2
    assert "neither a model name" in capsys.readouterr().err and not elsewhere.exists()


def test_widget_analyses_the_open_image(make_napari_viewer, qtbot, tmp_path):
    viewer = make_napari_viewer()
    viewer.add_image(read_image(sample_path("cbc_lymphocyte")), name="field", rgb=True)
    widget = _analyze_widget(viewer, tmp_path)
    # A batch analysed a smear named "field" into the folder before: its marker must no
    # longer call the folder's files its finished results once the widget has written them.
    (tmp_path / "field").mkdir()
    batch = report.fingerprint(sample_path("cbc_lymphocyte"))
    (tmp_path / "field" / report.FINISHED).write_text(json.dumps(batch))
    widget._run.native.click()
    qtbot.waitUntil(lambda: widget.analysis is not None, timeout=120_000)
    qtbot.waitUntil(lambda: not widget._runner.running, timeout=10_000)
    assert not report.finished(tmp_path / "field", batch)
    assert [layer.name for layer in viewer.layers] == ["field", "field cells", "field needs review"]
    assert all(layer.visible for layer in viewer.layers)  # new layers are shown a step later
    cells = viewer.layers["field cells"]
    assert len(cells.data) == 1 and "label" in cells.features
    assert (tmp_path / "field" / "report.html").is_file()
    assert "report" in widget._status.value.lower()
    # Run again: the same layers take the new result.
    cells.border_color = [[0.0, 0.0, 0.0, 1.0]]
    widget.analysis = None
    widget._run.native.click()
    qtbot.waitUntil(lambda: widget.analysis is not None, timeout=120_000)
    qtbot.waitUntil(lambda: not widget._runner.running, timeout=10_000)
    assert [layer.name for layer in viewer.layers] == ["field", "field cells", "field needs review"]
    assert viewer.layers["field cells"] is cells and len(cells.data) == 1
    assert cells.border_color[0].tolist() != [0.0, 0.0, 0.0, 1.0]  # the class colour again


def test_widget_names_the_file_an_image_was_opened_from(make_napari_viewer, qtbot, tmp_path):
    viewer = make_napari_viewer()
    (layer,) = viewer.open(sample_path("cbc_lymphocyte"), plugin="napari")
    widget = _analyze_widget(viewer, tmp_path / "results")
    widget._run.native.click()
    qtbot.waitUntil(lambda: widget.analysis is not None, timeout=120_000)
    qtbot.waitUntil(lambda: not widget._runner.running, timeout=10_000)
    source = str(Path(sample_path("cbc_lymphocyte")).resolve())
    assert widget.analysis.source == source
    triage = json.loads((tmp_path / "results" / layer.name / "triage.json").read_text())
    assert triage["source"] == source


def test_widget_cancel_within_a_tile_adds_nothing(
    make_napari_viewer, qtbot, tmp_path, cancel_latency
):
    field = read_image(sample_path("cbc_monocyte_eosinophil"))
    viewer = make_napari_viewer()
    viewer.add_image(np.tile(field, (2, 2, 1)), name="four", rgb=True)
    widget = _analyze_widget(viewer, tmp_path)
    widget._run.native.click()
    # One tile holds the whole image: cancel while its cells are classified.
    qtbot.waitUntil(lambda: widget._runner._state["done"] > 400, timeout=60_000)
    assert cancel_latency(widget) < 1.0
    assert widget._status.value.startswith("cancelled")
    assert [layer.name for layer in viewer.layers] == ["four"]
    assert not (tmp_path / "four").exists()


def _analyze_widget(viewer, out):
    """The docked Analyze widget writing to ``out``, on the CPU, the report not opened."""
    from napari_cytodiffusion._widgets._analyze import AnalyzeWidget

    widget = AnalyzeWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget._out.value = out
    widget._open.value = False
    widget._fields.device.value = "cpu"
    return widget
