"""Training throughput in images per second: measured here on the CPU, and read from the log of
the H100 run that trained the shipped model.

The CPU figure times the real training loop (:func:`napari_cytodiffusion.core.model.training.train`:
augmentation, forward, backward, optimiser and EMA update) at the default configuration, batch
32 at 64 px, on a small train-only pack of PBC cells, between the progress reports of the first
and the last step (the first step, which warms up, is left out).

    python benchmarks/training_throughput.py [--steps 4] [--batch-size 32]

Writes benchmarks/results/training_throughput.json and .md.
"""

import argparse
import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import add_float32_option  # noqa: E402

from napari_cytodiffusion.core.datasets import list_labelled_images, pack_cells  # noqa: E402
from napari_cytodiffusion.core.model.diffusion import network_precision  # noqa: E402
from napari_cytodiffusion.core.model.training import DEFAULT_CHANNELS, train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
H100_LOG = RESULTS / "training_h100_log.txt"
H100_BATCH = 256
PBC_RBC_DIAMETER = 29.0


def cpu_throughput(pbc_dir, steps, batch_size, cells=64):
    """Images per second of CPU training steps (after the first) at the default channels."""
    records = [r for r in list_labelled_images(pbc_dir / "splits.csv") if r.split == "train"]
    records = records[:: len(records) // cells][:cells]  # spread over the classes
    with tempfile.TemporaryDirectory() as folder:
        pack = Path(folder) / "cells.npz"
        pack_cells(records, pack, 64, PBC_RBC_DIAMETER)
        reports = []
        train(
            pack,
            Path(folder) / "bench.ckpt",
            steps=steps,
            batch_size=batch_size,
            device="cpu",
            progress=lambda step, _total: reports.append((step, time.perf_counter())),
            log=lambda _: None,
        )
    (first_step, first), (last_step, last) = reports[0], reports[-1]
    seconds_per_step = (last - first) / (last_step - first_step)
    return {
        "device": "cpu",
        "images_per_second": batch_size / seconds_per_step,
        "seconds_per_step": seconds_per_step,
        "batch_size": batch_size,
        "timed_steps": last_step - first_step,
        "channels": list(DEFAULT_CHANNELS),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads, "
        f"network in {network_precision('cpu')}",
    }


def h100_throughput(log_path=H100_LOG, batch_size=H100_BATCH):
    """Steps per second of each run segment of the H100 log (validation and saving included).

    Log lines read ``step N: train loss ..., val loss ..., S s`` with S counted from the start
    of each (resumed) run; a ``resumed`` line starts a new segment.
    """
    segments, current = [], []
    for line in Path(log_path).read_text().splitlines():
        if line.startswith("resumed"):
            segments.append(current)
            current = []
        match = re.match(r"step (\d+): .* (\d+) s$", line)
        if match:
            current.append((int(match[1]), int(match[2])))
    segments.append(current)
    rates = []
    for points in segments:
        (step_a, seconds_a), (step_b, seconds_b) = points[0], points[-1]
        rates.append(
            {
                "steps": [step_a, step_b],
                "steps_per_second": (step_b - step_a) / (seconds_b - seconds_a),
            }
        )
    total_steps = sum(r["steps"][1] - r["steps"][0] for r in rates)
    total_seconds = sum((r["steps"][1] - r["steps"][0]) / r["steps_per_second"] for r in rates)
    return {
        "device": "1x NVIDIA H100 80GB, bf16 autocast, data augmented on the GPU",
        "segments": rates,
        "steps_per_second": total_steps / total_seconds,
        "images_per_second": batch_size * total_steps / total_seconds,
        "batch_size": batch_size,
        "source": str(Path(log_path).relative_to(ROOT)),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pbc", default=str(ROOT.parent / "shared" / "data" / "pbc"))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    add_float32_option(parser)
    args = parser.parse_args()

    load_before = os.getloadavg()
    cpu = cpu_throughput(Path(args.pbc), args.steps, args.batch_size)
    cpu["load_average_before_after"] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]
    result = {"cpu": cpu, "h100": h100_throughput()}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "training_throughput.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "training_throughput.md").write_text(markdown(result))
    print(markdown(result))


def markdown(result):
    cpu, gpu = result["cpu"], result["h100"]
    load = cpu["load_average_before_after"]
    segments = ", ".join(
        f"steps {s['steps'][0]}-{s['steps'][1]}: {s['steps_per_second']:.1f} it/s"
        for s in gpu["segments"]
    )
    return "\n".join(
        [
            f"# Training throughput (default model: channels {cpu['channels']}, 64 px)",
            "",
            "| device | batch | steps/s | images/s |",
            "|---|---|---|---|",
            f"| CPU ({cpu['machine']}) | {cpu['batch_size']} | "
            f"{1 / cpu['seconds_per_step']:.3f} | {cpu['images_per_second']:.1f} |",
            f"| {gpu['device']} | {gpu['batch_size']} | {gpu['steps_per_second']:.1f} | "
            f"{gpu['images_per_second']:.0f} |",
            "",
            f"CPU: {cpu['timed_steps']} timed steps after one warm-up step, "
            f"{cpu['seconds_per_step']:.1f} s per step; load average {load[0]} before and "
            f"{load[1]} after: the 2 cores were shared with other jobs, so this is a lower "
            "bound for an idle machine.",
            "",
            f"H100: from `{gpu['source']}` (validation every 1000 steps and checkpoints "
            f"included); {segments}.",
            "",
        ]
    )


if __name__ == "__main__":
    main()
