"""A run killed at any moment (kill -9) leaves no half-written or empty file under a final name,
and a second run completes."""

import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tifffile
from PIL import Image

from napari_cytodiffusion._sample_data import sample_path


def _killed_then_finished(argv, folder, seed):
    """Start ``argv``, kill it at a random moment, check ``folder``, then run it to the end."""
    process = subprocess.Popen(
        [sys.executable, "-m", "napari_cytodiffusion", *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    time.sleep(random.Random(seed).uniform(2.5, 6.0))
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    _check_final_files(folder)
    finished = subprocess.run(
        [sys.executable, "-m", "napari_cytodiffusion", *argv], capture_output=True, text=True
    )
    assert finished.returncode == 0, finished.stderr
    _check_final_files(folder)


def _check_final_files(folder):
    for path in folder.rglob("*"):
        if path.is_dir() or path.name.startswith("."):
            continue  # temporary names start with a dot; they never look finished
        assert path.stat().st_size > 0, path
        if path.suffix == ".tif":
            tifffile.imread(path)
        elif path.suffix == ".png":
            Image.open(path).load()
        elif path.suffix == ".csv":
            assert path.read_text().strip(), path


@pytest.mark.parametrize("seed", [0, 1])
def test_segment_out(tmp_path, seed):
    images = tmp_path / "images"
    images.mkdir()
    field = np.asarray(Image.open(sample_path("cbc_lymphocyte")))
    for i in range(6):
        Image.fromarray(np.roll(field, 40 * i, axis=1)).save(images / f"field_{i}.png")
    out = tmp_path / "out"
    # The files written before the kill are replaced by the run after it.
    argv = ["segment", *sorted(map(str, images.iterdir())), "--out", str(out), "--overwrite"]
    _killed_then_finished(argv, out, seed)
    assert len(list(out.glob("*_cells.csv"))) == 6


def test_generate(tmp_path):
    out = tmp_path / "cells"
    argv = ["generate", "--label", "platelet", "-n", "16", "--steps", "4", "--device", "cpu"]
    _killed_then_finished([*argv, "--out", str(out)], out, seed=2)
    assert len(list(out.glob("platelet_*.png"))) == 16


def test_train(tmp_path, synthetic_cells_dir, synthetic_rbc_diameter):
    out = tmp_path / "lab.ckpt"
    argv = ["train", str(synthetic_cells_dir), "--out", str(out), "--steps", "20"]
    argv += ["--batch-size", "4", "--channels", "8,16,16", "--device", "cpu"]
    # A checkpoint saved before the kill is replaced by the run after it.
    argv += ["--rbc-diameter", str(synthetic_rbc_diameter), "--overwrite"]
    _killed_then_finished(argv, tmp_path, seed=3)
    import torch

    assert torch.load(out, weights_only=True)["step"] == 20
