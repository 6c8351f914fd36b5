"""The "Train model" widget: trains on a folder of class subfolders showing the counts
and the loss, warns about folders it leaves out, and a cancelled run leaves a checkpoint that
the next run resumes."""

import shutil

import torch

from napari_cytodiffusion._widgets import _train
from napari_cytodiffusion._widgets._train import TrainWidget
from napari_cytodiffusion.core.model.checkpoint import load_model_file


def _widget(make_napari_viewer, folder, out, rbc_diameter, steps, from_default):
    viewer = make_napari_viewer()
    widget = TrainWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget._data.value = folder
    widget._out.value = out
    widget._steps.value = steps
    widget._batch_size.value = 2
    widget._device.value = "cpu"
    widget._rbc_diameter.value = rbc_diameter
    widget._start_from.model.value = "default" if from_default else _train.NEW_MODEL
    return viewer, widget


def test_fine_tuning_the_default_model(
    make_napari_viewer, qtbot, synthetic_cells_dir, synthetic_rbc_diameter, tmp_path, monkeypatch
):
    infos, warnings = [], []
    monkeypatch.setattr(_train, "show_info", infos.append)
    monkeypatch.setattr(_train, "show_warning", warnings.append)
    folder = tmp_path / "cells"
    shutil.copytree(synthetic_cells_dir, folder)
    shutil.copytree(folder / "lymphocyte", folder / "blasts")  # not a class of the model
    out = tmp_path / "lab.ckpt"
    viewer, widget = _widget(make_napari_viewer, folder, out, synthetic_rbc_diameter, 3, True)
    widget._run.native.click()
    assert widget._runner.running
    # Until the run has ended, whatever its outcome, so that a failure shows the status line.
    qtbot.waitUntil(lambda: not widget._runner.running, timeout=300_000)
    assert widget._status.value.startswith("done"), widget._status.value

    assert torch.load(out, weights_only=True)["step"] == 3
    assert load_model_file(out, "cpu").image_size == 64
    assert widget._status.value.startswith("done: step 3, loss")
    assert "step 3, loss" in infos[-1] and str(out) in infos[-1]
    assert "lymphocyte 6" in widget._counts.value and "neutrophil 6" in widget._counts.value
    assert len(warnings) == 1 and "blasts" in warnings[0] and "blasts" in widget._counts.value
    assert len(viewer.layers) == 0


def test_a_new_model_is_shown_with_the_classes_it_will_have(
    synthetic_cells_dir, synthetic_rbc_diameter, tmp_path
):
    """From scratch, the model learns only the classes with cells: the counts line and the
    warning name those, not the eight of the default list; an empty folder is not named."""
    from napari_cytodiffusion.core.progress import Cancelled
    from napari_cytodiffusion.core.tasks.train import TrainRequest

    folder = tmp_path / "cells"
    shutil.copytree(synthetic_cells_dir, folder)
    shutil.copytree(folder / "lymphocyte", folder / "blasts")
    (folder / "empty_class").mkdir()
    request = TrainRequest(
        data=folder, out=tmp_path / "new.ckpt", rbc_diameter=synthetic_rbc_diameter, steps=1
    )
    text = _train._progress_text()

    def cancel(_done, _total):  # the listing is all this test needs
        raise Cancelled()

    assert _train._train(request, text, cancel) is None
    assert "; a new model of lymphocyte, neutrophil;" in text["counts"]
    assert text["counts"].endswith("left out (not classes of the model): blasts")
    (warning,) = text["warnings"]
    assert warning.endswith("they are not classes of the model (lymphocyte, neutrophil).")


def test_cancel_saves_and_the_next_run_resumes(
    make_napari_viewer, qtbot, synthetic_cells_dir, synthetic_rbc_diameter, tmp_path, cancel_latency
):
    out = tmp_path / "scratch.ckpt"
    _, widget = _widget(
        make_napari_viewer, synthetic_cells_dir, out, synthetic_rbc_diameter, 10_000, False
    )
    widget._run.native.click()
    # The label shows the running loss while training goes.
    qtbot.waitUntil(lambda: "loss" in widget._details.value, timeout=120_000)
    assert cancel_latency(widget) < 1.0  # the checkpoint saved included
    assert widget._status.value.startswith("cancelled")
    assert "stopped at step" in widget._details.value
    stopped_at = torch.load(out, weights_only=True)["step"]
    assert 0 < stopped_at < 10_000

    widget._steps.value = stopped_at + 1
    widget._run.native.click()
    qtbot.waitUntil(lambda: not widget._runner.running, timeout=120_000)
    assert torch.load(out, weights_only=True)["step"] == stopped_at + 1


def test_a_missing_folder_is_explained(make_napari_viewer, tmp_path, monkeypatch):
    errors = []
    monkeypatch.setattr("napari.utils.notifications.show_error", errors.append)
    _, widget = _widget(make_napari_viewer, tmp_path / "nowhere", tmp_path / "x.ckpt", 0, 1, True)
    widget._status.value = "done: an earlier run"
    widget._run.native.click()
    assert not widget._runner.running
    assert "cell folder" in errors[-1]
    assert widget._status.value == f"not started: {errors[-1]}"  # not the earlier run's


def test_a_trained_model_is_not_replaced_unless_resumed(
    make_napari_viewer, synthetic_cells_dir, tmp_path, monkeypatch
):
    errors = []
    monkeypatch.setattr("napari.utils.notifications.show_error", errors.append)
    out = tmp_path / "trained.ckpt"
    out.write_bytes(b"weeks of training")
    _, widget = _widget(make_napari_viewer, synthetic_cells_dir, out, 0, 1, True)
    widget._resume.value = False
    widget._run.native.click()
    assert not widget._runner.running and "trained.ckpt exists" in errors[-1]
    assert out.read_bytes() == b"weeks of training"


def test_a_failed_run_says_why(
    make_napari_viewer, qtbot, synthetic_cells_dir, tmp_path, monkeypatch
):
    errors = []
    monkeypatch.setattr(_train, "show_error", errors.append)
    out = tmp_path / "missing" / "x.ckpt"
    _, widget = _widget(make_napari_viewer, synthetic_cells_dir, out, 0, 1, False)
    widget._run.native.click()
    qtbot.waitUntil(lambda: not widget._runner.running, timeout=30_000)
    assert widget._status.value.startswith("failed: ") and "does not exist" in widget._status.value
    assert "does not exist" in errors[-1]


def test_the_run_starts_from_the_model_chosen(
    make_napari_viewer, qtbot, synthetic_cells_dir, tmp_path, monkeypatch
):
    """Start from: a new model, the shipped one, local ones, or a model file, which is used."""
    from napari_cytodiffusion._widgets._common import MODEL_FILE

    errors = []
    monkeypatch.setattr("napari.utils.notifications.show_error", errors.append)
    monkeypatch.setattr(_train, "show_error", errors.append)
    _, widget = _widget(make_napari_viewer, synthetic_cells_dir, tmp_path / "x.ckpt", 0, 1, True)
    choices = widget._start_from.model.choices
    assert choices[:2] == (_train.NEW_MODEL, "default") and choices[-1] == MODEL_FILE
    widget._start_from.model.value = MODEL_FILE
    widget._run.native.click()
    assert not widget._runner.running and "model file to start from" in errors[-1]
    start = tmp_path / "lab.pt"
    start.write_bytes(b"not a model")
    widget._start_from.file.value = start
    widget._run.native.click()
    qtbot.waitUntil(lambda: not widget._runner.running, timeout=30_000)
    assert widget._status.value.startswith("failed: ") and "lab.pt" in widget._status.value


def test_every_widgets_model_file_field_offers_what_train_model_writes(make_napari_viewer):
    from napari_cytodiffusion._widgets._common import ModelFields
    from napari_cytodiffusion._widgets._train import TrainWidget

    written = TrainWidget(make_napari_viewer())._out.filter  # the checkpoint Train model saves
    offered = ModelFields().file.filter.split()
    assert written in offered and "*.pt" in offered
