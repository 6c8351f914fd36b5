"""Training: a tiny model learns, runs resume exactly, a cancel saves, fine-tuning starts from
given weights, and an exported model loads back with the same outputs."""

import contextlib

import numpy as np
import pytest
import torch

from napari_cytodiffusion.cli import main
from napari_cytodiffusion.core.classes import CLASSES
from napari_cytodiffusion.core.datasets import list_labelled_images, pack_cells
from napari_cytodiffusion.core.model.checkpoint import load_model_file
from napari_cytodiffusion.core.model.training import export_model, train
from napari_cytodiffusion.core.model.unet import CellUNet
from napari_cytodiffusion.core.progress import Cancelled

TINY = {"channels": (16, 32, 32), "batch_size": 8, "device": "cpu", "log": lambda _: None}


@contextlib.contextmanager
def one_thread():
    """Tiny models train faster on one thread, and do not suffer from a busy second core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_pack(synthetic_cells_dir, synthetic_rbc_diameter, tmp_path_factory):
    pack = tmp_path_factory.mktemp("pack") / "cells.npz"
    records = list_labelled_images(synthetic_cells_dir)
    pack_cells(records, pack, 64, rbc_diameter=synthetic_rbc_diameter)
    return pack


@pytest.fixture(scope="session")
def trained(tiny_pack, tmp_path_factory):
    """40 steps of a tiny UNet: (checkpoint path, training summary)."""
    checkpoint = tmp_path_factory.mktemp("trained") / "tiny.ckpt"
    # A high peak rate because the 500-step warm-up keeps the first 40 steps far below it.
    with one_thread():
        summary = train(tiny_pack, checkpoint, steps=40, lr=0.1, seed=0, validate_every=10, **TINY)
    return checkpoint, summary


def _inputs(image_size=64, n=4):
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(n, 3, image_size, image_size, generator=generator)
    return x, torch.tensor([10, 300, 600, 990]), torch.tensor([0, 4, 6, len(CLASSES)])


def test_training_lowers_the_loss(trained):
    _, summary = trained
    losses = [loss for _, loss in summary["history"]["train_loss"]]
    assert summary["step"] == 40
    assert len(losses) == 4  # mean loss of steps 1-10, 11-20, 21-30, 31-40
    # Measured with seed 0 on CPU: 0.971, 0.838, 0.699, 0.612.
    assert losses[-1] < 0.8 * losses[0]
    assert losses == sorted(losses, reverse=True)


def test_cancel_saves_a_checkpoint_that_resumes_exactly(tiny_pack, tmp_path):
    straight, stopped = tmp_path / "straight.ckpt", tmp_path / "stopped.ckpt"

    def cancel_at_step_3(step, _total):
        if step == 3:
            raise Cancelled()

    with one_thread():
        train(tiny_pack, straight, steps=6, lr=0.01, seed=3, **TINY)
        with pytest.raises(Cancelled):
            train(tiny_pack, stopped, steps=6, lr=0.01, seed=3, progress=cancel_at_step_3, **TINY)
        assert torch.load(stopped, weights_only=True)["step"] == 3
        train(tiny_pack, stopped, steps=6, lr=0.01, seed=3, resume=stopped, **TINY)

    expected = torch.load(straight, weights_only=True)
    resumed = torch.load(stopped, weights_only=True)
    assert resumed["step"] == 6
    for part in ("model", "ema"):
        for key, value in expected[part].items():
            assert torch.equal(resumed[part][key], value), (part, key)


def test_init_starts_from_the_given_weights(trained, tiny_pack, tmp_path):
    checkpoint, _ = trained
    start = tmp_path / "start.pt"
    export_model(checkpoint, start)
    out = tmp_path / "fine_tuned.ckpt"
    train(tiny_pack, out, steps=0, init=start, **TINY)
    state = torch.load(out, weights_only=True)
    expected = load_model_file(start).unet.state_dict()
    for part in ("model", "ema"):
        for key, value in expected.items():
            assert torch.equal(state[part][key], value), (part, key)


def test_init_or_resume_with_another_architecture_is_refused(trained, tiny_pack, tmp_path):
    checkpoint, _ = trained
    other = {**TINY, "channels": (16, 32, 64)}
    with pytest.raises(ValueError, match="same channels"):
        train(tiny_pack, tmp_path / "x.ckpt", steps=0, init=checkpoint, **other)
    # Resuming says what to change too, not torch's list of mismatched tensor sizes.
    with pytest.raises(ValueError, match=r"to resume it, train with .*--channels 16,32,32 "):
        train(tiny_pack, tmp_path / "y.ckpt", steps=50, resume=checkpoint, **other)


def test_export_round_trip(trained, tmp_path):
    checkpoint, _ = trained
    exported = tmp_path / "tiny.pt"
    export_model(checkpoint, exported, metadata={"name": "tiny"}, calibration={"temperature": 2.0})
    model = load_model_file(exported, "cpu")
    assert model.classes == CLASSES and model.image_size == 64
    assert model.metadata == {"name": "tiny"} and model.calibration == {"temperature": 2.0}

    state = torch.load(checkpoint, weights_only=True)
    reference = CellUNet(len(CLASSES), TINY["channels"], 64).eval()
    reference.load_state_dict({k: v.half().float() for k, v in state["ema"].items()})
    x, t, y = _inputs()
    with torch.no_grad():
        assert torch.equal(model.unet(x, t, y), reference(x, t, y))
        full_precision = load_model_file(checkpoint, "cpu").unet(x, t, y)
    # The export keeps float16 weights: outputs differ from the checkpoint by rounding only.
    assert torch.allclose(model.unet(x, t, y), full_precision, atol=2e-2)


def test_cli_fine_tunes_the_default_model(
    synthetic_cells_dir, synthetic_rbc_diameter, default_model, tmp_path
):
    out = tmp_path / "lab.ckpt"
    options = {"--out": out, "--init": "default", "--steps": 1, "--batch-size": 2}
    options.update({"--device": "cpu", "--rbc-diameter": synthetic_rbc_diameter})
    argv = ["train", str(synthetic_cells_dir)]
    for option, value in options.items():
        argv += [option, str(value)]
    assert main(argv) == 0
    state = torch.load(out, weights_only=True)
    assert state["step"] == 1
    # One tiny warm-up step away from the default weights, not a fresh initialisation (whose
    # output layer starts at zero).
    default = default_model.unet.state_dict()["out.weight"]
    assert default.abs().sum() > 0
    assert torch.allclose(state["ema"]["out.weight"], default, atol=1e-3)


def test_an_output_that_would_be_lost_or_not_written_is_refused_first(
    synthetic_cells_dir, tmp_path, capsys
):
    """Before any cell is read: a trained model is not replaced unasked, a folder is no
    model file, and a network too deep for its resolution is caught."""
    trained = tmp_path / "trained.pt"
    trained.write_bytes(b"weeks of training")
    argv = ["train", str(synthetic_cells_dir), "--steps", "1", "--device", "cpu"]
    assert main([*argv, "--out", str(trained)]) == 2
    assert "exists: choose another output" in capsys.readouterr().err
    assert trained.read_bytes() == b"weeks of training"
    assert main([*argv, "--out", str(tmp_path)]) == 2
    assert "is a folder; give the model file" in capsys.readouterr().err
    deep = ["--out", str(tmp_path / "deep.pt"), "--channels", "4,4,4,4,4,4,4"]
    assert main([*argv, *deep]) == 2
    error = capsys.readouterr().err
    assert "multiple of 128 px for 7 levels" in error and "normalising" not in error
    assert main([*argv, "--out", str(tmp_path / "t.pt"), "--time-limit", "-5"]) == 2
    assert "time_limit must be more than 0" in capsys.readouterr().err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["trained.pt"]


def test_a_start_that_does_not_fit_is_refused_before_any_cell_is_normalised(
    trained, synthetic_cells_dir, tmp_path, capsys
):
    """The model to start from or resume is checked with the other arguments: a mismatch
    is not found only after every cell was normalised."""
    import shutil

    checkpoint, _ = trained  # 40 steps, channels 16,32,32, 64 px
    resumed = tmp_path / "r.ckpt"
    shutil.copy(checkpoint, resumed)
    model_file = tmp_path / "mine.pt"
    export_model(checkpoint, model_file)
    argv = ["train", str(synthetic_cells_dir), "--device", "cpu", "--batch-size", "2"]
    tiny = ["--channels", "16,32,32", "--steps", "41"]
    refused = {
        "--resolution 32": (
            [
                *tiny,
                "--out",
                str(tmp_path / "a.ckpt"),
                "--init",
                str(checkpoint),
                "--resolution",
                "32",
            ],
            "same channels and resolution (--channels 16,32,32 --resolution 64)",
        ),
        "--channels": (
            ["--channels", "32,64", "--steps", "1", "--out", str(tmp_path / "b.ckpt")]
            + ["--init", str(checkpoint)],
            "this run: channels 32,64, 64 px",
        ),
        "a model file to resume": (
            [*tiny, "--out", str(model_file), "--resume", str(model_file)],
            "mine.pt is a model file, not a training checkpoint to resume",
        ),
        "steps already taken": (
            ["--channels", "16,32,32", "--steps", "5", "--out", str(resumed)]
            + ["--resume", str(resumed)],
            "r.ckpt is at step 40 already; give more than 40 steps",
        ),
        # 0 is a size like -64 or 60, not "the default".
        "--resolution 0": (
            [*tiny, "--out", str(tmp_path / "c.ckpt"), "--resolution", "0"],
            "resolution must be a positive multiple of 8 px for 3 levels of channels, got 0",
        ),
    }
    for case, (options, message) in refused.items():
        assert main([*argv, *options]) == 2, case
        error = capsys.readouterr().err
        assert message in error and "normalising" not in error, (case, error)
    assert torch.load(resumed, weights_only=True)["step"] == 40
    assert sorted(path.name for path in tmp_path.iterdir()) == ["mine.pt", "r.ckpt"]


# ----------------------------------------------------------------------------- v2 preparation


@pytest.fixture(scope="session")
def v2_pack(synthetic_cells_dir, synthetic_rbc_diameter, tmp_path_factory):
    """A tiny pack as benchmarks/train_v2_gpu.py makes it: labelled cells of every split
    and unlabelled cells of a field (label -1), stain-normalised, crops 1.25 times wide."""
    from napari_cytodiffusion.core.datasets import Record

    files = sorted(synthetic_cells_dir.glob("*/*.png"))
    splits = ["train", "train", "val", "test"]
    records = [
        Record(f, f.parent.name, splits[i % 4], synthetic_rbc_diameter, None, "synthetic")
        for i, f in enumerate(files)
    ]
    field = files[0]
    records += [
        Record(field, "", "train", synthetic_rbc_diameter, (48.0, 48.0), "field"),
        Record(field, "", "train", synthetic_rbc_diameter, (40.0, 52.0), "field"),
    ]
    pack = tmp_path_factory.mktemp("v2pack") / "pack.npz"
    pack_cells(records, pack, 64, classes=("lymphocyte", "neutrophil"), margin=1.25)
    return pack


def test_a_pack_holds_unlabelled_cells_for_the_null_class(v2_pack):
    from napari_cytodiffusion.core.datasets import UNLABELLED, load_pack

    cells = load_pack(v2_pack, splits=("train", "val", "test"))
    assert cells.images.shape[1:] == (80, 80, 3)
    assert (cells.labels == UNLABELLED).sum() == 2
    assert set(cells.splits) == {"train", "val", "test"}


def test_lab_augmentations_keep_shape_and_range_and_vary(v2_pack):
    from napari_cytodiffusion.core.datasets import load_pack
    from napari_cytodiffusion.core.model import augment
    from napari_cytodiffusion.core.model.training import augment as geometric

    images = torch.from_numpy(load_pack(v2_pack).images[:4])
    generator = torch.Generator().manual_seed(0)
    x = geometric(images, 64, generator, zoom=0.18, lab=True)
    assert x.shape == (4, 3, 64, 64) and torch.isfinite(x).all()
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    base = images.permute(0, 3, 1, 2).float()[:, :, 8:72, 8:72] / 255
    for function in (
        augment.stain_jitter,
        augment.colour_jitter,
        augment.illumination,
        augment.blur,
        augment.sensor_noise,
        augment.jpeg_artefacts,
    ):
        out = function(base, generator)
        assert out.shape == base.shape and 0 <= float(out.min()) and float(out.max()) <= 1
        assert float((out - base).abs().mean()) > 1e-3, function.__name__
    # With no change asked for, the stain is left as it was.
    same = augment.stain_jitter(base, generator, amount=0.0, hue_degrees=0.0)
    assert torch.allclose(same, base, atol=1e-5)
    # Blur lowers the high frequencies; it never adds any.
    sharp = (base[:, :, 1:] - base[:, :, :-1]).abs().mean()
    soft = augment.blur(base, generator, sigma=1.5)
    assert (soft[:, :, 1:] - soft[:, :, :-1]).abs().mean() < sharp


def test_a_stain_change_keeps_a_nucleus_darker_than_the_glass():
    # A violet nucleus lets blue through: a plain unmixing splits it into much blue dye and
    # negative red dye, and scaling the two apart once made nuclei paler than the background.
    import torch

    from napari_cytodiffusion.core.model import augment

    background = augment._background("cpu")
    nucleus = torch.tensor([0.45, 0.8, 0.0]).view(1, 3, 1, 1)  # optical density
    red_cell = torch.tensor([0.19, 0.27, 0.18]).view(1, 3, 1, 1)
    glass = torch.zeros(1, 3, 1, 1)
    x = background * torch.exp(-torch.cat([nucleus, red_cell, glass], 3).expand(256, 3, 1, 3))
    out = augment.stain_jitter(x, torch.Generator().manual_seed(0), amount=0.35, hue_degrees=10)
    assert (out <= background + 1e-5).all()  # no dye makes light
    assert torch.allclose(out[..., 2], x[..., 2])  # the glass stays
    nucleus_density = -torch.log(out[..., 0] / background[..., 0]).sum(1)
    assert nucleus_density.min() > 0.5  # of 1.25 in all: paler, never gone
    assert nucleus_density.std() > 0.1  # and the stain did change


def test_greyscale_takes_the_colours_and_keeps_the_brightness():
    from napari_cytodiffusion.core.model import augment

    generator = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 8, 8, generator=generator)
    grey = augment.greyscale(x, generator, probability=0.5)
    greyed = (grey[:, 0] == grey[:, 1]).all(dim=(1, 2)) & (grey[:, 1] == grey[:, 2]).all(dim=(1, 2))
    assert 10 < int(greyed.sum()) < 54  # about half the images
    assert torch.equal(grey[~greyed], x[~greyed])  # the others are untouched
    luma = (x[greyed] * torch.tensor(augment.LUMA).view(1, 3, 1, 1)).sum(1)
    assert torch.allclose(grey[greyed][:, 0], luma)


def test_v2_recipe_runs_two_steps_and_evaluates(v2_pack, tmp_path):
    """benchmarks/train_v2_gpu.py run: lab augmentation, unlabelled null-class cells,
    export, exhaustive errors with the null class, calibration on val, calls on test."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "train_v2_gpu.py"
    out = tmp_path / "out"
    command = [sys.executable, str(script), "run", "--pack", str(v2_pack), "--out", str(out)]
    command += ["--device", "cpu", "--steps", "2", "--batch-size", "4", "--channels", "16,32,32"]
    command += ["--trials", "2", "--from-scratch", "--save-errors", "--keep-model"]
    env = {"OMP_NUM_THREADS": "1", "PATH": "", "PYTHONPATH": ""}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((out / "v2_result.json").read_text())
    assert result["steps"] == 2
    assert result["test_adaptive"]["cells"] > 0
    assert (out / "v2.pt").exists() and (out / "v2_errors.npz").exists()
    errors = __import__("numpy").load(out / "v2_errors.npz")
    assert errors["val"].shape[1:] == (2, 3)  # 2 trials, 2 classes and the null class
    calibration = json.loads((out / "v2_calibration.json").read_text())
    assert calibration["anomaly"]["method"] == "null_gain"
    metadata = load_model_file(out / "v2.pt", "cpu").metadata
    assert metadata["augmentation"].startswith("lab") and metadata["init"] is None


def test_a_left_out_class_is_never_trained_on(v2_pack, tmp_path):
    from napari_cytodiffusion.core.model.training import _training_set

    everything = _training_set(v2_pack, 64, torch.device("cpu"))
    without = _training_set(v2_pack, 64, torch.device("cpu"), leave_out=("neutrophil",))
    assert len(without.train_index) < len(everything.train_index)
    assert 1 not in without.labels[without.train_index].tolist()
    # Unlabelled cells are drawn a tenth of the time.
    unlabelled = (everything.labels[everything.train_index] < 0).numpy()
    share = float(everything.weights[torch.from_numpy(unlabelled)].sum() / everything.weights.sum())
    assert abs(share - 0.1) < 1e-6
    with pytest.raises(ValueError, match="leave out"):
        _training_set(v2_pack, 64, torch.device("cpu"), leave_out=("blast",))


def test_a_lossless_pack_keeps_the_crops_the_classifier_sees(
    synthetic_cells_dir, synthetic_rbc_diameter, tmp_path
):
    import numpy as np

    from napari_cytodiffusion.core.datasets import JPEG_QUALITY, load_pack, pack_cache_path
    from napari_cytodiffusion.core.io import read_image
    from napari_cytodiffusion.core.smear.crops import central_cell_site
    from napari_cytodiffusion.core.smear.prepare import prepare_smear

    records = list_labelled_images(synthetic_cells_dir)[:3]
    packs = {}
    for quality in (None, JPEG_QUALITY):
        packs[quality] = tmp_path / f"{quality}.npz"
        # margin 1: the stored crop is the classifier's own field of view
        pack_cells(records, packs[quality], 64, synthetic_rbc_diameter, quality, margin=1.0)
    live = []
    for record in records:
        smear = prepare_smear(read_image(record.path), synthetic_rbc_diameter)
        live.append(central_cell_site(smear).crop(smear.rgb, 64))
    live = (np.stack(live) * 255 + 0.5).astype(np.uint8)
    splits = ("train", "val", "test")
    assert np.array_equal(load_pack(packs[None], splits).images, live)
    assert not np.array_equal(load_pack(packs[JPEG_QUALITY], splits).images, live)
    # A lossless pack of the same cells is cached under another name.
    out = tmp_path / "model.pt"
    assert pack_cache_path(out, records, 64, quality=None) != pack_cache_path(out, records, 64)


def test_a_pack_names_each_cell_s_file_compactly(tiny_pack, synthetic_cells_dir):
    records = list_labelled_images(synthetic_cells_dir)
    with np.load(tiny_pack) as pack:
        files, sources = pack["files"], pack["sources"]
    # One byte a character: a full PBC pack must fit beside the code on a GPU machine.
    assert files.dtype.kind == "S" and sources.dtype.kind == "S"
    assert [name.decode("utf-8") for name in files] == [str(r.path) for r in records]
