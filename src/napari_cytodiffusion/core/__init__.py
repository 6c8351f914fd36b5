"""Qt-free core of napari-cytodiffusion: plain functions on arrays.

Nothing here imports napari or Qt; torch is imported inside the functions that need it.
"""

from napari_cytodiffusion.core.classes import CLASSES

__all__ = ["CLASSES"]
