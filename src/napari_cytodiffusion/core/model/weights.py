"""Named diffusion models: the shipped default, downloadable ones, and users' own files.

The registry (``models/registry.json`` in the package) lists every named model with its file
name, sha256, download address, classes, image size and version; ``default`` names the model
shipped inside the package, which needs no network. Other models are downloaded with pooch
into a cache folder:

* ``NAPARI_CYTODIFFUSION_CACHE`` replaces the cache folder
  (default: ``pooch.os_cache("napari-cytodiffusion")``);
* ``NAPARI_CYTODIFFUSION_MODEL_URL`` replaces the download address with a mirror that serves
  the files under their registry names (``<URL>/<file>``).

Every registry file is checked against its sha256 each time it is used, the shipped one too.
A file that does not match is never replaced or deleted here: the user decides what to do
with it. A user's own model file is given by its path and loaded as it is. Models a lab adapts
or calibrates (``adapt``, ``calibrate``) are registered as *local* models: the file is kept in
``<cache>/local/`` and listed, with its sha256, in ``<cache>/local/registry.json``, so every
command and widget offers them by name and checks them like the others (each version of a
local model is a new file, named after its sha256, so the list always names a matching file).
Loading never unpickles (see :func:`napari_cytodiffusion.core.model.checkpoint.load_model_file`).
"""

import hashlib
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parents[2] / "models"
REGISTRY_PATH = MODELS_DIR / "registry.json"
CACHE_ENV = "NAPARI_CYTODIFFUSION_CACHE"
URL_ENV = "NAPARI_CYTODIFFUSION_MODEL_URL"
DEFAULT_NAME = "default"
_ENTRY_FIELDS = ("name", "file", "sha256", "url", "classes", "image_size", "version")
LOCAL_FOLDER = "local"
_NAME_CHARACTERS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
MAX_NAME_LENGTH = 100


class WeightsError(ValueError):
    """A model that cannot be found, downloaded or trusted; the message says what to do."""


@dataclass(frozen=True)
class ModelEntry:
    """One named model of the registry."""

    name: str
    file: str
    sha256: str
    url: str | None
    classes: tuple
    image_size: int
    version: str
    description: str = ""
    default: bool = False
    local: bool = False


def read_registry(path=None):
    """Return the registry as (name of the default model, list of :class:`ModelEntry`)."""
    path = Path(path or REGISTRY_PATH)
    try:
        registry = json.loads(path.read_text())
        default = registry[DEFAULT_NAME]
        entries = [_entry(item, default) for item in registry["models"]]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise WeightsError(
            f"The model registry {path} is unreadable or incomplete ({error}); "
            "reinstall napari-cytodiffusion."
        ) from error
    return default, entries


def _entry(item, default=None, local=False):
    missing = [key for key in _ENTRY_FIELDS if key not in item]
    if missing:
        raise KeyError(", ".join(missing))
    return ModelEntry(
        name=item["name"],
        file=item["file"],
        sha256=item["sha256"].lower(),
        url=item["url"],
        classes=tuple(item["classes"]),
        image_size=int(item["image_size"]),
        version=str(item["version"]),
        description=item.get("description", ""),
        default=item["name"] == default,
        local=local,
    )


def local_registry_path():
    """The list of this machine's local models (adapted or calibrated by a lab)."""
    return cache_dir() / LOCAL_FOLDER / "registry.json"


def read_local_models():
    """The local models as a list of :class:`ModelEntry` (empty when there are none)."""
    path = local_registry_path()
    if not path.is_file():
        return []
    try:
        return [_entry(item, local=True) for item in json.loads(path.read_text())["models"]]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise WeightsError(
            f"The list of local models {path} is unreadable ({error}); repair or delete it "
            "(the model files beside it stay usable by their paths)."
        ) from error


def list_models():
    """Return every named model as a :class:`ModelEntry`: the default one first, then the other
    registry models, then local ones."""
    _, entries = read_registry()
    return sorted(entries, key=lambda entry: not entry.default) + read_local_models()


def find_model(name):
    """Return the entry of the model called ``name`` (``default`` included), or None."""
    default, entries = read_registry()
    name = default if name == DEFAULT_NAME else name
    return next((entry for entry in entries + read_local_models() if entry.name == name), None)


def check_local_name(name):
    """Raise :class:`WeightsError` unless ``name`` can name a new local model.

    A registry model's name (or ``default``) is refused; an existing local model of that
    name is replaced by :func:`register_local_model`.
    """
    if not name or not set(name) <= _NAME_CHARACTERS or name.startswith("."):
        raise WeightsError(
            f"{name!r} cannot name a model: use letters, digits, '-', '_' and '.', for "
            "example 'lab-a-adapted'."
        )
    if len(name) > MAX_NAME_LENGTH:  # it names files, with suffixes, on every file system
        raise WeightsError(
            f"A model's name may have up to {MAX_NAME_LENGTH} characters; {name[:20]}... has "
            f"{len(name)}."
        )
    default, entries = read_registry()
    if name in {DEFAULT_NAME, default} | {entry.name for entry in entries}:
        raise WeightsError(f"{name!r} is a model of the package; choose another name.")


def register_local_model(model, name, description=""):
    """Save ``model`` (a DiffusionModel) as the local model ``name`` and list it.

    The weights go to a new file named after their sha256 (``<name>.<sha256[:12]>.pt``), the
    list is then replaced atomically to name it, and only then is the earlier file of that name
    removed: an interrupted or failed call leaves the list naming a file that matches its
    sha256, the earlier model (intact and listed) or the new one.

    Returns
    -------
    ModelEntry
    """
    from napari_cytodiffusion.core.io import atomic_write

    check_local_name(name)
    folder = local_registry_path().parent
    folder.mkdir(parents=True, exist_ok=True)
    listed = read_local_models()
    path, sha256 = _save_weights(model, folder, name)
    item = {
        "name": name,
        "file": path.name,
        "sha256": sha256,
        "url": None,
        "classes": list(model.classes),
        "image_size": model.image_size,
        "version": "local",
        "description": description,
    }
    others = [
        {key: getattr(entry, key) for key in (*_ENTRY_FIELDS, "description")}
        for entry in listed
        if entry.name != name
    ]
    # The earlier file of this name, once the list no longer names it.
    kept = {other["file"] for other in others} | {path.name}
    earlier = {entry.file for entry in listed if entry.name == name} - kept
    try:
        with atomic_write(local_registry_path()) as partial:
            Path(partial).write_text(json.dumps({"models": [*others, item]}, indent=2) + "\n")
    except BaseException:
        if path.name not in {entry.file for entry in listed}:
            path.unlink(missing_ok=True)  # listed nowhere: the earlier model stays as it was
        raise
    for file in earlier:  # listed no more (a hand-edited list may name a path: not that)
        if Path(file).name == file:
            (folder / file).unlink(missing_ok=True)
    with _SHARED_LOCK:  # widgets must not keep using the model this one replaced
        for key in [key for key in _SHARED if key[0] == name]:
            del _SHARED[key]
    return _entry(item, local=True)


def _save_weights(model, folder, name):
    """(path, sha256) of ``model`` saved in ``folder`` under a name no listed file of other
    contents has: ``<name>.<sha256[:12]>.pt``."""
    from napari_cytodiffusion.core.model.checkpoint import save_model_file

    staged = folder / f".{name}.{os.getpid()}.staged.pt"
    try:
        save_model_file(model, staged)
        sha256 = file_sha256(staged)
        path = folder / f"{name}.{sha256[:12]}.pt"
        os.replace(staged, path)  # the same contents if that file exists: it stays consistent
    finally:
        staged.unlink(missing_ok=True)
    return path, sha256


def cache_dir():
    """The folder downloaded models are kept in (``NAPARI_CYTODIFFUSION_CACHE`` overrides it)."""
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override).expanduser()
    import pooch

    return Path(pooch.os_cache("napari-cytodiffusion"))


def download_url(entry):
    """The address ``entry`` is downloaded from: the mirror of ``NAPARI_CYTODIFFUSION_MODEL_URL``
    when set, else the registry's own, or None when there is neither."""
    mirror = os.environ.get(URL_ENV)
    if mirror:
        return f"{mirror.rstrip('/')}/{entry.file}"
    return entry.url


def local_file(entry):
    """Where ``entry`` is on this machine, shipped, cached or local, or None if it is not here."""
    if entry.local:
        path = local_registry_path().parent / entry.file
        return path if path.is_file() else None
    shipped = MODELS_DIR / entry.file
    if shipped.is_file():
        return shipped
    cached = cache_dir() / entry.file
    return cached if cached.is_file() else None


def location(entry):
    """``shipped``, ``cached``, ``local`` or ``download``: where ``entry`` would be loaded from."""
    path = local_file(entry)
    if entry.local:
        return "local" if path else "missing"
    if path is None:
        return "download"
    return "shipped" if path.parent == MODELS_DIR else "cached"


def file_sha256(path):
    """The hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path, entry):
    """Raise :class:`WeightsError` unless the file at ``path`` has ``entry``'s sha256."""
    found = file_sha256(path)
    if found != entry.sha256:
        raise WeightsError(
            f"{path} does not match the sha256 of model {entry.name!r}: expected "
            f"{entry.sha256}, found {found}. The file was left untouched; it may be damaged or "
            "a different version. Delete it to download it again (reinstall the package if it "
            "is the shipped file), or load it as your own model by its path. If you re-exported "
            "it on purpose, record its new hash with "
            "`napari-cytodiffusion models hash FILE --update`."
        )


def model_path(name_or_path="default", progress=None):
    """Return the local path of a registry model (downloading it if needed) or of a user's file.

    Parameters
    ----------
    name_or_path : str or Path
        A registry name (``default`` for the shipped model) or the path of a model file.
    progress : callable, optional
        Called as ``progress(bytes_done, bytes_total)`` while downloading; raising
        :class:`~napari_cytodiffusion.core.progress.Cancelled` from it stops the download and
        leaves no file behind.

    Raises
    ------
    WeightsError
        For an unknown name, a sha256 mismatch, or a failed download.
    """
    entry = find_model(str(name_or_path))
    if entry is None:
        path = Path(name_or_path).expanduser()
        if path.is_file():
            return path
        names = ", ".join([DEFAULT_NAME] + [e.name for e in list_models()])
        raise WeightsError(
            f"{name_or_path!r} is neither a model name ({names}) nor an existing model file."
        )
    path = local_file(entry)
    if path is None and entry.local:
        raise WeightsError(
            f"The file of local model {entry.name!r} ({entry.file}) is missing from "
            f"{local_registry_path().parent}; adapt or calibrate it again."
        )
    if path is None:
        path = _download(entry, cache_dir() / entry.file, progress)
    verify_sha256(path, entry)
    return path


def load_model(name_or_path="default", device="auto", progress=None):
    """Load a registry model or a user's model file, ready to use on ``device``.

    ``progress`` reports a download as in :func:`model_path`.

    Returns
    -------
    napari_cytodiffusion.core.model.checkpoint.DiffusionModel
    """
    from napari_cytodiffusion.core.model.checkpoint import load_model_file

    path = model_path(name_or_path, progress)
    entry = find_model(str(name_or_path))
    # A file is named by its full path: the same file, however it was typed, is one model.
    return load_model_file(path, device, name=entry.name if entry else str(path.resolve()))


_SHARED = {}
_SHARED_LOCK = threading.Lock()


def shared_model(name_or_path="default", device="auto", progress=None):
    """:func:`load_model`, loaded once per (name, device) in this process and then shared.

    For the widgets, and for the workers of a dask cluster, which keep the model between tiles.
    """
    key = (str(name_or_path).strip() or DEFAULT_NAME, str(device))
    with _SHARED_LOCK:
        if key not in _SHARED:
            _SHARED[key] = load_model(key[0], device, progress)
        return _SHARED[key]


def model_classes(name_or_path="default"):
    """The classes of a registry model or a model file, without loading its network.

    Returns None when ``name_or_path`` is neither (the caller asks again once it is valid).
    """
    entry = find_model(str(name_or_path))
    if entry is not None:
        return entry.classes
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        return None
    from napari_cytodiffusion.core.model.checkpoint import ModelFileError, model_file_classes

    try:
        return model_file_classes(path)
    except ModelFileError:
        return None


def update_registry_hash(path):
    """Record the sha256 of ``path`` in the registry entry with the same file name.

    For maintainers after re-exporting a model file. Returns (entry name, new sha256).
    """
    from napari_cytodiffusion.core.io import atomic_write
    from napari_cytodiffusion.core.model.checkpoint import load_model_file

    path = Path(path)
    registry = json.loads(REGISTRY_PATH.read_text())
    item = next((item for item in registry["models"] if item["file"] == path.name), None)
    if item is None:
        raise WeightsError(
            f"No registry model has the file name {path.name!r}; see {REGISTRY_PATH}."
        )
    model = load_model_file(path, "cpu")  # a damaged or foreign file is refused here
    if list(model.classes) != list(item["classes"]) or model.image_size != item["image_size"]:
        raise WeightsError(
            f"{path} is not a re-export of {item['name']}: it has {model.image_size}-px images "
            f"and classes {', '.join(model.classes)}, the registry "
            f"{item['image_size']}-px and {', '.join(item['classes'])}."
        )
    item["sha256"] = file_sha256(path)
    with atomic_write(REGISTRY_PATH) as partial:
        Path(partial).write_text(json.dumps(registry, indent=2) + "\n")
    return item["name"], item["sha256"]


class _DownloadProgress:
    """The tqdm-like object pooch updates, forwarded to a ``progress(done, total)`` callback."""

    def __init__(self, progress):
        self._progress = progress
        self._done = 0
        self.total = 0

    def update(self, size):
        self._done += size
        done = min(self._done, self.total) if self.total else self._done
        self._progress(done, self.total)

    def reset(self):
        self._done = 0

    def close(self):
        pass


def _download(entry, target, progress):
    """Download ``entry`` to ``target`` through a temporary file that pooch removes on failure."""
    import pooch

    url = download_url(entry)
    if not url:
        raise WeightsError(
            f"Model {entry.name!r} ({entry.file}) is not on this machine and the registry gives "
            f"no address for it; set {URL_ENV} to a mirror that serves {entry.file}."
        )
    if not url.startswith(("https://", "http://")):
        raise WeightsError(
            f"Cannot download {entry.file} from {url!r}: only http:// and https:// addresses "
            f"are supported. Check {URL_ENV} or the registry."
        )
    downloader = pooch.HTTPDownloader(
        progressbar=_DownloadProgress(progress) if progress else False,
        chunk_size=1 << 16,
        timeout=60,
    )
    try:
        pooch.retrieve(
            url,
            known_hash=f"sha256:{entry.sha256}",
            fname=entry.file,
            path=target.parent,
            downloader=downloader,
        )
    except ValueError as error:  # pooch reports a hash mismatch as ValueError
        raise WeightsError(
            f"The download of {entry.file} from {url} does not match its sha256: expected "
            f"{entry.sha256}. Nothing was saved; the server holds a different file."
        ) from error
    except OSError as error:  # requests' errors are OSErrors
        raise WeightsError(
            f"Could not download {entry.file} from {url}: {error}. Nothing was saved. Check "
            f"the network, or set {URL_ENV} to a mirror that serves {entry.file}."
        ) from error
    return target
