"""The model registry: the shipped default, downloads from a loopback server, the cache, the
sha256 checks, the environment overrides and the ``models`` command."""

import http.server
import json
import sys
import threading

import numpy as np
import pytest
import torch

from napari_cytodiffusion.cli import main
from napari_cytodiffusion.core.classes import CLASSES
from napari_cytodiffusion.core.datasets import list_labelled_images, pack_cells
from napari_cytodiffusion.core.model import weights
from napari_cytodiffusion.core.model.checkpoint import MODEL_FORMAT, ModelFileError
from napari_cytodiffusion.core.model.training import export_model, train
from napari_cytodiffusion.core.progress import Cancelled

SERVED_NAME = "tiny-test"
SERVED_FILE = "tiny-test-v1.pt"


@pytest.fixture(scope="session")
def tiny_model_bytes(synthetic_cells_dir, synthetic_rbc_diameter, tmp_path_factory):
    """A real (untrained, 8-16-16 channel) model file as bytes, small enough to serve."""
    folder = tmp_path_factory.mktemp("tiny_model")
    pack_cells(
        list_labelled_images(synthetic_cells_dir),
        folder / "cells.npz",
        64,
        rbc_diameter=synthetic_rbc_diameter,
    )
    train(folder / "cells.npz", folder / "t.ckpt", steps=0, channels=(8, 16, 16), device="cpu")
    export_model(folder / "t.ckpt", folder / SERVED_FILE)
    return (folder / SERVED_FILE).read_bytes()


class _Server(http.server.ThreadingHTTPServer):
    files = {}
    truncate = False


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = self.server.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        # A truncated response announces the full length, then the connection drops.
        self.wfile.write(body[: len(body) // 2] if self.server.truncate else body)

    def log_message(self, *_):
        pass


@pytest.fixture
def server(tiny_model_bytes):
    """A loopback HTTP server on 127.0.0.1 serving the tiny model under /models/."""
    httpd = _Server(("127.0.0.1", 0), _Handler)
    httpd.files = {f"/models/{SERVED_FILE}": tiny_model_bytes}
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}/models"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Never touch the user's real cache or mirror setting."""
    cache = tmp_path / "cache"
    monkeypatch.setenv(weights.CACHE_ENV, str(cache))
    monkeypatch.delenv(weights.URL_ENV, raising=False)
    return cache


@pytest.fixture
def registry(tmp_path, monkeypatch, server, tiny_model_bytes):
    """The real registry plus an entry for the served tiny model; returns its JSON dict."""
    import hashlib

    content = json.loads(weights.REGISTRY_PATH.read_text())
    entry = dict(content["models"][0])
    entry.update(
        name=SERVED_NAME,
        file=SERVED_FILE,
        sha256=hashlib.sha256(tiny_model_bytes).hexdigest(),
        url=f"{server.url}/{SERVED_FILE}",
        description="tiny test model",
    )
    content["models"].append(entry)
    path = tmp_path / "registry.json"
    path.write_text(json.dumps(content))
    monkeypatch.setattr(weights, "REGISTRY_PATH", path)
    return content


def _files(folder):
    return sorted(p.name for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def test_shipped_default_matches_the_registry(default_model):
    """Fails after re-exporting the shipped file: run `models hash FILE --update`."""
    entry = weights.find_model("default")
    path = weights.model_path("default")
    assert path.parent == weights.MODELS_DIR and path.name == entry.file
    assert weights.file_sha256(path) == entry.sha256
    assert entry.classes == CLASSES == default_model.classes
    assert entry.image_size == default_model.image_size
    assert weights.location(entry) == "shipped"


def test_default_needs_neither_network_nor_pooch(monkeypatch):
    monkeypatch.setitem(sys.modules, "pooch", None)  # `import pooch` now fails
    model = weights.load_model("default", device="cpu")
    assert model.name == weights.find_model("default").name


def test_download_then_offline_reuse_from_the_cache(registry, server, isolated_cache):
    reports = []
    path = weights.model_path(SERVED_NAME, progress=lambda done, total: reports.append(done))
    assert path == isolated_cache / SERVED_FILE
    assert reports and reports[-1] == len(server.files[f"/models/{SERVED_FILE}"])
    assert weights.location(weights.find_model(SERVED_NAME)) == "cached"

    server.shutdown()
    server.server_close()
    model = weights.load_model(SERVED_NAME, device="cpu")
    assert model.name == SERVED_NAME and model.unet.config["channels"] == [8, 16, 16]


def test_a_tampered_cached_file_is_refused_and_kept(registry, isolated_cache):
    path = weights.model_path(SERVED_NAME)
    tampered = path.read_bytes()[:-1] + b"x"
    path.write_bytes(tampered)
    expected = weights.find_model(SERVED_NAME).sha256
    with pytest.raises(weights.WeightsError, match="sha256") as error:
        weights.load_model(SERVED_NAME, device="cpu")
    assert str(path) in str(error.value) and expected in str(error.value)
    assert path.read_bytes() == tampered  # never silently replaced


def test_a_tampered_shipped_file_is_refused(tmp_path, monkeypatch):
    entry = weights.find_model("default")
    shipped = tmp_path / entry.file
    shipped.write_bytes(b"not the shipped model")
    monkeypatch.setattr(weights, "MODELS_DIR", tmp_path)
    with pytest.raises(weights.WeightsError, match="sha256") as error:
        weights.load_model("default", device="cpu")
    assert str(shipped) in str(error.value) and entry.sha256 in str(error.value)


def test_a_download_with_another_hash_saves_nothing(registry, tmp_path, monkeypatch):
    registry["models"][-1]["sha256"] = "0" * 64
    weights.REGISTRY_PATH.write_text(json.dumps(registry))
    with pytest.raises(weights.WeightsError, match="sha256") as error:
        weights.model_path(SERVED_NAME)
    assert SERVED_FILE in str(error.value) and "0" * 64 in str(error.value)
    assert _files(tmp_path / "cache") == []


def test_a_truncated_download_leaves_no_file(registry, server, isolated_cache):
    server.truncate = True
    with pytest.raises(weights.WeightsError, match="Nothing was saved"):
        weights.model_path(SERVED_NAME)
    assert _files(isolated_cache) == []


def test_a_cancelled_download_leaves_no_file(registry, isolated_cache):
    def cancel(done, total):
        raise Cancelled()

    with pytest.raises(Cancelled):
        weights.model_path(SERVED_NAME, progress=cancel)
    assert _files(isolated_cache) == []


def test_the_environment_chooses_cache_and_mirror(registry, server, tmp_path, monkeypatch):
    registry["models"][-1]["url"] = "http://127.0.0.1:9/unreachable/" + SERVED_FILE
    weights.REGISTRY_PATH.write_text(json.dumps(registry))
    lab_cache = tmp_path / "lab cache"
    monkeypatch.setenv(weights.CACHE_ENV, str(lab_cache))
    monkeypatch.setenv(weights.URL_ENV, server.url + "/")
    assert weights.model_path(SERVED_NAME) == lab_cache / SERVED_FILE
    assert weights.cache_dir() == lab_cache


def test_the_default_cache_is_pooch_os_cache(monkeypatch):
    import pooch

    monkeypatch.delenv(weights.CACHE_ENV)
    assert weights.cache_dir() == pooch.os_cache("napari-cytodiffusion")


def test_a_model_without_an_address_asks_for_a_mirror(registry):
    registry["models"][-1]["url"] = None
    weights.REGISTRY_PATH.write_text(json.dumps(registry))
    with pytest.raises(weights.WeightsError, match=weights.URL_ENV):
        weights.model_path(SERVED_NAME)


def test_own_files_load_by_path_and_unknown_names_are_explained(tiny_model_bytes, tmp_path):
    own = tmp_path / "my lab model.pt"
    own.write_bytes(tiny_model_bytes)
    assert weights.model_path(own) == own
    assert weights.load_model(str(own), device="cpu").name == str(own)
    with pytest.raises(weights.WeightsError, match="neither a model name"):
        weights.model_path("no-such-model")


def test_a_model_files_classes_are_read_without_building_its_network(
    tiny_model_bytes, tmp_path, monkeypatch
):
    """Widgets ask on the main thread whenever a person picks a file: no network is built."""
    own = tmp_path / "own.pt"
    own.write_bytes(tiny_model_bytes)
    classes = weights.load_model(str(own), device="cpu").classes

    def no_network(*args, **kwargs):
        raise AssertionError("the network was built")

    monkeypatch.setattr("napari_cytodiffusion.core.model.unet.CellUNet", no_network)
    assert weights.model_classes(str(own)) == classes
    (tmp_path / "notes.pt").write_text("not a model")
    assert weights.model_classes(str(tmp_path / "notes.pt")) is None


def test_a_failed_replace_leaves_the_earlier_local_model_loading(
    tiny_model_bytes, tmp_path, isolated_cache, monkeypatch
):
    """The weights of a replaced local model are written before the list that names them
    with their sha256; a list that cannot be written must not leave a mismatched pair."""
    from contextlib import contextmanager
    from pathlib import Path

    from napari_cytodiffusion.core import io
    from napari_cytodiffusion.core.model.checkpoint import load_model_file

    own = tmp_path / "own.pt"
    own.write_bytes(tiny_model_bytes)
    model = load_model_file(own, "cpu")
    first = weights.register_local_model(model, "lab")
    model.calibration = {**model.calibration, "inverse_temperature": 2.0}  # other contents

    write = io.atomic_write

    @contextmanager
    def full_disk(path):
        if Path(path) == weights.local_registry_path():
            raise OSError("No space left on device")
        with write(path) as partial:
            yield partial

    monkeypatch.setattr(io, "atomic_write", full_disk)
    with pytest.raises(OSError, match="No space"):
        weights.register_local_model(model, "lab")
    monkeypatch.setattr(io, "atomic_write", write)
    assert weights.find_model("lab") == first
    assert (
        weights.load_model("lab", device="cpu").calibration
        == load_model_file(own, "cpu").calibration
    )
    local = isolated_cache / "local"
    assert _files(local) == sorted([first.file, "registry.json"])  # nothing left behind

    second = weights.register_local_model(model, "lab")  # replaced: the earlier file goes
    assert second.sha256 != first.sha256
    assert weights.load_model("lab", device="cpu").calibration["inverse_temperature"] == 2.0
    assert _files(local) == sorted([second.file, "registry.json"])


def test_every_model_option_offers_local_models(capsys):
    for command in ("classify", "analyze", "generate", "counterfactual"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "--model MODEL model name (shipped or local, see `models list`) or model file" in (
            text
        ), command


class Payload:
    """An arbitrary object that a weights-only load must refuse to unpickle."""


def test_a_file_with_pickled_objects_is_refused(tmp_path):
    path = tmp_path / "unsafe.pt"
    torch.save({"format": MODEL_FORMAT, "config": "{}", "payload": Payload()}, path)
    with pytest.raises(ModelFileError, match="could run code"):
        weights.load_model(path, device="cpu")


def test_models_command(registry, isolated_cache, capsys):
    assert main(["models", "list"]) == 0
    listing = capsys.readouterr().out
    assert "cytodiffusion-pbc64-v1 (default)" in listing and "shipped" in listing
    assert f"{SERVED_NAME} " in listing and "download" in listing

    assert main(["models", "download", SERVED_NAME, "default"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{SERVED_NAME}: {isolated_cache / SERVED_FILE}"
    assert lines[1] == f"default: {weights.model_path('default')}"

    assert main(["models", "path", SERVED_NAME]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == str(isolated_cache / SERVED_FILE)

    assert main(["models", "path", "no-such-model"]) == 2
    assert "neither a model name" in capsys.readouterr().err


def test_models_hash_updates_the_registry(registry, tiny_model_bytes, tmp_path, capsys):
    new_file = tmp_path / SERVED_FILE
    new_file.write_bytes(tiny_model_bytes + b"re-exported")
    assert main(["models", "hash", str(new_file)]) == 0
    new_hash = capsys.readouterr().out.strip()
    assert new_hash == weights.file_sha256(new_file)
    assert main(["models", "hash", str(new_file), "--update"]) == 0
    assert weights.find_model(SERVED_NAME).sha256 == new_hash


def test_models_hash_records_only_a_model_file(registry, tmp_path, capsys):
    """A file that only shares the registry file's name is no re-export of the model."""
    impostor = tmp_path / SERVED_FILE
    impostor.write_text("not a model")
    before = weights.find_model(SERVED_NAME).sha256
    assert main(["models", "hash", str(impostor), "--update"]) == 2
    assert f"{impostor} is not a model file" in capsys.readouterr().err
    assert weights.find_model(SERVED_NAME).sha256 == before


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("text", "not a model file saved by napari-cytodiffusion (train, adapt"),
        ("cut short", "damaged or cut short (PytorchStreamReader failed reading zip archive"),
        ("npz", "not a model file saved by napari-cytodiffusion (train, adapt"),
        ("empty", "empty (an interrupted copy or download?)"),
    ],
)
def test_a_file_that_is_no_model_is_refused_saying_what_it_is(tmp_path, capsys, kind, message):
    path = tmp_path / "bad.png"
    if kind == "text":
        path.write_text("in a text file, torch reads a key of 105\n")
    elif kind == "npz":  # a zip archive too, of numpy's
        with open(path, "wb") as file:
            np.savez(file, a=np.zeros(3))
    elif kind == "empty":
        path.write_bytes(b"")
    else:
        torch.save({"weights": torch.zeros(1000)}, path)
        path.write_bytes(path.read_bytes()[:2000])  # an interrupted copy
    argv = ["generate", "--label", "lymphocyte", "--model", str(path), "--out", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"error: {path} is " in err and message in err and "\n" not in err.rstrip("\n")


def test_models_hash_of_a_folder_says_it_is_a_folder(tmp_path, capsys):
    assert main(["models", "hash", str(tmp_path)]) == 2
    assert f"{tmp_path} is a folder: give the model file in it" in capsys.readouterr().err
