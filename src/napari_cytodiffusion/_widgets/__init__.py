"""Thin napari widgets over the core: build the UI, run the core in a worker, add layers."""
