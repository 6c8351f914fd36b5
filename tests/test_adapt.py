"""Adapting and calibrating: a lab's labelled cells make a named local model, with its own
calibration and sha256, that every command and widget offers; new classes can be added."""

import shutil

import numpy as np
import pytest

from napari_cytodiffusion.cli import main
from napari_cytodiffusion.core.model import weights


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    """Local models go to a temporary cache, never the user's."""
    cache = tmp_path / "cache"
    monkeypatch.setenv(weights.CACHE_ENV, str(cache))
    return cache


@pytest.fixture
def cheap_calibration(monkeypatch):
    """Calibrate with 4 trials a held-back cell and class (32 by default) and 4 for the class
    biases (16), in the command line's and the widget's runs alike: for tests of what is
    registered and replaced, not of how well it is calibrated."""
    import dataclasses

    from napari_cytodiffusion.core.tasks import adapt

    adapt_model = adapt.adapt_model
    monkeypatch.setattr(adapt, "BIAS_TRIALS", 4)
    monkeypatch.setattr(
        adapt,
        "adapt_model",
        lambda request, **kw: adapt_model(dataclasses.replace(request, calibration_trials=4), **kw),
    )


def _quick_adapt(folder, name, rbc_diameter, lines, steps=2, **options):
    """Adapt for a few steps with a cheap calibration, the log lines kept in ``lines``."""
    from napari_cytodiffusion.core.tasks.adapt import AdaptRequest, adapt_model

    request = AdaptRequest(
        folder,
        name,
        steps=steps,
        calibration_trials=4,
        device="cpu",
        rbc_diameter=rbc_diameter,
        **options,
    )
    return adapt_model(request, log=lines.append)


def test_adapt_registers_a_calibrated_local_model(
    synthetic_cells_dir, synthetic_rbc_diameter, isolated_cache, capsys
):
    import torch

    argv = ["adapt", str(synthetic_cells_dir), "--out", "lab-a", "--steps", "2"]
    assert main([*argv, "--rbc-diameter", str(synthetic_rbc_diameter), "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    assert "saved local model 'lab-a'" in out and "use it with --model lab-a" in out
    assert "cells per class: lymphocyte 6, neutrophil 6" in err

    entry = weights.find_model("lab-a")
    assert entry.local and entry.sha256 == weights.file_sha256(weights.model_path("lab-a"))
    model = weights.load_model("lab-a", device="cpu")
    base = weights.load_model("default", device="cpu")
    assert model.classes == base.classes and model.image_size == base.image_size
    # Adapted in bfloat16 where the CPU has the units for it, the weights stay float32.
    assert {p.dtype for p in model.unet.parameters()} == {torch.float32}
    assert model.metadata["adapted_on"] == {"lymphocyte": 4, "neutrophil": 4}
    # Classes the lab has no cells of keep the base model's calibration.
    calibration, original = model.calibration, base.calibration
    assert calibration["class_bias"][0] == pytest.approx(original["class_bias"][0])
    assert calibration["inverse_temperature"] > 0
    # The anomaly score compares the classes with the null class, as the shipped model's does.
    assert calibration["anomaly"]["method"] == "null_gain"
    assert len(calibration["anomaly"]["mean"]) == model.num_classes
    # "Unlike the training smears" means unlike the lab's cells, not PBC's.
    lab_reference = calibration["domain"]
    assert lab_reference != base.calibration["domain"] and "colour" not in lab_reference
    # How far calls off its smears are trusted, and how large each class may be: the base's.
    assert lab_reference["trust_decay"] == base.calibration["domain"]["trust_decay"]
    assert calibration["size"] == base.calibration["size"]
    from napari_cytodiffusion.core.model.domain import domain_scores

    noise = np.random.default_rng(0).random((2, model.image_size, model.image_size, 3))
    shift, _ = domain_scores(model, noise.astype(np.float32))
    assert np.all(shift > 1)
    assert main(["models", "list"]) == 0
    (row,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("lab-a")]
    assert "local" in row

    assert model.lab_rbc_diameter == synthetic_rbc_diameter

    # Calibrating the local model again replaces it under the same name. Without a given
    # scale, the lab's images share one (their median), which the model keeps.
    assert main(["calibrate", "lab-a", str(synthetic_cells_dir), "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    assert "saved local model 'lab-a'" in out and "shared by the 12 images" in err
    assert weights.find_model("lab-a").sha256 != entry.sha256
    lab_scale = weights.load_model("lab-a", device="cpu").lab_rbc_diameter
    assert abs(lab_scale - synthetic_rbc_diameter) < 0.2 * synthetic_rbc_diameter

    # A tampered local file is refused like any registry model.
    path = weights.model_path("lab-a")
    path.write_bytes(path.read_bytes()[:-10])
    assert (
        main(
            [
                "classify",
                str(synthetic_cells_dir / "lymphocyte" / "lymphocyte_0.png"),
                "--model",
                "lab-a",
                "--device",
                "cpu",
            ]
        )
        == 2
    )
    assert "sha256" in capsys.readouterr().err


def test_bad_names_and_data_are_refused_with_a_message(synthetic_cells_dir, isolated_cache, capsys):
    assert main(["adapt", str(synthetic_cells_dir), "--out", "default"]) == 2
    assert "model of the package" in capsys.readouterr().err
    assert main(["adapt", str(synthetic_cells_dir), "--out", "../escape"]) == 2
    assert "cannot name a model" in capsys.readouterr().err
    assert main(["adapt", "/no/such/folder", "--out", "lab"]) == 2
    assert "No such file or folder" in capsys.readouterr().err
    # A bad scale is refused before any work, not after the cells are read.
    with pytest.raises(SystemExit) as stop:  # refused by the argument's own check
        main(["adapt", str(synthetic_cells_dir), "--out", "lab", "--rbc-diameter", "-4"])
    assert stop.value.code == 2
    captured = capsys.readouterr()
    assert "implausible" in captured.err and "cells per class" not in captured.out
    assert not (isolated_cache / "local" / "registry.json").exists()


def test_a_local_model_is_replaced_only_when_asked(
    synthetic_cells_dir, synthetic_rbc_diameter, isolated_cache, cheap_calibration, capsys
):
    options = ["--rbc-diameter", str(synthetic_rbc_diameter), "--device", "cpu"]
    adapt = ["adapt", str(synthetic_cells_dir), "--out", "lab-a", "--steps", "1", *options]
    assert main(adapt) == 0
    sha = weights.find_model("lab-a").sha256
    capsys.readouterr()
    assert main(adapt) == 2
    assert "A local model 'lab-a' exists" in capsys.readouterr().err
    assert weights.find_model("lab-a").sha256 == sha
    # Calibrating a local model again keeps its name (the documented default), whether it
    # is given by its name or by its file.
    assert main(["calibrate", "lab-a", str(synthetic_cells_dir), *options]) == 0
    assert "saved local model 'lab-a'" in capsys.readouterr().out
    own_file = str(weights.model_path("lab-a"))
    assert main(["calibrate", own_file, str(synthetic_cells_dir), "--out", "lab-a", *options]) == 0
    assert "saved local model 'lab-a'" in capsys.readouterr().out
    assert main([*adapt, "--replace"]) == 0


def test_a_new_class_is_learned_from_its_examples(
    synthetic_cells_dir, synthetic_rbc_diameter, isolated_cache, tmp_path
):
    from napari_cytodiffusion.core.tasks.adapt import AdaptRequest, adapt_model

    folder = tmp_path / "cells"
    shutil.copytree(synthetic_cells_dir, folder)
    shutil.copytree(folder / "lymphocyte", folder / "Blast")
    lines = []
    result = _quick_adapt(folder, "lab-blast", synthetic_rbc_diameter, lines, add_classes=True)
    assert result.new_classes == ("blast",) and "new classes: blast" in lines
    model = weights.load_model("lab-blast", device="cpu")
    assert model.classes[-1] == "blast" and model.num_classes == 9
    assert len(model.calibration["class_bias"]) == 9
    assert len(model.calibration["anomaly"]["mean"]) == 9
    with pytest.raises(ValueError, match="must be learned"):
        adapt_model(AdaptRequest(folder, "x", steps=0, add_classes=True), log=lines.append)


def test_classes_with_few_cells_are_warned_about(
    synthetic_cells_dir, synthetic_rbc_diameter, isolated_cache, tmp_path
):

    folder = tmp_path / "cells"
    shutil.copytree(synthetic_cells_dir, folder)
    for path in sorted((folder / "lymphocyte").iterdir())[2:]:
        path.unlink()
    lines = []
    result = _quick_adapt(folder, "lab-few", synthetic_rbc_diameter, lines, steps=1)
    (warning,) = [line for line in lines if line.startswith("warning: few labelled cells")]
    assert "lymphocyte (2)" in warning and "neutrophil" not in warning
    # Both of its cells adapt; none is left to calibrate on.
    assert result.adapted_on["lymphocyte"] == 2 and "lymphocyte" not in result.calibrated_on


def test_calibrating_a_few_cells_keeps_the_base_reference_and_says_so(
    synthetic_cells_dir, synthetic_rbc_diameter, isolated_cache, tmp_path, capsys
):
    """Two cells of each class cannot carry a reference of their own (fitted on one cell its
    threshold was NaN and the check silently off): the base's stays, and the run says so."""
    import warnings

    folder = tmp_path / "cells"
    for label in ("lymphocyte", "neutrophil"):
        (folder / label).mkdir(parents=True)
        for path in sorted((synthetic_cells_dir / label).glob("*.png"))[:2]:
            shutil.copy(path, folder / label / path.name)
    options = ["--out", "lab-few", "--rbc-diameter", str(synthetic_rbc_diameter)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no 0 / 0 on the way either
        assert main(["calibrate", "default", str(folder), *options, "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    assert "warning: few labelled cells for lymphocyte (2), neutrophil (2)" in err
    assert "too few to fit the lab's own 'unlike the training smears' reference" in err
    assert "still means unlike the base model's training smears" in out
    model = weights.load_model("lab-few", device="cpu")
    base = weights.load_model("default", device="cpu")
    assert model.calibration["domain"] == base.calibration["domain"]
    assert model.metadata["domain_reference"] == "base"
    thresholds = [
        model.calibration["uncertainty_threshold"],
        model.calibration["anomaly_threshold"],
        model.calibration["domain"]["features"]["threshold"],
    ]
    assert np.all(np.isfinite(thresholds))


def test_adapting_on_too_few_cells_for_a_reference_is_refused(
    synthetic_cells_dir, synthetic_rbc_diameter, isolated_cache, tmp_path
):
    """The adapted encoder is not the base's, so the base's reference cannot stand in."""
    folder = tmp_path / "cells"
    for label in ("lymphocyte", "neutrophil"):
        (folder / label).mkdir(parents=True)
        for path in sorted((synthetic_cells_dir / label).glob("*.png"))[:3]:
            shutil.copy(path, folder / label / path.name)
    lines = []
    with pytest.raises(ValueError, match="at least 4 adapting cells.*give 2 and 4"):
        _quick_adapt(folder, "lab-few", synthetic_rbc_diameter, lines, steps=1)
    assert not any("normalis" in line for line in lines)  # refused before any work
    assert weights.find_model("lab-few") is None


def test_an_undefined_threshold_is_never_saved():
    from napari_cytodiffusion.core.tasks.adapt import _check_thresholds

    calibration = {"anomaly_threshold": 2.0, "domain": {"features": {"threshold": 1.5}}}
    _check_thresholds(calibration)
    calibration["domain"]["features"]["threshold"] = float("nan")
    with pytest.raises(ValueError, match=r"domain\.features\.threshold came out undefined"):
        _check_thresholds(calibration)


def test_a_new_class_is_learned_from_a_folders_cell_labels(
    synthetic_cells_dir, synthetic_rbc_diameter, isolated_cache, tmp_path
):
    """A CellaVision-style folder a person reviewed, with a class the model lacks ("Blast",
    as typed in Classify cell images) and artefacts: the class is named, then learned."""
    from PIL import Image

    from napari_cytodiffusion.core.annotations import save_folder_labels
    from napari_cytodiffusion.core.datasets import list_labelled_images, unknown_classes

    folder = tmp_path / "export"
    folder.mkdir()
    labels = {}
    for source in sorted(synthetic_cells_dir.glob("*/*.png")):
        shutil.copy(source, folder / source.name)
        labels[source.name] = source.parent.name
    # Blasts: the lymphocytes' field with a nucleus filling the cell, drawn anew.
    rows, cols = np.mgrid[:96, :96]
    for i in range(4):
        image = np.asarray(Image.open(folder / f"lymphocyte_{i}.png")).copy()
        image[(rows - 48 + i) ** 2 + (cols - 47) ** 2 < 15**2] = (120, 50, 150)
        Image.fromarray(image).save(folder / f"blast_{i}.png")
        labels[f"blast_{i}.png"] = "Blast"
    labels["lymphocyte_5.png"] = "artefact"
    save_folder_labels(folder, labels)
    model_classes = weights.load_model("default", device="cpu").classes
    assert unknown_classes(folder, model_classes) == ["blast"]
    records = list_labelled_images(folder, classes=model_classes)
    assert len(records) == 11  # without the new class, the blasts and the artefact are out

    lines = []
    result = _quick_adapt(folder, "lab-blast", synthetic_rbc_diameter, lines, add_classes=True)
    assert result.new_classes == ("blast",) and "new classes: blast" in lines
    assert weights.load_model("lab-blast", device="cpu").classes[-1] == "blast"


def test_copies_of_a_cell_stay_together_and_disagreeing_labels_are_left_out(
    synthetic_cells_dir, synthetic_rbc_diameter, isolated_cache, tmp_path
):

    folder = tmp_path / "cells"
    shutil.copytree(synthetic_cells_dir, folder)
    # The same cell exported twice under its class, and once more under another class.
    shutil.copy(folder / "lymphocyte" / "lymphocyte_0.png", folder / "lymphocyte" / "again.png")
    shutil.copy(folder / "neutrophil" / "neutrophil_1.png", folder / "lymphocyte" / "wrong.png")
    lines = []
    result = _quick_adapt(folder, "lab-c", synthetic_rbc_diameter, lines)
    (warning,) = [line for line in lines if line.startswith("warning: the same cell")]
    assert "lymphocyte/wrong.png" in warning and "neutrophil/neutrophil_1.png" in warning
    # The drawn cells of one class differ only where red cells fall, so some match too.
    (copies,) = [line for line in lines if "images show the same cell" in line]
    assert int(copies.split()[0]) >= 4
    used = {
        name: result.adapted_on.get(name, 0) + result.calibrated_on.get(name, 0)
        for name in ("lymphocyte", "neutrophil")
    }
    assert used == {"lymphocyte": 7, "neutrophil": 5}


def test_the_split_keeps_a_cells_copies_on_one_side():
    from napari_cytodiffusion.core.tasks.adapt import AdaptRequest, _split

    labels = np.repeat([0, 1], 10)
    labels[19] = -1  # left out
    groups = np.arange(20)
    groups[[1, 2, 3]] = 1  # three copies of one cell
    groups[[11, 12]] = 11
    for seed in range(20):
        adapt_ids, held_ids = _split(labels, groups, 2, AdaptRequest(".", "x", seed=seed))
        assert 19 not in adapt_ids and 19 not in held_ids
        assert len(adapt_ids) + len(held_ids) == 19
        for copies in ([1, 2, 3], [11, 12]):
            assert set(copies) <= set(adapt_ids) or set(copies) <= set(held_ids)


def test_the_widget_adapts_and_every_widget_offers_the_new_model(
    make_napari_viewer,
    qtbot,
    synthetic_cells_dir,
    synthetic_rbc_diameter,
    isolated_cache,
    cheap_calibration,
):
    from napari_cytodiffusion._widgets._adapt import AdaptWidget
    from napari_cytodiffusion._widgets._generate import GenerateWidget

    viewer = make_napari_viewer()
    widget, generate = AdaptWidget(viewer), GenerateWidget(viewer)
    viewer.window.add_dock_widget(widget)
    assert "lab-b" not in generate._fields.model.choices
    _start_adapting(widget, synthetic_cells_dir, "lab-b", 2, synthetic_rbc_diameter)
    assert widget._runner.running
    qtbot.waitUntil(lambda: not widget._runner.running, timeout=180_000)
    assert widget._status.value.startswith("done: 'lab-b'"), widget._status.value
    assert "saved local model 'lab-b'" in widget._log.value
    assert "lab-b" in generate._fields.model.choices
    assert len(viewer.layers) == 0


def test_the_widget_cancels_within_a_second_and_registers_nothing(
    make_napari_viewer,
    qtbot,
    synthetic_cells_dir,
    synthetic_rbc_diameter,
    isolated_cache,
    cancel_latency,
):
    from napari_cytodiffusion._widgets._adapt import AdaptWidget

    viewer = make_napari_viewer()
    widget = AdaptWidget(viewer)
    viewer.window.add_dock_widget(widget)
    _start_adapting(widget, synthetic_cells_dir, "lab-c", 200, synthetic_rbc_diameter)
    qtbot.waitUntil(lambda: "adapting on" in widget._log.value, timeout=60_000)
    begun = widget._runner._state["done"]
    qtbot.waitUntil(lambda: widget._runner._state["done"] > begun, timeout=60_000)  # a step in
    assert cancel_latency(widget) < 1.0
    assert widget._status.value.startswith("cancelled")
    assert weights.find_model("lab-c") is None


def test_the_widget_replaces_a_local_model_only_when_ticked(
    make_napari_viewer, qtbot, synthetic_cells_dir, synthetic_rbc_diameter, isolated_cache
):
    """As the command line needs --replace: the task's own check, before any work."""
    from napari_cytodiffusion._widgets._adapt import AdaptWidget

    _quick_adapt(synthetic_cells_dir, "my-lab", synthetic_rbc_diameter, [], steps=0)
    sha = weights.find_model("my-lab").sha256
    viewer = make_napari_viewer()
    widget = AdaptWidget(viewer)
    viewer.window.add_dock_widget(widget)
    assert widget._name.value == "my-lab"
    for button in (widget._calibrate, widget._adapt):
        widget._data.value = synthetic_cells_dir
        button.native.click()
        assert not widget._runner.running
        assert widget._status.value.startswith("not started: A local model 'my-lab' exists")
        assert "replace the local model of this name" in widget._status.value
    assert weights.find_model("my-lab").sha256 == sha
    assert not widget._replace.value  # unticked unless the person ticks it
    widget._replace.value = True
    widget._device.value = "cpu"
    widget._calibrate.native.click()
    assert widget._runner.running  # started; cancelled, it replaces nothing
    widget._cancel.native.click()
    qtbot.waitUntil(lambda: not widget._runner.running, timeout=60_000)
    assert widget._status.value.startswith("cancelled")
    assert weights.find_model("my-lab").sha256 == sha


def _start_adapting(widget, folder, name, steps, rbc_diameter):
    widget._data.value = folder
    widget._name.value = name
    widget._steps.value = steps
    widget._device.value = "cpu"
    widget._rbc_diameter.value = rbc_diameter
    widget._adapt.native.click()


def test_a_closed_widget_does_not_stop_new_models_reaching_the_others(make_napari_viewer, qtbot):
    from napari_cytodiffusion._widgets._classify import ClassifyWidget
    from napari_cytodiffusion._widgets._common import refresh_model_choices
    from napari_cytodiffusion._widgets._generate import GenerateWidget

    viewer = make_napari_viewer()
    closed, still_open = ClassifyWidget(viewer), GenerateWidget(viewer)
    closed.native.deleteLater()  # as Qt does when the user closes its dock
    qtbot.waitUntil(lambda: _deleted(closed._fields.model.native), timeout=5_000)
    still_open._fields.model.native.clear()
    refresh_model_choices()
    assert "default" in still_open._fields.model.choices
    assert still_open._fields.model.native.count() > 0


def _deleted(qt_widget):
    try:
        qt_widget.objectName()
    except RuntimeError:
        return True
    return False


def test_the_widget_refuses_a_missing_folder(make_napari_viewer, monkeypatch, isolated_cache):
    from napari_cytodiffusion._widgets import _adapt

    errors = []
    monkeypatch.setattr("napari.utils.notifications.show_error", errors.append)
    widget = _adapt.AdaptWidget(make_napari_viewer())
    widget._calibrate.native.click()
    assert not widget._runner.running and "cell folder" in errors[0]
    assert widget._status.value == f"not started: {errors[0]}"


def test_a_lab_folder_of_two_scanners_is_warned_about(synthetic_cells_dir, tmp_path):
    from types import SimpleNamespace

    from PIL import Image

    from napari_cytodiffusion.core.tasks.adapt import _lab_scale

    paths = sorted((synthetic_cells_dir / "lymphocyte").glob("*.png"))
    wide = tmp_path / "wide.png"  # another scanner's frame: 2.5 times the size
    Image.open(paths[0]).resize((240, 240)).save(wide)
    lines = []
    records = [SimpleNamespace(path=path, rbc_diameter=None) for path in paths]
    assert _lab_scale(records, lines.append) is not None
    assert not any("warning" in line for line in lines)
    _lab_scale([*records, SimpleNamespace(path=wide, rbc_diameter=None)], lines.append)
    assert "6 of 96 x 96 px, 1 of 240 x 240 px" in lines[-2] and "--rbc-diameter" in lines[-2]


def test_the_paired_term_scores_every_class_on_the_same_noisy_cell():
    import torch

    from napari_cytodiffusion.core.model.adaptation import PAIRED_SCALE, paired_loss
    from napari_cytodiffusion.core.model.unet import CellUNet

    torch.manual_seed(0)
    unet = CellUNet(num_classes=3, channels=(8, 16, 16), image_size=16).eval()
    for weight in unet.parameters():  # zero-initialised layers would make every class alike
        if not weight.abs().sum():
            torch.nn.init.normal_(weight, std=0.1)
    xt, noise = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)
    t, labels = torch.tensor([100, 700]), torch.tensor([2, 0])
    # The same as a full forward pass per class, one cell at a time.
    errors = torch.stack(
        [
            torch.stack(
                [
                    ((unet(xt[i : i + 1], t[i : i + 1], torch.tensor([k])) - noise[i]) ** 2).mean()
                    for k in range(3)
                ]
            )
            for i in range(2)
        ]
    )
    logits = -PAIRED_SCALE * errors / errors.mean(dim=1, keepdim=True)
    expected = torch.nn.functional.cross_entropy(logits, labels)
    loss = paired_loss(unet, xt, t, noise, labels)
    assert torch.isclose(loss, expected, rtol=1e-4)
    assert errors[0].std() > 0  # the classes are told apart
    loss.backward()
    assert unet.class_emb.weight.grad[:3].abs().sum() > 0  # it reaches the class embeddings
