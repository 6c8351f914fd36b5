"""The task layer: one call per user action, the model's own classes, one progress bar,
a prepared smear passed on, and a training cache that cannot go stale."""

import dataclasses
import shutil

import numpy as np
import pytest

from napari_cytodiffusion import core
from napari_cytodiffusion._sample_data import sample_path
from napari_cytodiffusion.core.io import read_image
from napari_cytodiffusion.core.progress import phases
from napari_cytodiffusion.core.smear.prepare import prepare_smear

TINY = {"steps": 1, "batch_size": 2, "device": "cpu", "channels": (8, 16, 16)}


def test_phases_share_one_bar_that_only_moves_forward():
    seen = []
    first, second = phases(lambda done, total: seen.append((done, total)), [1, 3])
    for done in (1, 2):
        first(done, 2)
    for done in (1, 2, 3):
        second(done, 3)
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)
    assert seen[-1] == (1000, 1000) and seen[1] == (250, 1000)


def test_a_prepared_smear_is_measured_once_and_reused():
    image = read_image(sample_path("cbc_lymphocyte"))
    smear = prepare_smear(image)
    assert 65 < smear.rbc_diameter < 100 and smear.rgb.dtype == np.float32
    assert prepare_smear(smear) is smear  # nothing is measured again
    found = core.segment(smear)
    assert found.smear is smear and found.counts()["wbc"] == 1
    assert "1 white cell," in found.summary() and len(found.record()["wbc_boxes"]) == 1
    with pytest.raises(ValueError, match="implausible"):
        prepare_smear(image, rbc_diameter=float("inf"))


def test_classify_a_smear_reports_cells_of_the_model_classes(default_model):
    image = read_image(sample_path("cbc_lymphocyte"))
    seen = []
    result = core.classify(image, default_model, seed=0, progress=lambda d, t: seen.append(d))
    assert len(result.calls) == 1 and result.classes == default_model.classes
    table = result.table()
    assert list(table["index"]) == result.cell_ids
    assert np.all(result.cell_labels() == result.segmentation.wbc_labels)
    assert result.differential()["count"].sum() == 1
    assert seen == sorted(seen) and seen[-1] == 1000


def test_classify_takes_what_segment_returns_and_a_persons_labels_as_written(default_model):
    """The natural notebook call: ``classify(image, model, segmentation=segment(image))``; an
    annotation written "Neutrophil" counts as a neutrophil."""
    from napari_cytodiffusion.core.annotations import Annotations, CellAnnotation

    image = read_image(sample_path("cbc_lymphocyte"))
    found = core.segment(image)
    (centre,) = found.segmentation.table("wbc")[["centroid_row", "centroid_col"]].to_numpy()
    review = Annotations("smear.jpg", image.shape, [CellAnnotation(tuple(centre), "Neutrophil")])
    result = core.classify(image, default_model, segmentation=found, annotations=review)
    assert result.segmentation is found.segmentation and result.annotated == ["neutrophil"]
    counts = result.differential().set_index("class")["count"]
    assert list(counts.index) == list(default_model.classes) and counts["neutrophil"] == 1


def test_classify_refuses_a_segmentation_of_another_image_or_scale(default_model):
    image = read_image(sample_path("cbc_lymphocyte"))
    found = core.segment(image)
    with pytest.raises(ValueError, match=r"another image.*\(480, 640\)"):
        core.classify(image[:400], default_model, segmentation=found)
    with pytest.raises(ValueError, match="segment again with rbc_diameter=40"):
        core.classify(image, default_model, segmentation=found, rbc_diameter=40)


@pytest.mark.parametrize("bad", ["negative", "fraction", "nan"])
def test_labels_that_are_not_whole_numbers_are_refused(default_model, bad):
    image = read_image(sample_path("cbc_lymphocyte"))
    labels = np.zeros(image.shape[:2], np.int32)
    labels[100:150, 100:150], labels[300:350, 300:350] = 1, 2
    labels = {
        "negative": np.where(labels == 2, -1, labels),
        "fraction": np.where(labels == 2, 2.5, labels),
        "nan": np.where(labels == 2, np.nan, labels),
    }[bad]
    with pytest.raises(ValueError, match="whole numbers"):
        core.classify(image, default_model, labels=labels)


def test_float_labels_of_whole_numbers_are_taken_and_no_cells_give_an_empty_table(
    default_model,
):
    image = read_image(sample_path("cbc_lymphocyte"))
    empty = core.classify(image, default_model, labels=np.zeros(image.shape[:2]))
    assert empty.labels.dtype.kind == "i"  # painted cells and label look-ups need integers
    table = empty.table()
    assert len(table) == 0 and list(table["label"]) == []
    assert {"index", "predicted", "annotated", "added", "centroid_row"} <= set(table.columns)
    assert f"p_{default_model.classes[0]}" in table.columns
    assert empty.differential()["count"].sum() == 0
    from napari_cytodiffusion.core.tasks.classify import CellImages

    nothing = CellImages([], [], None, [], default_model.classes, [], [], [])
    assert {"file", "label", "annotated", "warning"} <= set(nothing.table().columns)


def test_explain_refuses_the_background_and_runs_one_bar(default_model):
    cell = core.generate(default_model, "lymphocyte", 1, steps=2, seed=4).images[0]
    labels = np.zeros((64, 64), np.uint32)
    request = core.ExplainRequest(target="monocyte", cell_id=0, labels=labels)
    with pytest.raises(ValueError, match="0 is the background"):
        core.explain(cell, default_model, request)
    with pytest.raises(ValueError, match="Unknown cell class 'blast'"):
        core.explain(cell, default_model, core.ExplainRequest(target="blast"))
    with pytest.raises(ValueError, match="guidance"):
        core.explain(cell, default_model, core.ExplainRequest("monocyte", guidance=np.nan))
    seen = []
    request = core.ExplainRequest(target="monocyte", trials=2, steps=4, strength=0.5)
    result = core.explain(cell, default_model, request, lambda done, _: seen.append(done))
    assert seen == sorted(seen) and seen[-1] == 1000  # explaining then editing: one bar
    assert result.edited.shape == (64, 64, 3) and result.heat_crop.shape == (64, 64)
    assert result.cell_id is None and "-> monocyte" in result.summary()
    # With no current class given, it is the classifier's call, and the summary says so.
    assert result.call is not None and result.maps.source == result.call.label
    assert f"{result.call.label}: the classifier's call, p = " in result.summary()
    request = core.ExplainRequest("monocyte", source="ig", trials=2, steps=2, strength=0.5)
    given = core.explain(cell, default_model, request)
    assert given.call is None and "immature_granulocyte: as given" in given.source_note()


def test_generate_checks_its_arguments(default_model):
    for kwargs, message in (
        ({"n": 0}, "number of cells"),
        ({"n": 1, "steps": 0}, "steps"),
        ({"n": 1, "guidance": float("inf")}, "guidance"),
        ({"n": 1, "sampler": "euler"}, "sampler"),
    ):
        with pytest.raises(ValueError, match=message):
            core.generate(default_model, "platelet", **kwargs)


def test_turing_panel_from_an_image_stack(default_model):
    crops = np.full((3, 64, 64, 3), 0.9, np.float32)
    crops[:, 20:44, 20:44] = [0.4, 0.2, 0.6]
    request = core.TuringRequest(n=2, images=crops, labels=["platelet", "ig", "basophil"])
    panel = core.make_turing_panel(default_model, request)
    assert len(panel) == 4
    real = [row for row in panel.key if row["truth"] == "real"]
    assert all(row["origin"].startswith("the image stack, plane") for row in real)
    too_many = core.TuringRequest(n=5, images=crops, labels=["platelet"] * 3)
    with pytest.raises(ValueError, match="Asked for 5 real cells but the image stack holds 3"):
        core.make_turing_panel(default_model, too_many)


def test_a_model_of_other_classes_trains_generates_and_classifies(
    synthetic_cells_dir, synthetic_rbc_diameter, tmp_path
):
    """Nothing assumes the eight PBC classes: a two-class model works end to end."""
    from napari_cytodiffusion.core import datasets
    from napari_cytodiffusion.core.model.checkpoint import load_model_file
    from napari_cytodiffusion.core.model.classifier import classify_crops
    from napari_cytodiffusion.core.model.training import train

    classes = ("lymphocyte", "neutrophil")
    records = datasets.list_labelled_images(synthetic_cells_dir, classes=classes)
    pack = tmp_path / "two.npz"
    datasets.pack_cells(records, pack, 32, synthetic_rbc_diameter, classes=classes)
    train(pack, tmp_path / "two.ckpt", image_size=32, log=lambda _: None, **TINY)
    model = load_model_file(tmp_path / "two.ckpt", "cpu")
    assert model.classes == classes and model.image_size == 32
    cells = core.generate(model, "neutrophil", 2, steps=2)
    assert cells.images.shape == (2, 32, 32, 3)
    calls = classify_crops(model, cells.images, budget=2)
    assert {call.label for call in calls} <= set(classes)
    assert set(calls[0].probabilities) == set(classes)


def test_training_cache_follows_the_folder_content(
    synthetic_cells_dir, synthetic_rbc_diameter, tmp_path
):
    folder = tmp_path / "cells"
    shutil.copytree(synthetic_cells_dir, folder)
    (folder / "smudge").mkdir()  # not a class of the model: listed, left out
    shutil.copy(folder / "lymphocyte" / "lymphocyte_0.png", folder / "smudge")
    (folder / "empty_class").mkdir()  # no cells to leave out: not named
    lines = []
    request = core.TrainRequest(
        data=folder,
        out=tmp_path / "lab.ckpt",
        rbc_diameter=synthetic_rbc_diameter,
        overwrite=True,  # trained again and again into one file
        **TINY,
    )
    first = core.train_model(request, log=lines.append)
    (warning,) = [line for line in lines if "left out" in line]
    # The new model's classes: those with cells, not the eight a new model may learn.
    assert warning.endswith("left out: smudge (its classes: lymphocyte, neutrophil)")
    assert any(line.startswith("cells per class:") and "lymphocyte 6" in line for line in lines)
    again = core.train_model(request, log=lines.append)
    assert again["pack"] == first["pack"]  # unchanged folder: the cache is reused
    from napari_cytodiffusion.core.datasets import load_pack

    cells_before = len(load_pack(first["pack"]).labels)
    extra = folder / "lymphocyte" / "lymphocyte_extra.png"
    shutil.copy(folder / "lymphocyte" / "lymphocyte_0.png", extra)
    changed = core.train_model(request, log=lines.append)
    assert changed["pack"] != first["pack"] and not first["pack"].exists()
    assert len(load_pack(changed["pack"]).labels) == cells_before + 1


def test_a_new_model_learns_the_classes_it_has_cells_of(
    synthetic_cells_dir, synthetic_rbc_diameter, tmp_path
):
    from napari_cytodiffusion.core.model.weights import load_model

    folder = tmp_path / "cells"
    shutil.copytree(synthetic_cells_dir, folder)
    (folder / "monocyte").mkdir()  # a class of the default list without a cell
    request = core.TrainRequest(
        data=folder, out=tmp_path / "lab.ckpt", rbc_diameter=synthetic_rbc_diameter, **TINY
    )
    lines = []
    core.train_model(request, log=lines.append)
    assert load_model(request.out, "cpu").classes == ("lymphocyte", "neutrophil")
    assert "a new model of the classes with cells: lymphocyte, neutrophil" in lines
    shutil.rmtree(folder / "neutrophil")
    with pytest.raises(ValueError, match="at least two classes.*lymphocyte only"):
        core.train_model(dataclasses.replace(request, overwrite=True))
    with pytest.raises(ValueError, match="steps must be at least 1"):
        core.train_model(dataclasses.replace(request, out=tmp_path / "x.ckpt", steps=0))


def test_test_split_cells_are_left_out_and_said_to_be(synthetic_cells_dir, tmp_path):
    """A CSV's test rows are never trained on; when too few cells remain, the message says
    which are there and that test cells were left out."""
    lymphocyte, neutrophil = sorted(synthetic_cells_dir.glob("*/*_0.png"))
    table = tmp_path / "cells.csv"
    rows = [f"{lymphocyte},lymphocyte,test", f"{neutrophil},neutrophil,test"]
    table.write_text("file,label,split\n" + "\n".join(rows) + "\n")
    request = core.TrainRequest(data=table, out=tmp_path / "x.ckpt", rbc_diameter=18, **TINY)
    lines = []
    message = r"cells.csv has no cells to train on \(2 cells of the test split left out"
    with pytest.raises(ValueError, match=message):
        core.train_model(request, log=lines.append)
    assert "2 cells of the test split left out (kept for testing, never trained on)" in lines
    table.write_text("file,label,split\n" + f"{rows[0]}\n{neutrophil},neutrophil,train\n")
    message = r"has cells of neutrophil only \(1 cell of the test split left out"
    with pytest.raises(ValueError, match=message):
        core.train_model(request)
    assert not any(tmp_path.glob("*.npz"))  # refused before any cell was normalised


def test_training_cells_of_one_scanner_share_one_scale(
    synthetic_cells_dir, synthetic_rbc_diameter, tmp_path
):
    lines = []
    request = core.TrainRequest(
        data=synthetic_cells_dir, out=tmp_path / "lab.ckpt", overwrite=True, **TINY
    )
    first = core.train_model(request, log=lines.append)
    (line,) = [line for line in lines if line.startswith("red-cell scale shared")]
    scale = float(line.split(": ")[1].split(" px")[0])  # one scanner: one scale
    assert abs(scale - synthetic_rbc_diameter) < 0.2 * synthetic_rbc_diameter
    assert core.train_model(request)["pack"] == first["pack"]  # the same scale: cache reused


def test_train_reports_progress_as_done_and_total(synthetic_cells_dir, tmp_path):
    seen = []
    request = core.TrainRequest(
        data=synthetic_cells_dir, out=tmp_path / "x.ckpt", rbc_diameter=18, **TINY
    )
    core.train_model(request, progress=lambda done, total: seen.append((done, total)))
    assert seen and all(total == 1000 for _, total in seen) and seen[-1][0] == 1000
    with pytest.raises(ValueError, match="folder of the output"):
        core.train_model(core.TrainRequest(data=synthetic_cells_dir, out=tmp_path / "no/x.ckpt"))


def test_the_core_and_the_command_line_import_without_torch_or_napari():
    """The core runs headless and on a GPU machine without napari, and napari starts fast:
    importing the tasks and the command line loads no torch, napari, Qt or magicgui (torch
    is imported inside the functions that run the model)."""
    import subprocess
    import sys

    code = (
        "import importlib, pkgutil, sys\n"
        "import napari_cytodiffusion.core.tasks as tasks\n"
        "import napari_cytodiffusion.cli\n"
        "for module in pkgutil.iter_modules(tasks.__path__):\n"
        "    if module.name != '_workers':  # dask's distributed, only inside functions\n"
        "        importlib.import_module(f'{tasks.__name__}.{module.name}')\n"
        "heavy = ('torch', 'napari', 'qtpy', 'PyQt5', 'PySide6', 'magicgui')\n"
        "print(sorted(name for name in heavy if name in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
