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
from napari_cytodiffusion.core.annotations import (
    Annotations,
    CellAnnotation,
    encode_mask,
    save_annotations,
    sidecar_path,
)
from napari_cytodiffusion.core.io import open_image, read_image
from napari_cytodiffusion.core.tasks.analyze import (
    BatchRequest,
    analysis_settings,
    analyze_files,
    analyze_smear,
    hashed_name,
    result_names,
    triage,
)

COLUMNS = ["id", "centroid_row", "centroid_col", "bbox_min_row", "bbox_max_col", "label"]
# The white cell of the bundled cbc_lymphocyte field (480 x 640), and an empty place of it.
CBC_CELL = (179.0, 131.7)
CBC_EMPTY = (slice(300, 360), slice(400, 460))


@pytest.fixture(scope="module")
def field_analysis(default_model):
    return analyze_smear(read_image(sample_path("cbc_lymphocyte")), default_model, "cbc")


@pytest.fixture(scope="module")
def scheduler():
    """The address of a running dask cluster of one worker, as ``--scheduler`` takes it."""
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=1, threads_per_worker=1, host="127.0.0.1", dashboard_address=None
    ) as cluster:
        yield cluster.scheduler_address


def _cbc_review(*cells):
    """Annotations of the bundled cbc_lymphocyte field: the white cell called ``blast``, a
    cell painted where there is none (lymphocyte), and ``cells``."""
    painted = np.zeros((480, 640), bool)
    painted[CBC_EMPTY] = True
    review = [
        CellAnnotation(CBC_CELL, "blast", predicted="lymphocyte"),
        CellAnnotation((329.5, 429.5), "lymphocyte", added=True, mask=encode_mask(painted)),
        *cells,
    ]
    return Annotations("cbc_lymphocyte.jpg", (480, 640), review)


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


def test_painted_cells_are_counted_with_the_persons_label(default_model):
    image = read_image(sample_path("cbc_lymphocyte"))
    # A painted cell deleted since is not counted.
    deleted = CellAnnotation((50.0, 50.0), "deleted", added=True)
    # Small tiles: each cell, painted or not, belongs to the one tile holding its centroid.
    analysis = analyze_smear(image, default_model, tile_size=256, annotations=_cbc_review(deleted))
    cells = analysis.cells.set_index("added")
    assert len(cells) == 2 and cells.loc[False, "label"] == "blast"
    painted = cells.loc[True]
    assert painted["label"] == painted["annotated"] == "lymphocyte"
    assert painted["predicted"] in default_model.classes and not painted["needs_review"]
    box = [painted[f"bbox_{side}"] for side in ("min_row", "min_col", "max_row", "max_col")]
    assert box == [300, 400, 360, 460] and painted["area"] == 3600
    assert (painted["centroid_row"], painted["centroid_col"]) == (329.5, 429.5)
    assert np.isnan(painted["nucleus_fraction"])  # a person's outline: no nucleus measured
    counts = analysis.differential().set_index("class")["count"]
    assert counts["lymphocyte"] == counts["blast"] == 1


def test_annotations_of_another_image_are_refused(default_model):
    from napari_cytodiffusion.core.annotations import AnnotationError

    image = read_image(sample_path("pbc_lymphocyte"))
    with pytest.raises(AnnotationError, match="they belong to another image"):
        analyze_smear(image, default_model, annotations=_cbc_review())


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


def test_a_class_one_smear_lacks_is_none_of_its_leukocytes(field_analysis, tmp_path):
    rows = [field_analysis.summary() for _ in range(3)]
    for row, name, leukocytes in zip(rows, "abc", (1, 1, 0), strict=True):
        row["smear"], row["leukocytes"] = name, leukocytes  # c: no rate per 100 leukocytes
    rows[0]["percent_blast"] = 100.0  # a person's class in one smear
    report.write_summary_rows(tmp_path, rows)
    summary = pd.read_csv(tmp_path / "summary.csv").set_index("smear")["percent_blast"]
    assert summary["a"] == 100 and summary["b"] == 0 and np.isnan(summary["c"])


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
    # A sidecar made for another image (a copied or renamed file) is refused, not applied.
    shutil.copy(sample_path("pbc_lymphocyte"), smears / "copied.jpg")
    save_annotations(_cbc_review(), smears / "copied.jpg")
    out = tmp_path / "out"
    ended = []
    request = BatchRequest(paths=[smears], out=out, workers=1)
    result = analyze_files(request, on_smear=lambda name, a, e: ended.append((name, e is None)))
    assert sorted(result.analysed) == ["cbc_lymphocyte.jpg", "pbc_lymphocyte.jpg"]
    assert "broken.png" in result.failed and ("broken.png", False) in ended
    assert result.failed["broken.png"].startswith("Cannot read")
    assert "they belong to another image" in result.failed["copied.jpg"]
    # A person's unreadable file is reported in one line, not logged by dask as a crash.
    assert "Compute Failed" not in capfd.readouterr().err
    summary = pd.read_csv(out / "summary.csv")
    assert sorted(summary["smear"]) == ["cbc_lymphocyte.jpg", "pbc_lymphocyte.jpg"]
    triage_row = json.loads((out / "pbc_lymphocyte.jpg" / "triage.json").read_text())
    assert triage_row["white_cells"] == triage_row["leukocytes"] == 1
    again = analyze_files(request)
    assert sorted(again.skipped) == ["cbc_lymphocyte.jpg", "pbc_lymphocyte.jpg"]
    assert not again.analysed and sorted(again.failed) == ["broken.png", "copied.jpg"]


def _batch(paths, out, **settings):
    """``analyze_files`` on a local cluster of one worker."""
    return analyze_files(BatchRequest(paths=paths, out=out, workers=1, **settings))


def test_a_smear_is_analysed_again_when_its_annotations_or_settings_change(tmp_path):
    smear = tmp_path / "a.jpg"
    shutil.copy(sample_path("pbc_lymphocyte"), smear)
    out = tmp_path / "out"
    assert _batch([smear], out).analysed == ["a.jpg"]
    cell = pd.read_csv(out / "a.jpg" / "cells.csv").iloc[0]
    review = CellAnnotation((cell.centroid_row, cell.centroid_col), "platelet")
    painted = np.zeros(read_image(smear).shape[:2], bool)
    painted[10:40, 10:40] = True  # a corner without cells
    added = CellAnnotation((24.5, 24.5), "monocyte", added=True, mask=encode_mask(painted))
    save_annotations(Annotations("a.jpg", painted.shape, [review, added]), smear)
    assert _batch([smear], out).analysed == ["a.jpg"]
    # A person's painted cell is counted with their label, in the workers' tiles too.
    cells = pd.read_csv(out / "a.jpg" / "cells.csv", keep_default_na=False)
    assert cells["annotated"].tolist() == ["platelet", "monocyte"]
    assert cells["added"].tolist() == [False, True] and cells["area"].tolist()[1] == 900
    changed = {"rbc_diameter": 40, "tile_size": 300, "seed": 3}
    assert _batch([smear], out, overwrite=True, **changed).analysed == ["a.jpg"]
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


def test_results_can_go_into_the_smears_own_folder(tmp_path, scheduler):
    folder = tmp_path / "smears"
    folder.mkdir()
    shutil.copy(sample_path("pbc_lymphocyte"), folder / "x.jpg")
    request = BatchRequest(paths=[folder], out=folder, scheduler=scheduler)
    (name,) = analyze_files(request).analysed
    # The smear's own file holds its name: its results take the name and a hash.
    assert name == hashed_name("x.jpg", (folder / "x.jpg").resolve())
    assert (folder / name / "report.html").is_file()
    assert analyze_files(request).skipped == [name]


def test_workers_read_the_smear_given_wherever_they_run(tmp_path, scheduler, monkeypatch):
    import os

    from distributed import Client

    here, there = tmp_path / "here", tmp_path / "there"
    for folder in (here, there):
        folder.mkdir()
    shutil.copy(sample_path("pbc_lymphocyte"), here / "x.jpg")
    (there / "x.jpg").write_bytes(b"another file of that name")
    monkeypatch.chdir(here)
    with Client(scheduler) as client:
        started_in = client.run(os.getcwd)
        client.run(os.chdir, str(there))  # a worker started in another folder
        try:
            result = analyze_files(BatchRequest(paths=["x.jpg"], out="out", scheduler=scheduler))
        finally:
            for folder in set(started_in.values()):
                client.run(os.chdir, folder)
    assert result.analysed == ["x.jpg"] and not result.failed
    triage_row = json.loads((here / "out" / "x.jpg" / "triage.json").read_text())
    assert triage_row["source"] == str((here / "x.jpg").resolve())


def _no_cuda():
    import torch

    return not torch.cuda.is_available()


@pytest.mark.skipif(not _no_cuda(), reason="this machine has a CUDA GPU")
def test_a_device_the_workers_lack_is_reported_in_one_line(tmp_path, scheduler, capfd):
    smear = tmp_path / "x.jpg"
    shutil.copy(sample_path("pbc_lymphocyte"), smear)
    # A local cluster runs on this machine: its devices are checked before any work.
    out = tmp_path / "out"
    assert main(["analyze", str(smear), "--out", str(out), "--device", "cuda"]) == 2
    assert "no CUDA GPU; use --device cpu" in capfd.readouterr().err and not out.exists()
    # A cluster's workers may have one: a worker that lacks it fails the smear in one line.
    request = BatchRequest(paths=[smear], out=out, scheduler=scheduler, device="cuda")
    result = analyze_files(request)
    assert "no CUDA GPU" in result.failed["x.jpg"]
    assert "Compute Failed" not in capfd.readouterr().err


def test_results_of_other_settings_are_replaced_only_when_asked(tmp_path, scheduler, capsys):
    smear = tmp_path / "x.jpg"
    shutil.copy(sample_path("pbc_lymphocyte"), smear)
    out = tmp_path / "out"
    request = BatchRequest(paths=[smear], out=out, scheduler=scheduler)
    analyze_files(request)
    cells = out / "x.jpg" / "cells.csv"
    cells.write_text(cells.read_text().replace("lymphocyte", "monocyte"))  # a person's edit
    edited = cells.read_bytes()
    with pytest.raises(ValueError, match="exists, from an earlier run with other settings"):
        analyze_files(replace(request, seed=1))
    command = ["analyze", str(smear), "--out", str(out), "--scheduler", scheduler]
    assert main([*command, "--seed", "1"]) == 2
    assert "replace the earlier results (--overwrite)" in capsys.readouterr().err
    assert cells.read_bytes() == edited
    assert analyze_files(replace(request, seed=1, overwrite=True)).analysed == ["x.jpg"]
    # A run of these settings stopped midway continues without asking.
    report.mark_unfinished(out / "x.jpg")
    cells.write_text("partly written")
    assert analyze_files(replace(request, seed=1)).analysed == ["x.jpg"]


def test_a_scheduler_that_cannot_be_reached_leaves_no_folder(tmp_path):
    import dask

    out = tmp_path / "out"
    request = BatchRequest(
        paths=[sample_path("pbc_lymphocyte")], out=out, scheduler="tcp://127.0.0.1:9"
    )
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        with pytest.raises(OSError, match="Timed out"):
            analyze_files(request)
    assert not out.exists()


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
    # A smear finished before is named by its path too.
    assert main(["analyze", str(sample_path("pbc_lymphocyte")), "--out", str(out)]) == 0
    assert f"{source}: finished before, skipped" in capsys.readouterr().out
    assert main(["analyze", str(tmp_path / "missing.png"), "--out", str(out)]) == 2
    assert "No such file" in capsys.readouterr().err
    elsewhere = tmp_path / "elsewhere"
    image = str(sample_path("pbc_lymphocyte"))
    assert main(["analyze", image, "--out", str(elsewhere), "--model", "no-such-model"]) == 2
    assert "neither a model name" in capsys.readouterr().err and not elsewhere.exists()


def test_widget_analyses_the_open_image(make_napari_viewer, qtbot, tmp_path):
    viewer = make_napari_viewer()
    viewer.add_image(read_image(sample_path("cbc_lymphocyte")), name="field", rgb=True)
    # Classify cells' review layer of the image: Analyze smear's flagged cells go apart.
    classify_review = viewer.add_points([[1.0, 2.0]], name="field needs review")
    widget = _analyze_widget(viewer, tmp_path)
    _analyze(widget, qtbot)
    names = ["field", "field needs review", "field cells", "field analysis flagged"]
    assert [layer.name for layer in viewer.layers] == names
    assert classify_review.data.tolist() == [[1.0, 2.0]]
    assert all(layer.visible for layer in viewer.layers)  # new layers are shown a step later
    cells = viewer.layers["field cells"]
    assert len(cells.data) == 1 and "label" in cells.features
    assert len(viewer.layers["field analysis flagged"].data) == 1
    assert (tmp_path / "field" / "report.html").is_file()
    assert "report" in widget._status.value.lower()
    # Run again: the same layers take the new result.
    cells.border_color = [[0.0, 0.0, 0.0, 1.0]]
    _analyze(widget, qtbot)
    assert [layer.name for layer in viewer.layers] == names
    assert viewer.layers["field cells"] is cells and len(cells.data) == 1
    assert cells.border_color[0].tolist() != [0.0, 0.0, 0.0, 1.0]  # the class colour again
    # Renamed, the image keeps its layers (tied by its id); another image of its first name
    # gets layers of its own.
    viewer.layers["field"].name = "renamed"
    other = viewer.add_image(read_image(sample_path("cbc_lymphocyte")), name="field", rgb=True)
    _analyze(widget, qtbot)  # the image chosen is still the renamed one
    assert len(viewer.layers) == 5 and viewer.layers["field cells"] is cells
    widget._image.value = other
    _analyze(widget, qtbot)
    assert len(viewer.layers) == 7 and viewer.layers["field cells"] is cells


def test_widget_names_the_file_an_image_was_opened_from(make_napari_viewer, qtbot, tmp_path):
    viewer = make_napari_viewer()
    (layer,) = viewer.open(sample_path("cbc_lymphocyte"), plugin="napari")
    widget = _analyze_widget(viewer, tmp_path / "results")
    # A batch analysed this smear into the folder before: its marker must no longer call the
    # folder's files its finished results once the widget has written them.
    folder = tmp_path / "results" / layer.name
    folder.mkdir(parents=True)
    batch = report.fingerprint(sample_path("cbc_lymphocyte"))
    (folder / report.FINISHED).write_text(json.dumps(batch))
    _analyze(widget, qtbot)
    assert not report.finished(folder, batch)
    source = str(Path(sample_path("cbc_lymphocyte")).resolve())
    assert widget.analysis.source == source
    assert json.loads((folder / "triage.json").read_text())["source"] == source


def test_widget_never_writes_into_another_images_results(make_napari_viewer, qtbot, tmp_path):
    first, second = tmp_path / "d1" / "x.jpg", tmp_path / "d2" / "x.jpg"
    for path, name in ((first, "cbc_lymphocyte"), (second, "pbc_lymphocyte")):
        path.parent.mkdir()
        shutil.copy(sample_path(name), path)
    out = tmp_path / "results"
    viewer = make_napari_viewer()
    (layer,) = viewer.open(first, plugin="napari")
    widget = _analyze_widget(viewer, out)
    _analyze(widget, qtbot)
    written = {path.name: path.read_bytes() for path in (out / "x").iterdir()}
    viewer.layers.remove(layer)
    (layer,) = viewer.open(second, plugin="napari")
    widget._image.value = layer
    _analyze(widget, qtbot)
    assert {path.name: path.read_bytes() for path in (out / "x").iterdir()} == written
    folder = out / hashed_name("x", second.resolve())
    assert json.loads((folder / "triage.json").read_text())["source"] == str(second.resolve())
    # An image not opened from a file cannot be told apart from the folder's: refused.
    viewer.layers.remove(layer)
    widget._image.value = viewer.add_image(read_image(second), name="x", rgb=True)
    widget._run.native.click()
    assert widget._status.value.startswith(f"not started: {out / 'x'} holds the results of")
    # A results folder that is a file is refused before any work, not after it.
    (tmp_path / "a file").write_text("the user's")
    widget._out.value = tmp_path / "a file"
    widget._run.native.click()
    assert widget._status.value.startswith("not started:") and "is a file" in widget._status.value
    assert not widget._runner.running


def test_widget_keeps_a_batchs_results_of_other_settings_unless_asked(
    make_napari_viewer, qtbot, tmp_path, field_analysis
):
    from napari_cytodiffusion._widgets._common import MODEL_FILE
    from napari_cytodiffusion.core.model.weights import model_path

    smear = tmp_path / "cbc.jpg"
    shutil.copy(sample_path("cbc_lymphocyte"), smear)
    viewer = make_napari_viewer()
    viewer.open(smear, plugin="napari")
    out = tmp_path / "results"
    folder = out / "cbc"
    # A batch of seed 1 analysed the smear into the layer's folder, and a person corrected it.
    corrected = replace(field_analysis, cells=field_analysis.cells.assign(label="blast"))
    _batch_results(corrected, folder, smear, seed=1)
    before = {path.name: path.read_bytes() for path in folder.iterdir()}
    widget = _analyze_widget(viewer, out)
    assert not widget._replace.value
    advice = "tick *replace earlier results* or choose another results folder."
    widget._run.native.click()
    assert widget._status.value == (
        f"not started: {folder} holds results a batch made with other settings "
        f"(seed 1 instead of seed 0): {advice}"
    )
    widget._fields.model.value = MODEL_FILE
    widget._fields.file.value = model_path("default")  # the same weights, as a file
    widget._run.native.click()
    assert "(another model, seed 1 instead of seed 0)" in widget._status.value
    assert not widget._runner.running and [layer.name for layer in viewer.layers] == ["cbc"]
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before
    # Asked, the widget replaces them, and the batch's marker no longer calls them its.
    widget._fields.model.value = "default"
    widget._replace.value = True
    _analyze(widget, qtbot)
    calls = field_analysis.cells["label"].tolist()
    assert _labels(folder) == calls and not report.read_marker(folder)["finished"]
    assert viewer.layers["cbc cells"].features["label"].tolist() == calls
    # Its own results are replaced without asking, as are a batch's of its settings.
    widget._replace.value = False
    for batch_seed in (None, 0):
        if batch_seed is not None:
            _batch_results(corrected, folder, smear, seed=batch_seed)
        _analyze(widget, qtbot)
        assert "Report:" in widget._status.value and _labels(folder) == calls


def _batch_results(analysis, folder, source, **settings):
    """``folder`` as a batch of ``settings`` leaves it: ``analysis``'s files, and the marker
    calling them its finished results of ``source``."""
    request = BatchRequest(paths=[source], out=folder.parent, **settings)
    marker = report.fingerprint(source, analysis_settings(request), [sidecar_path(source)])
    report.write_smear(analysis, folder, marker=marker)


def _labels(folder):
    return pd.read_csv(folder / "cells.csv")["label"].tolist()


def test_widget_applies_the_images_annotations(make_napari_viewer, qtbot, tmp_path):
    smear = tmp_path / "cbc.jpg"
    shutil.copy(sample_path("cbc_lymphocyte"), smear)
    viewer = make_napari_viewer()
    viewer.open(smear, plugin="napari")
    widget = _analyze_widget(viewer, tmp_path / "results")
    # A damaged or foreign sidecar is reported with what to do, before any work.
    sidecar_path(smear).write_text("{not json")
    widget._run.native.click()
    qtbot.waitUntil(lambda: widget._status.value.startswith("failed"), timeout=30_000)
    assert "move it away" in widget._status.value
    save_annotations(replace(_cbc_review(), shape=(10, 10)), smear)
    widget._run.native.click()
    qtbot.waitUntil(lambda: widget._status.value.startswith("failed"), timeout=30_000)
    assert "they belong to another image" in widget._status.value
    assert [layer.name for layer in viewer.layers] == ["cbc"]
    save_annotations(_cbc_review(), smear)
    _analyze(widget, qtbot)
    cells = viewer.layers["cbc cells"].features
    assert cells["label"].tolist() == ["blast", "lymphocyte"]
    assert cells["added"].tolist() == [False, True]


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


def _analyze(widget, qtbot):
    """Run the widget and wait until its layers are added."""
    widget.analysis = None
    widget._run.native.click()
    qtbot.waitUntil(lambda: widget.analysis is not None, timeout=120_000)
    qtbot.waitUntil(lambda: not widget._runner.running, timeout=10_000)


def _analyze_widget(viewer, out):
    """The docked Analyze widget writing to ``out``, on the CPU, the report not opened."""
    from napari_cytodiffusion._widgets._analyze import AnalyzeWidget

    widget = AnalyzeWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget._out.value = out
    widget._open.value = False
    widget._fields.device.value = "cpu"
    return widget
