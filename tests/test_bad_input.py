"""Bad input never crashes: a clear message (exception, stderr + exit 2, or a notification)."""

import numpy as np
import pytest

from napari_cytodiffusion._sample_data import sample_path
from napari_cytodiffusion.cli import main
from napari_cytodiffusion.core.smear.image import ImageError
from napari_cytodiffusion.core.smear.segmentation import segment_smear

RGB = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (RGB[..., 0], "grayscale"),
        (np.stack([RGB] * 4), "pick one plane"),
        (np.full((64, 64, 3), 200, np.uint8), "blank"),
        (np.where(RGB > 250, np.nan, RGB / 255.0), "NaN"),
        (np.zeros((0, 0, 3), np.uint8), "too small"),
        (RGB > 128, "boolean"),
        ("smear.png", "read it first, with napari_cytodiffusion.core.io.read_image"),
    ],
)
def test_core_rejects_unusable_images(image, message):
    with pytest.raises(ImageError, match=message):
        segment_smear(image)


def test_core_rejects_implausible_diameter():
    with pytest.raises(ValueError, match="red-cell diameter"):
        segment_smear(RGB, rbc_diameter=-5)


def test_smear_without_cells_gives_empty_result():
    slide = np.full((200, 300, 3), 230, np.uint8)
    slide += np.random.default_rng(1).integers(0, 4, slide.shape, dtype=np.uint8)
    result = segment_smear(slide, rbc_diameter=30)
    assert result.count("wbc") == 0 and result.wbc_labels.max() == 0
    assert list(result.table("wbc").columns) == list(result.features.columns)


def test_a_single_cell_image_without_a_cell_is_refused_not_called(default_model, tmp_path):
    from napari_cytodiffusion.core.tasks.classify import classify, classify_cell_images

    empty = np.full((160, 160, 3), 232, np.uint8)
    empty += np.random.default_rng(1).integers(0, 6, empty.shape, dtype=np.uint8)
    with pytest.raises(ImageError, match="No cell found"):
        classify(empty, default_model, segment=False)
    path = tmp_path / "empty.png"
    from PIL import Image

    Image.fromarray(empty).save(path)
    result = classify_cell_images([path], default_model)
    assert not result.calls and result.failed[0][0] == path
    assert "No cell found" in result.failed[0][1]


def test_cli_reports_missing_and_unreadable_files_and_goes_on(tmp_path, capsys):
    broken = tmp_path / "broken.png"
    broken.write_text("not an image")
    gray = tmp_path / "gray.png"
    from PIL import Image

    Image.fromarray(RGB[..., 0]).save(gray)
    good = str(sample_path("pbc_lymphocyte"))
    code = main(["segment", str(tmp_path / "missing.png"), str(broken), str(gray), good, "--json"])
    captured = capsys.readouterr()
    assert code == 2
    assert "No such file" in captured.err
    assert "Cannot read" in captured.err and "broken.png" in captured.err
    assert "grayscale" in captured.err
    assert "3 of 4 images could not be segmented" in captured.err
    assert '"n_wbc": 1' in captured.out  # the good file was still processed


def test_cli_usage_error_exits_2(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["segment"])
    assert stop.value.code == 2


@pytest.mark.parametrize("tile_size", [300.5, 100, True])
def test_a_tile_size_that_is_not_a_whole_number_of_pixels_is_refused(tile_size):
    from napari_cytodiffusion.core.tasks.analyze import BatchRequest, analyze_files

    with pytest.raises(ValueError, match="tile_size"):
        segment_smear(RGB, rbc_diameter=8, tile_size=tile_size)
    with pytest.raises(ValueError, match="tile_size"):
        analyze_files(BatchRequest(paths=[], out="never-made", tile_size=tile_size))


def test_a_tile_size_from_numpy_is_a_whole_number():
    from napari_cytodiffusion.core.smear.segmentation import check_tile_size

    check_tile_size(np.int64(300))  # a spin box's or an array's value: accepted


@pytest.mark.parametrize(
    "command",
    [
        ["generate", "--label", "neutrophil"],
        ["counterfactual", "cell.png", "--target", "monocyte"],
        ["segment", "cell.png"],
        ["turing", "make", "--real", "cells"],
        ["analyze", "cell.png"],
        ["export-cells", "cell.png"],
    ],
)
def test_an_output_folder_that_is_a_file_is_refused_before_any_work(command, tmp_path, capsys):
    taken = tmp_path / "results"
    taken.write_text("a file of the user's")
    with pytest.raises(SystemExit) as stop:
        main([*command, "--out", str(taken)])
    assert stop.value.code == 2
    assert f"argument --out: {taken} is a file" in capsys.readouterr().err
    assert taken.read_text() == "a file of the user's"


def test_an_output_file_that_is_a_folder_is_refused_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["turing", "score", "answers.csv", "key.csv", "--out", str(tmp_path)])
    assert stop.value.code == 2
    assert f"argument --out: {tmp_path} is a folder" in capsys.readouterr().err


@pytest.fixture
def errors(monkeypatch):
    """Collect the widget's error notifications instead of showing them."""
    messages = []
    monkeypatch.setattr(
        "napari_cytodiffusion._widgets._segment.show_error", lambda text: messages.append(text)
    )
    monkeypatch.setattr("napari.utils.notifications.show_error", lambda text: messages.append(text))
    return messages


def test_widget_refuses_wrong_layers(make_napari_viewer, errors):
    from napari_cytodiffusion._widgets._segment import SegmentWidget

    viewer = make_napari_viewer()
    widget = SegmentWidget(viewer)
    assert widget.start(None) is None
    labels = viewer.add_labels(np.zeros((32, 32), np.uint32), name="mask")
    gray = viewer.add_image(RGB[..., 0], name="gray")
    assert widget.start(None) is None  # no RGB image to choose: the grey one is named
    assert widget.start(labels) is None
    assert widget.start(gray) is None
    assert "Open a blood-smear image" in errors[0]
    assert errors[1].startswith("'gray' is not an RGB colour image; Segment needs")
    assert "Labels layer" in errors[2]
    assert "not an RGB colour image" in errors[3]
    assert len(viewer.layers) == 2


def test_widget_reports_core_errors_without_adding_layers(make_napari_viewer, qtbot, errors):
    from napari_cytodiffusion._widgets._segment import SegmentWidget

    viewer = make_napari_viewer()
    widget = SegmentWidget(viewer)
    blank = viewer.add_image(np.full((64, 64, 3), 200, np.uint8), name="blank", rgb=True)
    worker = widget.start(blank)
    qtbot.waitUntil(lambda: not widget.runner.running, timeout=20000)
    assert worker is not None
    assert any("blank" in message for message in errors)
    assert len(viewer.layers) == 1


def test_a_folder_held_by_a_running_process_is_refused_a_killed_ones_taken_over(
    tmp_path, monkeypatch
):
    import os

    from napari_cytodiffusion.core import io

    lock = tmp_path / ".napari-cytodiffusion.lock"
    lock.write_text("999999999")  # no such process: a run that was killed
    with io.exclusive_folder(tmp_path):
        assert lock.read_text() == str(os.getpid())
    assert not lock.exists()

    def another_users_process(pid, signal):
        raise PermissionError("not allowed to signal it")

    lock.write_text("4242")
    monkeypatch.setattr(io.os, "kill", another_users_process)
    with pytest.raises(io.FolderBusyError, match="process 4242"):
        with io.exclusive_folder(tmp_path):
            pass
    assert lock.read_text() == "4242"


def test_a_path_from_the_home_folder_is_read(tmp_path, monkeypatch):
    from PIL import Image

    from napari_cytodiffusion.core.io import read_image

    monkeypatch.setenv("HOME", str(tmp_path))
    Image.fromarray(RGB).save(tmp_path / "smear.png")
    assert read_image("~/smear.png").shape == RGB.shape


def test_a_scale_below_any_red_cells_is_not_used():
    """8 x 8 pixels inside a white cell hold no red cell to measure: the estimate (about 1 px)
    would be below what a person may give, so the message asks for the diameter."""
    from napari_cytodiffusion.core.io import read_image
    from napari_cytodiffusion.core.smear.prepare import prepare_smear

    image = read_image(sample_path("cbc_monocyte_eosinophil"))
    inside = image[333:341, 109:117]
    with pytest.raises(ImageError, match="give the red-cell diameter"):
        prepare_smear(inside)
    assert prepare_smear(inside, rbc_diameter=30).rbc_diameter == 30
    # A lab's scale, where an adapted model has one, is used instead.
    assert prepare_smear(inside, fallback_rbc_diameter=37.5).rbc_diameter == 37.5


def test_a_training_error_is_printed_on_its_own_line_after_the_bar(tmp_path, capsys):
    import shutil

    shutil.copy(sample_path("pbc_lymphocyte"), tmp_path / "a.jpg")
    table = tmp_path / "cells.csv"
    table.write_text("file,label\na.jpg,lymphocyte\nmissing.jpg,neutrophil\n")
    argv = ["train", str(table), "--out", str(tmp_path / "m.pt"), "--steps", "1"]
    assert main([*argv, "--device", "cpu"]) == 2
    lines = capsys.readouterr().err.rstrip("\n").split("\n")  # a bar redraws with \r
    assert lines[-1].startswith("napari-cytodiffusion train: error: ")
    assert "missing.jpg" in lines[-1]


def test_an_interruption_closes_the_bar_before_saying_so(monkeypatch, capsys):
    from napari_cytodiffusion import cli

    def interrupted(args):
        cli._progress_bar("working")(1, 10)
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, "segment", (cli._add_segment, interrupted))
    assert main(["segment", "smear.png"]) == 130
    assert capsys.readouterr().err.endswith("\ninterrupted\n")


@pytest.mark.parametrize("command", [["adapt", "cells"], ["calibrate", "m", "x"]])
def test_adapt_and_calibrate_write_their_notes_to_stderr_as_train_does(
    command, monkeypatch, capsys
):
    from types import SimpleNamespace

    from napari_cytodiffusion.core.tasks import adapt

    def noted(request, progress, log):
        log("only 3 cells of basophil")
        return SimpleNamespace(summary=lambda: ["saved local model 'lab'"])

    monkeypatch.setattr(adapt, "adapt_model", noted)
    assert main([*command, "--out", "lab"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "saved local model 'lab'\n"
    assert "only 3 cells of basophil" in captured.err


@pytest.mark.parametrize("value", ["-5", "nan", "abc", "5000"])
def test_an_implausible_red_cell_diameter_is_refused_once_before_any_work(value, capsys):
    images = [str(sample_path("cbc_lymphocyte")), str(sample_path("pbc_lymphocyte"))]
    with pytest.raises(SystemExit) as stop:
        main(["segment", *images, "--rbc-diameter", value])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("argument --rbc-diameter:") == 1 and "Traceback" not in err


def test_a_red_cell_diameter_of_0_on_the_command_line_is_not_given_as_in_the_widgets():
    from napari_cytodiffusion.cli import _rbc_diameter

    assert _rbc_diameter("0") is None and _rbc_diameter("31.5") == 31.5


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback_before_or_after_the_command(where, capsys):
    from napari_cytodiffusion.cli import UsageError

    command = ["models", "hash", "no-such-model.pt"]
    argv = ["--debug", *command] if where == "before" else [*command, "--debug"]
    with pytest.raises(UsageError, match="No such file"):
        main(argv)
    assert main(command) == 2  # without it: one line
    assert "error: No such file: no-such-model.pt" in capsys.readouterr().err
