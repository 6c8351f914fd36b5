"""Training: a tiny model learns, runs resume exactly, a cancel saves, fine-tuning starts from
given weights, and an exported model loads back with the same outputs."""

import contextlib

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


def test_init_with_another_architecture_is_refused(trained, tiny_pack, tmp_path):
    checkpoint, _ = trained
    with pytest.raises(ValueError, match="same channels"):
        train(
            tiny_pack,
            tmp_path / "x.ckpt",
            steps=0,
            init=checkpoint,
            **{**TINY, "channels": (16, 32, 64)},
        )


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
