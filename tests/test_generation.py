"""Synthetic cells: reproducible per-cell seeds, the samplers' accuracy, files written."""

import csv
import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from napari_cytodiffusion import cli
from napari_cytodiffusion.core.model import generation, sampling
from napari_cytodiffusion.core.model.diffusion import cosine_alpha_bars
from napari_cytodiffusion.core.smear.crops import REFERENCE_BACKGROUND


@pytest.fixture(scope="module")
def two_cells(default_model):
    return generation.generate_cells(default_model, "lymphocyte", 2, steps=3, seed=7)


def test_cells_have_the_model_shape_and_their_metadata(two_cells, default_model):
    assert two_cells.images.shape == (2, 64, 64, 3)
    assert two_cells.images.dtype == np.float32
    assert 0 <= two_cells.images.min() and two_cells.images.max() <= 1
    assert two_cells.labels == ["lymphocyte", "lymphocyte"]
    assert two_cells.seeds == [7, 8]
    assert (two_cells.steps, two_cells.guidance, two_cells.sampler) == (3, 2.0, "dpm++2m")
    assert two_cells.model_name == default_model.name
    assert np.abs(two_cells.images[0] - two_cells.images[1]).mean() > 0.02


def test_same_seed_same_cells_and_each_cell_has_its_own_seed(two_cells, default_model):
    again = generation.generate_cells(default_model, "lymphocyte", 2, steps=3, seed=7, batch_size=1)
    np.testing.assert_allclose(again.images, two_cells.images, atol=2e-3)
    second_alone = generation.generate_cells(default_model, "lymphocyte", 1, steps=3, seed=8)
    np.testing.assert_allclose(second_alone.images[0], two_cells.images[1], atol=2e-3)


def test_one_class_per_cell(default_model):
    cells = generation.generate_cells(default_model, ["ig", "platelet"], steps=1, seed=0)
    assert cells.labels == ["immature_granulocyte", "platelet"]


@pytest.mark.parametrize(
    "label, n, message",
    [
        ("lymphocyte", None, "number of cells"),
        ("blast", 2, "Unknown cell class"),
        ([], None, "No classes"),
    ],
)
def test_bad_requests_are_explained(default_model, label, n, message):
    with pytest.raises(ValueError, match=message):
        generation.generate_cells(default_model, label, n, steps=1)


def test_sampling_times_are_even_in_log_snr():
    alpha_bars = cosine_alpha_bars()
    times = sampling.sampling_times(alpha_bars, 999, 10)
    assert times[0] == 999 and times[-1] == 0 and len(times) == 11
    assert torch.all(times[1:] < times[:-1])
    log_snr = 0.5 * torch.log(alpha_bars[times] / (1 - alpha_bars[times]))
    gaps = log_snr[1:] - log_snr[:-1]
    assert gaps.std() / gaps.mean() < 0.1


class GaussianDenoiser(torch.nn.Module):
    """The exact noise predictor for data ~ N(0, spread^2): the sampler's answer is known."""

    num_classes = 1

    def __init__(self, alpha_bars, spread):
        super().__init__()
        self.alpha_bars, self.spread = alpha_bars, spread

    def forward(self, x, t, y):
        a = self.alpha_bars[t].view(-1, 1, 1, 1)
        return (1 - a).sqrt() * x / (a * self.spread**2 + 1 - a)


@pytest.mark.parametrize("sampler", sampling.SAMPLERS)
def test_samplers_solve_the_flow_of_a_known_distribution(sampler):
    alpha_bars, spread = cosine_alpha_bars(), 0.2
    noise = torch.randn((4, 3, 8, 8), generator=torch.Generator().manual_seed(0))
    a_top = alpha_bars[999]
    exact = noise * spread / (a_top * spread**2 + 1 - a_top).sqrt()
    model = GaussianDenoiser(alpha_bars, spread)
    error = {}
    for steps in (5, 20, 200):
        x = sampling.denoise(
            model, noise, torch.zeros(4, dtype=torch.long), alpha_bars, steps, 1.0, sampler
        )
        error[steps] = float((x - exact).abs().max())
    assert error[200] < error[20] < error[5]
    assert error[200] < 0.02


def test_the_second_order_sampler_is_more_accurate_per_step():
    alpha_bars, spread = cosine_alpha_bars(), 0.2
    noise = torch.randn((4, 3, 8, 8), generator=torch.Generator().manual_seed(1))
    a_top = alpha_bars[999]
    exact = noise * spread / (a_top * spread**2 + 1 - a_top).sqrt()
    model, classes = GaussianDenoiser(alpha_bars, spread), torch.zeros(4, dtype=torch.long)
    errors = {
        sampler: float(
            (sampling.denoise(model, noise, classes, alpha_bars, 8, 1.0, sampler) - exact)
            .abs()
            .max()
        )
        for sampler in sampling.SAMPLERS
    }
    assert errors["dpm++2m"] < errors["ddim"] / 2


def test_background_balance_reaches_the_reference_colour():
    crop = np.full((1, 64, 64, 3), [0.7, 0.8, 0.9], np.float32)
    crop[0, 20:40, 20:40] = [0.3, 0.2, 0.5]
    balanced = generation.balance_background(crop)
    np.testing.assert_allclose(balanced[0, 0, 0], REFERENCE_BACKGROUND, atol=1e-5)


def test_saved_cells_and_metadata(two_cells, tmp_path):
    path = generation.save_cells(two_cells, tmp_path)
    rows = list(csv.DictReader(open(path)))
    assert [r["file"] for r in rows] == ["lymphocyte_0007.png", "lymphocyte_0008.png"]  # seeds
    assert [r["seed"] for r in rows] == ["7", "8"]
    assert {(r["label"], r["steps"], r["guidance"], r["sampler"]) for r in rows} == {
        ("lymphocyte", "3", "2.0", "dpm++2m")
    }
    assert rows[0]["model"] == two_cells.model_name
    saved = np.asarray(Image.open(tmp_path / rows[1]["file"]))
    np.testing.assert_array_equal(saved, generation.to_uint8(two_cells.images[1]))


def test_generate_command_writes_pngs_and_metadata(tmp_path, capsys):
    out = tmp_path / "cells"
    argv = ["generate", "--label", "platelet", "-n", "2", "--steps", "2", "--seed", "3"]
    assert cli.main([*argv, "--device", "cpu", "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "metadata.csv")))
    assert [(r["label"], r["seed"], r["steps"]) for r in rows] == [
        ("platelet", "3", "2"),
        ("platelet", "4", "2"),
    ]
    assert all((out / r["file"]).is_file() for r in rows)
    assert "2 platelet cells" in capsys.readouterr().out


def test_generate_command_rejects_an_unknown_class(tmp_path, capsys):
    assert cli.main(["generate", "--label", "blast", "--out", str(tmp_path)]) == cli.USAGE_ERROR
    assert "Unknown cell class 'blast'" in capsys.readouterr().err


def test_a_second_run_into_the_folder_keeps_the_earlier_cells(tmp_path):
    out = tmp_path / "gen"
    argv = ["generate", "--label", "neutrophil", "--steps", "1", "--device", "cpu", "--out"]
    assert cli.main([*argv, str(out), "-n", "3", "--seed", "0"]) == 0
    first = (out / "neutrophil_0000.png").read_bytes()
    # The help's own advice: a cell's seed regenerates it alone.
    assert cli.main([*argv, str(out), "-n", "1", "--seed", "2"]) == 0
    rows = list(csv.DictReader(open(out / "metadata.csv")))
    assert sorted((r["file"], r["seed"]) for r in rows) == [
        ("neutrophil_0000.png", "0"),
        ("neutrophil_0001.png", "1"),
        ("neutrophil_0002.png", "2"),
    ]
    assert (out / "neutrophil_0000.png").read_bytes() == first
    assert sorted(p.name for p in out.glob("*.png")) == [r["file"] for r in rows]


def _cells(seed, steps):
    images = np.full((1, 64, 64, 3), 0.5, np.float32)
    return generation.SyntheticCells(images, ["monocyte"], [seed], steps, 2.0, "dpm++2m", "m")


def test_saving_another_cell_under_a_seeds_file_is_refused(tmp_path):
    path = generation.save_cells(_cells(seed=4, steps=15), tmp_path)
    metadata = path.read_text()
    with pytest.raises(ValueError, match="monocyte_0004.png .* other settings"):
        generation.save_cells(_cells(seed=4, steps=30), tmp_path)
    assert path.read_text() == metadata
    generation.save_cells(_cells(seed=4, steps=15), tmp_path)  # the same cell again: fine
    assert path.read_text() == metadata


def test_generate_refuses_a_clash_before_generating(tmp_path, capsys, monkeypatch):
    from napari_cytodiffusion.core.tasks import generate as task

    argv = [
        "generate",
        "--label",
        "neutrophil",
        "-n",
        "1",
        "--device",
        "cpu",
        "--out",
        str(tmp_path),
    ]
    assert cli.main([*argv, "--steps", "2"]) == 0
    monkeypatch.setattr(task, "generate", lambda *a, **k: pytest.fail("generated first"))
    assert cli.main([*argv, "--steps", "3"]) == 2
    assert "neutrophil_0000.png holds a cell made with other settings (steps 2)" in (
        capsys.readouterr().err
    )


def test_generate_refuses_settings_the_sampler_cannot_use(default_model):
    from napari_cytodiffusion.core.tasks.generate import generate

    for settings, message in (
        ({"steps": 2.5}, "steps must be a whole number"),
        ({"steps": None}, "steps must be a whole number"),
        ({"guidance": "2"}, "guidance must be a finite number"),
        ({"n": 1.7}, "a whole number from 1"),
    ):
        with pytest.raises(ValueError, match=message):
            generate(default_model, "platelet", **{"n": 1, **settings})


def test_a_model_file_is_the_same_model_however_its_path_is_written(tmp_path, monkeypatch):
    import shutil

    from napari_cytodiffusion.core.model import weights

    shutil.copy(weights.model_path("default"), tmp_path / "m.pt")
    monkeypatch.chdir(tmp_path)
    argv = ["generate", "--label", "platelet", "-n", "1", "--steps", "2", "--device", "cpu"]
    for model in ("m.pt", str(tmp_path / "m.pt")):
        assert cli.main([*argv, "--model", model, "--out", "cells"]) == 0
    (row,) = list(csv.DictReader(open(tmp_path / "cells" / "metadata.csv")))
    assert row["model"] == str((tmp_path / "m.pt").resolve())


def test_generate_refuses_a_folder_inside_a_file_before_generating(tmp_path, capsys, monkeypatch):
    taken = tmp_path / "bad.png"
    taken.write_text("a file of the user's")
    monkeypatch.setattr(cli, "_load_model", lambda *_: pytest.fail("generated before checking"))
    with pytest.raises(SystemExit) as stop:
        cli.main(["generate", "--label", "lymphocyte", "-n", "1", "--out", str(taken / "sub")])
    assert stop.value.code == cli.USAGE_ERROR
    assert f"{taken} is a file, so {taken / 'sub'} cannot be made" in capsys.readouterr().err
    assert taken.read_text() == "a file of the user's"


def test_guidance_below_1_is_refused_for_the_cells_would_leave_their_class(default_model):
    from napari_cytodiffusion.core.tasks.generate import generate

    # At 0 every class gives the same cell, which would yet be labelled with its class.
    for guidance in (0, 0.0, 0.5, 0.99):
        with pytest.raises(ValueError, match="guidance must be a finite number of at least 1"):
            generate(default_model, "platelet", n=1, steps=1, guidance=guidance)
    assert generate(default_model, "platelet", n=1, steps=1, guidance=1).guidance == 1.0


def test_a_file_or_metadata_not_made_by_generation_is_not_replaced(tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "metadata.csv").write_text("patient,count\nA,3\n")
    with pytest.raises(ValueError, match="not a list of generated cells.* another folder"):
        generation.save_cells(_cells(seed=4, steps=15), theirs)
    assert (theirs / "metadata.csv").read_text() == "patient,count\nA,3\n"
    assert not (theirs / "monocyte_0004.png").exists()

    unlisted = tmp_path / "unlisted"
    unlisted.mkdir()
    (unlisted / "monocyte_0004.png").write_bytes(b"a person's image")
    with pytest.raises(ValueError, match="monocyte_0004.png exists and .* does not list it"):
        generation.save_cells(_cells(seed=4, steps=15), unlisted)
    assert (unlisted / "monocyte_0004.png").read_bytes() == b"a person's image"
    assert not (unlisted / "metadata.csv").exists()


def test_columns_a_person_added_to_the_metadata_are_kept(tmp_path):
    path = generation.save_cells(_cells(seed=4, steps=15), tmp_path)
    rows = list(csv.DictReader(open(path)))
    rows[0]["note"] = "blurred"
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    generation.save_cells(_cells(seed=5, steps=15), tmp_path)
    rows = list(csv.DictReader(open(path)))
    assert [(r["file"], r["note"]) for r in rows] == [
        ("monocyte_0004.png", "blurred"),
        ("monocyte_0005.png", ""),
    ]


def test_generate_refuses_a_users_file_before_generating(tmp_path, capsys, monkeypatch):
    from napari_cytodiffusion.core.tasks import generate as task

    (tmp_path / "eosinophil_0000.png").write_bytes(b"a person's image")
    monkeypatch.setattr(task, "generate", lambda *a, **k: pytest.fail("generated first"))
    argv = ["generate", "--label", "eosinophil", "-n", "1", "--device", "cpu"]
    assert cli.main([*argv, "--out", str(tmp_path)]) == cli.USAGE_ERROR
    assert "does not list it as a generated cell" in capsys.readouterr().err
    assert (tmp_path / "eosinophil_0000.png").read_bytes() == b"a person's image"


def test_every_cells_seed_can_be_given_back(tmp_path, capsys):
    largest = 2**63 - 1
    argv = ["generate", "--label", "platelet", "--steps", "1", "--device", "cpu", "--out"]
    assert cli.main([*argv, str(tmp_path), "-n", "2", "--seed", str(largest)]) == cli.USAGE_ERROR
    assert f"seed must be from 0 to {largest - 1} for 2 cells" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    # The largest seed is a cell's seed, and --seed takes it back.
    assert cli.main([*argv, str(tmp_path), "-n", "1", "--seed", str(largest)]) == 0
    (row,) = csv.DictReader(open(tmp_path / "metadata.csv"))
    assert row["seed"] == str(largest) and (tmp_path / row["file"]).is_file()


def test_a_save_stopped_midway_can_be_run_again(tmp_path, monkeypatch):
    """A run killed while writing its cells leaves no file the next run must refuse to
    replace: the metadata lists them before they are written."""
    cells = generation.SyntheticCells(
        np.full((2, 64, 64, 3), 0.5, np.float32), ["monocyte"] * 2, [4, 5], 15, 2.0, "ddim", "m"
    )
    written = []
    original = generation.to_uint8

    def stop_at_the_second(image):
        if written:
            raise KeyboardInterrupt
        written.append(1)
        return original(image)

    monkeypatch.setattr(generation, "to_uint8", stop_at_the_second)
    with pytest.raises(KeyboardInterrupt):
        generation.save_cells(cells, tmp_path)
    assert [p.name for p in tmp_path.glob("*.png")] == ["monocyte_0004.png"]
    monkeypatch.setattr(generation, "to_uint8", original)
    path = generation.save_cells(cells, tmp_path)
    assert [r["file"] for r in csv.DictReader(open(path))] == [
        "monocyte_0004.png",
        "monocyte_0005.png",
    ]
    assert (tmp_path / "monocyte_0005.png").is_file()
    # A listed cell whose file the stopped run never wrote may be made with other settings.
    (tmp_path / "monocyte_0005.png").unlink()

    def one(seed):
        return dataclasses.replace(
            cells, images=cells.images[:1], labels=["monocyte"], seeds=[seed], steps=30
        )

    generation.check_can_save(one(5), tmp_path)  # its file is missing: free
    with pytest.raises(ValueError, match="other settings"):
        generation.check_can_save(one(4), tmp_path)  # its file was written: kept
