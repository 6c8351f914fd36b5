"""Parameter count and GFLOP per forward of a model, split into the class-free encoder and the
class-conditional decoder (the classifier runs the encoder once per trial and the decoder once
per candidate class).

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` on a (1, 3, 64, 64) input:
2 per multiply-add of convolutions and matrix products (normalisations and activations, a few
percent, are not counted).

    python benchmarks/model_size.py [--model default]

Writes benchmarks/results/model_size.json.
"""

import argparse
import json
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from napari_cytodiffusion.core.model.weights import load_model

RESULTS = Path(__file__).resolve().parent / "results"
ENCODER_MODULES = ("time_mlp", "stem", "down", "downsample")


def gflop(function, *args):
    with FlopCounterMode(display=False) as counter:
        result = function(*args)
    return counter.get_total_flops() / 1e9, result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    args = parser.parse_args()

    model = load_model(args.model, device="cpu")
    unet, size = model.unet, model.image_size
    x = torch.randn(1, 3, size, size)
    t, y = torch.tensor([500]), torch.tensor([0])
    parameters = {"encoder": 0, "decoder": 0}
    for name, parameter in unet.named_parameters():
        part = "encoder" if name.split(".")[0] in ENCODER_MODULES else "decoder"
        parameters[part] += parameter.numel()
    with torch.no_grad():
        forward, _ = gflop(unet, x, t, y)
        encoder, encoded = gflop(unet.encode, x, t)
        decoder, _ = gflop(unet.decode, encoded, y)
    result = {
        "model": model.name,
        "config": unet.config,
        "parameters": sum(parameters.values()),
        "parameters_encoder": parameters["encoder"],
        "parameters_decoder": parameters["decoder"],
        "gflop_forward": round(forward, 4),
        "gflop_encoder": round(encoder, 4),
        "gflop_decoder": round(decoder, 4),
        "input": [1, 3, size, size],
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "model_size.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
