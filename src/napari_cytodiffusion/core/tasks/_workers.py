"""What the workers of a dask.distributed cluster do when they join a batch analysis."""

import threading

from distributed import WorkerPlugin


class LoadModelEarly(WorkerPlugin):
    """Load the model on each worker in the background as soon as it joins.

    A fresh worker process spends seconds importing torch and loading the model; done in the
    background, that overlaps with measuring the first smear, instead of delaying its first
    tile.
    """

    name = "napari-cytodiffusion-model"

    def __init__(self, model, device):
        self.model, self.device = model, device

    def setup(self, worker):
        threading.Thread(target=self._load, daemon=True).start()

    def _load(self):
        from napari_cytodiffusion.core.model.weights import shared_model

        try:
            shared_model(self.model, self.device)
        except Exception:  # noqa: BLE001 - the first tile loads it again and reports why
            return
