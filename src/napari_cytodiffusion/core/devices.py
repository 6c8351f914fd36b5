"""The devices the model runs on: what this machine has, and checking a person's choice."""

DEVICE_TYPES = ("cpu", "cuda", "mps")


def available_devices():
    """The devices this machine can run the model on, ``auto`` first.

    Examples
    --------
    >>> available_devices()[:2]
    ['auto', 'cpu']
    """
    import torch

    devices = ["auto", "cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        devices.append("mps")
    return devices


def check_device_name(device):
    """Return ``device`` if it names a kind of device the model runs on, whether or not this
    machine has one (a cluster's workers may); raise ValueError saying what is allowed.

    Examples
    --------
    >>> check_device_name("cuda:1")
    'cuda:1'
    """
    text = "auto" if device is None else str(device).strip().lower()
    kind, _, index = text.partition(":")
    known = text == "auto" or (
        kind in DEVICE_TYPES and (not index or (kind == "cuda" and index.isdigit()))
    )
    if not known:
        raise ValueError(
            f"Unknown device {device!r}: use auto, cpu, cuda (or cuda:N for the N-th GPU) or mps."
        )
    return text


def resolve_device(device="auto"):
    """Return a torch device: ``auto`` picks CUDA, then MPS, then the CPU; a device this
    machine lacks raises RuntimeError naming the ones it has."""
    import torch

    device = check_device_name(device)
    have = available_devices()
    if device == "auto":
        return torch.device(have[2] if len(have) > 2 else "cpu")
    resolved = torch.device(device)
    if resolved.type not in have:
        name = {"cuda": "CUDA", "mps": "MPS (Apple)"}[resolved.type]
        raise RuntimeError(
            f"{name} was requested but this machine has no {name} GPU; use --device cpu "
            f"(this machine has: {', '.join(have)})."
        )
    if resolved.type == "cuda" and (resolved.index or 0) >= torch.cuda.device_count():
        raise RuntimeError(
            f"{device} was requested but this machine has {torch.cuda.device_count()} CUDA "
            "GPU(s), counted from cuda:0."
        )
    return resolved
