"""The white-cell detector: a small fully convolutional network over the smear.

It sees the smear's optical density at one scale (a red cell ``DETECTOR_RBC`` pixels across)
and gives two maps, each pixel's probability of lying in a white cell (nucleus or cytoplasm,
the *body*) and of lying near a white cell's centre (the *core*, half its radius). Cores
separate touching cells; bodies give the cell's extent, granular or pale cytoplasm included.
The maps are the mean over the smear and its mirror images (``MIRRORS``).
A cell's context (its size against the red cells around it, its colour against theirs) is
what tells it from a platelet clump or a purple red cell, which a colour threshold cannot.

The network is a four-level U-Net of 0.1 million weights (8 to 64 channels), trained on CPU
by :mod:`~napari_cytodiffusion.core.smear.detector_training` from the white-cell boxes of
the CBC and phone-camera training splits. Its weights ship as a numpy ``.npz`` file (batch
norm folded into the convolutions) and are loaded without unpickling; torch runs it.
"""

import json
import threading
from contextlib import contextmanager, nullcontext
from importlib import resources

import numpy as np

# The detector's scale: a red cell spans this many pixels of its input.
DETECTOR_RBC = 10.0
# Channels of the four levels (full, 1/2, 1/4, 1/8 resolution) of a newly trained detector;
# a detector file says its own.
CHANNELS = (8, 16, 32, 64)
# Optical density is clipped here: darker is the black vignette of a photo, nothing else.
MAX_DENSITY = 3.0
MODEL_FILE = "wbc-detector-v1.npz"
MODEL_FORMAT = "napari-cytodiffusion-wbc-detector"
# The input is judged as it is and mirrored (axes flipped, of a (channels, rows, cols) array).
MIRRORS = ((), (2,), (1,), (1, 2))
# Tiles of the detector's input: a core and a margin wider than what the network looks at.
TILE = 512
MARGIN = 32

_LOAD_LOCK = threading.Lock()
_RUN_LOCK = threading.Lock()
_LOADED = {}


def layer_shapes(channels=CHANNELS):
    """{name: (in_channels, out_channels)} of every 3 x 3 convolution, then the 1 x 1 head."""
    c1, c2, c3, c4 = channels
    return {
        "enc1": (3, c1),
        "enc2a": (c1, c2),
        "enc2b": (c2, c2),
        "enc3a": (c2, c3),
        "enc3b": (c3, c3),
        "enc4a": (c3, c4),
        "enc4b": (c4, c4),
        "dec3": (c4 + c3, c3),
        "dec2": (c3 + c2, c2),
        "dec1": (c2 + c1, c1),
        "head": (c1, 2),
    }


def forward(x, conv):
    """The network on a batch ``x`` (n, 3, rows, cols); ``conv(name, x)`` applies one layer.

    The same wiring serves training (``conv`` runs a convolution, batch norm and ReLU module)
    and use (``conv`` runs the folded weights).
    """
    import torch
    import torch.nn.functional as F

    def up(small, like):
        return F.interpolate(small, size=like.shape[2:], mode="bilinear", align_corners=False)

    a = conv("enc1", x)
    b = conv("enc2b", conv("enc2a", F.max_pool2d(a, 2, ceil_mode=True)))
    c = conv("enc3b", conv("enc3a", F.max_pool2d(b, 2, ceil_mode=True)))
    d = conv("enc4b", conv("enc4a", F.max_pool2d(c, 2, ceil_mode=True)))
    u = conv("dec3", torch.cat([up(d, c), c], 1))
    u = conv("dec2", torch.cat([up(u, b), b], 1))
    u = conv("dec1", torch.cat([up(u, a), a], 1))
    return conv("head", u)


def density_input(density):
    """The network's input from an optical-density image (rows, cols, 3): clipped, float32."""
    return np.clip(density, 0.0, MAX_DENSITY).astype(np.float32, copy=False)


class Detector:
    """Folded weights of the detector and their description.

    Parameters
    ----------
    weights : dict
        ``{name: (kernel, bias)}`` numpy arrays for every layer of :func:`layer_shapes`.
    metadata : dict
        What it was trained on and how well it did (free form).
    """

    def __init__(self, weights, metadata):
        import torch

        self.metadata = metadata
        self._weights = {
            name: (torch.from_numpy(kernel), torch.from_numpy(bias))
            for name, (kernel, bias) in weights.items()
        }

    def _conv(self, name, x):
        import torch.nn.functional as F

        kernel, bias = self._weights[name]
        out = F.conv2d(x, kernel, bias, padding=kernel.shape[-1] // 2)
        return out if name == "head" else F.relu(out, inplace=True)

    def maps(self, density):
        """Body and core probabilities of an optical-density image at the detector's scale.

        Parameters
        ----------
        density : ndarray (rows, cols, 3)
            Optical density against the smear's background, a red cell ``DETECTOR_RBC`` px.

        Returns
        -------
        body, core : ndarray float32 (rows, cols)
        """
        import torch

        image = density_input(density)
        rows, cols = image.shape[:2]
        out = np.zeros((2, rows, cols), np.float32)
        # One thread, one call at a time: the tiles of a smear run side by side, and torch's
        # threads competing with them (or with other work on a shared machine) are far slower.
        with _RUN_LOCK, _one_thread(torch), torch.inference_mode():
            for core, window in _tiles((rows, cols)):
                x = torch.from_numpy(np.ascontiguousarray(image[window].transpose(2, 0, 1)))
                logits = self._mirrored_logits(x)
                inner = tuple(
                    slice(c.start - w.start, c.stop - w.start)
                    for c, w in zip(core, window, strict=True)
                )
                out[(slice(None), *core)] = logits[(slice(None), *inner)]
        probability = 1.0 / (1.0 + np.exp(-out))
        return probability[0], probability[1]

    def _mirrored_logits(self, x):
        """The mean logits (2, rows, cols) of ``x`` (3, rows, cols) seen in its ``MIRRORS``.

        A cell looks the same mirrored, a network's judgement of it does not quite: averaged
        over the mirror images, the maps of clumps and odd blobs fall below a cell's, and
        outlines follow the cell more closely. One image at a time: on one thread a batch of
        them is slower.
        """
        total = None
        for axes in MIRRORS:
            view = x.flip(axes) if axes else x
            logits = forward(view[None], self._conv)[0]
            logits = logits.flip(axes) if axes else logits
            total = logits if total is None else total + logits
        return (total / len(MIRRORS)).numpy()


@contextmanager
def _one_thread(torch):
    """Torch on one thread inside the block, on as many as before after it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _tiles(shape):
    """(core, window) slices covering ``shape``; windows add ``MARGIN`` on every side."""
    tiles = []
    for r0 in range(0, shape[0], TILE):
        for c0 in range(0, shape[1], TILE):
            core = (slice(r0, min(shape[0], r0 + TILE)), slice(c0, min(shape[1], c0 + TILE)))
            window = tuple(
                slice(max(0, s.start - MARGIN), min(n, s.stop + MARGIN))
                for s, n in zip(core, shape, strict=True)
            )
            tiles.append((core, window))
    return tiles


def save_detector(path, weights, metadata, channels=CHANNELS):
    """Write folded weights ``{name: (kernel, bias)}`` and metadata as a numpy ``.npz`` file."""
    arrays = {}
    for name, (kernel, bias) in weights.items():
        arrays[f"{name}.kernel"] = np.asarray(kernel, np.float32)
        arrays[f"{name}.bias"] = np.asarray(bias, np.float32)
    info = {"format": MODEL_FORMAT, "channels": list(channels), **metadata}
    arrays["metadata"] = np.frombuffer(json.dumps(info).encode(), np.uint8)
    np.savez_compressed(path, **arrays)


def load_detector(path=None):
    """The detector (kept once loaded): the shipped one, or the ``.npz`` file at ``path``.

    Raises
    ------
    ValueError
        If the file is not a detector of this version.
    """
    key = str(path) if path is not None else MODEL_FILE
    with _LOAD_LOCK:
        if key not in _LOADED:
            _LOADED[key] = _read_detector(path)
        return _LOADED[key]


def _read_detector(path):
    if path is None:
        shipped = resources.files("napari_cytodiffusion") / "models" / MODEL_FILE
        context = resources.as_file(shipped)
    else:
        context = nullcontext(path)
    with context as real, np.load(real, allow_pickle=False) as data:
        metadata = json.loads(bytes(data["metadata"]).decode())
        if metadata.get("format") != MODEL_FORMAT:
            raise ValueError(f"{real} is not a white-cell detector.")
        names = layer_shapes(tuple(metadata["channels"]))
        weights = {name: (data[f"{name}.kernel"], data[f"{name}.bias"]) for name in names}
    return Detector(weights, metadata)
