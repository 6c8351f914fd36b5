"""Reading images from disk with messages a user can act on, and writing files safely."""

import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np


class InputFileError(OSError):
    """A file that is missing or cannot be read as an image."""


def read_image(path):
    """Read a PNG, JPEG, BMP or TIFF file into a numpy array.

    Raises
    ------
    InputFileError
        If the file does not exist or is not a readable image.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        if not folder_images(path):
            raise InputFileError(no_images_message(path))
        raise InputFileError(f"{path} is a folder, not an image file")
    if not path.is_file():
        raise InputFileError(f"No such file: {path}")
    try:
        if path.suffix.lower() in (".tif", ".tiff") and not _is_cmyk_tiff(path):
            import tifffile

            return _channels_last(np.asarray(tifffile.imread(path)))

        with _open_with_pillow(path) as image:
            if image.mode in ("P", "CMYK", "YCbCr", "LAB", "HSV"):
                image = image.convert("RGB")
            return _pillow_array(image)
    except InputFileError:
        raise
    except Exception as error:  # any decoder failure means the same thing to the user
        raise InputFileError(f"Cannot read {path} as an image: {error}") from error


# Pillow's array conversion holds two extra copies of the image; strips of this many pixels
# are copied instead.
_STRIP_PIXELS = 4_000_000


def _open_with_pillow(path):
    """Image.open without Pillow's decompression-bomb warning (a microscope mosaic is not a
    bomb); an image past Pillow's hard limit (about 179 megapixels) gets a message that says
    what to do."""
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(path)
    except Image.DecompressionBombError as error:
        raise InputFileError(
            f"{path} is too large to read whole ({error}); save it as a tiled TIFF or "
            "OME-Zarr, which are read lazily."
        ) from error


def _pillow_array(image):
    """The pixels of a Pillow image as an array, copied strip by strip."""
    if image.width * image.height <= _STRIP_PIXELS:
        return np.asarray(image)
    image.load()
    rows = max(1, _STRIP_PIXELS // image.width)
    first = np.asarray(image.crop((0, 0, image.width, 1)))
    out = np.empty((image.height, *first.shape[1:]), first.dtype)
    for top in range(0, image.height, rows):
        bottom = min(top + rows, image.height)
        out[top:bottom] = np.asarray(image.crop((0, top, image.width, bottom)))
    return out


def _is_cmyk_tiff(path):
    """A CMYK (separated) TIFF, which Pillow converts to RGB; tifffile would give CMYK."""
    import tifffile

    with tifffile.TiffFile(path) as tiff:
        return tiff.pages[0].photometric == tifffile.PHOTOMETRIC.SEPARATED


# TIFFs larger than this many pixels are opened lazily instead of being read whole.
LAZY_PIXELS = 16_000_000
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def folder_images(folder):
    """The image files directly inside ``folder`` (by suffix), sorted."""
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def distinct_files(paths):
    """``paths`` with each file once, where first named: the same file named twice (``a.jpg``
    and ``./a.jpg``, a link to it, or a file of a folder named beside the folder) would else
    be counted twice.

    Examples
    --------
    >>> distinct_files(["a.jpg", "./a.jpg", "b.jpg"])
    ['a.jpg', 'b.jpg']
    """
    found = {}  # {real path: the path as named}
    for path in paths:
        found.setdefault(os.path.realpath(path), path)
    return list(found.values())


def no_images_message(folder):
    """Why ``folder``, which holds no image files, cannot be read, and where images are: a
    class-folder dataset keeps them one level down."""
    folder = Path(folder)
    text = f"{folder} is a folder with no image files (PNG, JPEG, BMP, TIFF) in it"
    holding = [p.name for p in sorted(folder.iterdir()) if p.is_dir() and folder_images(p)]
    if holding:
        shown = ", ".join(holding[:5]) + (", ..." if len(holding) > 5 else "")
        text += f"; its subfolders {shown} hold images: choose one of them"
    return text


def image_size(path):
    """(height, width) of an image file from its header, or None where it cannot be read."""
    try:
        with _open_with_pillow(path) as image:
            return image.height, image.width
    except Exception:  # unreadable for any reason: the caller measures it another way
        return None


def open_image(path):
    """An image of any size as an array read only where it is sliced.

    Large TIFFs (tiled, pyramidal: the full-resolution level) and OME-Zarr folders are opened
    lazily through zarr, so a whole-slide scan is never loaded at once; other images are read
    whole (:func:`read_image`). Planar (channels-first) images come back channels-last.

    Raises
    ------
    InputFileError
        If the path does not exist or is not a readable image.
    """
    path = Path(path)
    try:
        if path.is_dir():
            return _channels_last(_ome_zarr_level0(path))
        if path.suffix.lower() in (".tif", ".tiff") and path.is_file():
            import tifffile

            with tifffile.TiffFile(path) as tiff:
                shape = tiff.series[0].shape
            if int(np.prod(shape)) > 3 * LAZY_PIXELS:
                import zarr

                store = tifffile.imread(path, aszarr=True, level=0)
                return _channels_last(zarr.open(store, mode="r"))
    except InputFileError:
        raise
    except Exception as error:  # any decoder failure means the same thing to the user
        raise InputFileError(f"Cannot read {path} as an image: {error}") from error
    return _channels_last(read_image(path))


def _ome_zarr_level0(path):
    """The full-resolution array of an OME-Zarr image (or a plain zarr array)."""
    import zarr

    if not (
        (path / ".zattrs").exists() or (path / "zarr.json").exists() or (path / ".zarray").exists()
    ):
        raise InputFileError(f"{path} is a folder, not an image or an OME-Zarr image.")
    node = zarr.open(path, mode="r")
    if hasattr(node, "shape"):
        return node
    multiscales = node.attrs.get("multiscales") or node.attrs.get("ome", {}).get("multiscales")
    if not multiscales:
        raise InputFileError(f"{path} is a zarr group without OME multiscales.")
    return node[multiscales[0]["datasets"][0]["path"]]


def _channels_last(array):
    """Leading single axes dropped and (3 or 4, rows, cols) made (rows, cols, channels),
    lazily for arrays not in memory."""
    shape = tuple(array.shape)
    planar = len(shape) >= 3 and shape[-3] in (3, 4) and shape[-1] not in (3, 4)
    if len(shape) <= 3 and not planar:
        return array
    if isinstance(array, np.ndarray):
        array = array.reshape([n for n in shape[:-3] if n != 1] + list(shape[-3:]))
        return np.moveaxis(array, -3, -1) if planar else array
    import dask.array as da

    lazy = da.from_zarr(array) if not isinstance(array, da.Array) else array
    lazy = lazy.reshape([n for n in shape[:-3] if n != 1] + list(shape[-3:]))
    return da.moveaxis(lazy, -3, -1) if planar else lazy


def read_table(path, required=()):
    """Rows of a CSV file as dicts, as spreadsheets write them.

    A byte-order mark is dropped, ``;`` or tab separators are recognised, column names are
    stripped of spaces, and rows of empty cells (``,,,`` at the end of a sheet) are skipped.

    Raises
    ------
    ValueError
        Naming the file (and line), if it cannot be read or lacks a ``required`` column.
    """
    import csv

    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: cannot read it as a CSV text file ({error}).") from error
    first = text.split("\n", 1)[0]
    delimiter = max((",", ";", "\t"), key=first.count)
    csv.field_size_limit(1 << 24)
    reader = csv.DictReader(text.splitlines(), delimiter=delimiter)
    try:
        rows = [
            {(k or "").strip(): v for k, v in row.items()}
            for row in reader
            if any(str(value or "").strip() for value in row.values())
        ]
    except csv.Error as error:
        raise ValueError(f"{path}, line {reader.line_num}: {error}") from error
    columns = {(name or "").strip() for name in reader.fieldnames or ()}
    missing = set(required) - columns
    if missing:
        raise ValueError(f"{path} lacks the column(s) {sorted(missing)}.")
    return rows


def folder_problem(folder):
    """Why ``folder`` cannot be written into (made where missing), or "" when it can: checked
    before any work, so that results are not lost at the end.

    Examples
    --------
    >>> folder_problem(__file__).endswith("is a file")
    True
    """
    path = Path(folder).expanduser()
    existing = next(part for part in (path, *path.parents) if part.exists())
    if not existing.is_dir():
        if existing == path:
            return f"{folder} is a file"
        return f"{existing} is a file, so {folder} cannot be made in it"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} cannot be written (no permission)"
    return ""


@contextmanager
def atomic_write(path):
    """Yield a temporary path beside ``path``; it becomes ``path`` only if the block succeeds.

    A crash or error mid-write leaves any earlier file at ``path`` untouched and no partial
    file under the final name. The temporary name keeps the suffix, so writers that choose
    the format by extension still work.
    """
    path = Path(path)
    partial = path.with_name(f".{path.stem}.{os.getpid()}.partial{path.suffix}")
    try:
        yield partial
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


class FolderBusyError(OSError):
    """Another run is writing into the same output folder."""


@contextmanager
def exclusive_folder(folder):
    """Hold ``folder`` for this process while writing into it; another run is refused.

    A lock file names the process; a lock left by a process that no longer runs (killed) is
    taken over.

    Raises
    ------
    FolderBusyError
        If another running process holds the folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / ".napari-cytodiffusion.lock"
    for _ in range(2):
        try:
            handle = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            if _alive(lock):
                raise FolderBusyError(
                    f"{folder} is being written by another napari-cytodiffusion run (process "
                    f"{lock.read_text().strip()}); wait for it, or choose another folder."
                ) from None
            lock.unlink(missing_ok=True)  # left by a run that was killed
    else:
        raise FolderBusyError(f"Could not lock {folder}; try again.")
    os.write(handle, str(os.getpid()).encode())
    os.close(handle)
    try:
        yield folder
    finally:
        lock.unlink(missing_ok=True)


def _alive(lock):
    """Whether the process named in ``lock`` still runs."""
    try:
        pid = int(lock.read_text().strip())
        os.kill(pid, 0)
    except PermissionError:
        return True  # it runs, as another user: not ours to signal, nor to take over
    except (OSError, ValueError):
        return False
    return True
