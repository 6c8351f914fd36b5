"""CytoDiffusion-style analysis of blood-cell smears for napari."""

__version__ = "0.1.0"
