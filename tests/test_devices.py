"""Device names: what the machine has is offered, a wrong name or a missing GPU is explained."""

import pytest

from napari_cytodiffusion.cli import main
from napari_cytodiffusion.core.devices import available_devices, check_device_name, resolve_device


@pytest.mark.parametrize("name", ["auto", "cpu", "cuda", "cuda:1", "mps", " CPU ", None])
def test_device_kinds_the_model_runs_on_are_accepted(name):
    assert check_device_name(name) in ("auto", "cpu", "cuda", "cuda:1", "mps")


@pytest.mark.parametrize("name", ["tpu", "", "cuda:x", "cpu:0:1", "mps:1", "gpu"])
def test_other_names_are_refused_with_the_allowed_ones(name):
    with pytest.raises(ValueError, match="use auto, cpu, cuda"):
        check_device_name(name)


def test_a_device_this_machine_lacks_is_named_with_the_ones_it_has():
    import torch

    assert available_devices()[:2] == ["auto", "cpu"]
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="counted from cuda:0"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")
    else:
        with pytest.raises(RuntimeError, match="no CUDA GPU; use --device cpu"):
            resolve_device("cuda:0")


@pytest.mark.parametrize("command", [["classify", "x.png"], ["analyze", "x", "--out", "o"]])
def test_the_command_line_refuses_an_unknown_device_before_any_work(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--device", "tpu"])
    assert exit_.value.code == 2
    assert "Unknown device 'tpu'" in capsys.readouterr().err
