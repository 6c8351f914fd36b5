"""Moving cells between numpy crops and the network, and scoring them under several classes.

Two conversions and one evaluation that every model-side module shares:

* :func:`crops_to_tensor` / :func:`tensor_to_crops`: float RGB crops (n, size, size, 3) in
  [0, 1] to the model's (n, 3, size, size) in [-1, 1] on its device, and back;
* :func:`class_predictions` / :func:`paired_predictions`: the noise predicted for noisy images
  under several classes each. The UNet's encoder does not see the class, so each image is
  encoded once and only the decoder runs per class (the CytoDiffusion pairing: every class
  sees the same noise and timestep).
"""

import numpy as np


def crops_to_tensor(crops, model):
    """Float RGB crops (n, size, size, 3) in [0, 1] as a model-range tensor on its device.

    Raises
    ------
    ValueError
        If the crops are not RGB squares of the model's ``image_size``.
    """
    import torch

    from napari_cytodiffusion.core.model.diffusion import to_model_range

    crops = np.asarray(crops, np.float32)
    size = model.image_size
    if crops.ndim != 4 or crops.shape[1:] != (size, size, 3):
        raise ValueError(
            f"Expected crops of shape (n, {size}, {size}, 3) for this {size}-px model, got "
            f"{crops.shape}; make them with crop_cell(..., size={size}) or normalised_cell."
        )
    return to_model_range(torch.from_numpy(crops).permute(0, 3, 1, 2).to(model.device))


def tensor_to_crops(x):
    """A model-range tensor (n, 3, size, size) as float32 crops (n, size, size, 3) in [0, 1]."""
    return ((x.float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy().astype(np.float32)


def class_predictions(unet, noisy, t, rows, class_ids):
    """Noise predicted for ``noisy[rows[j]]`` under class ``class_ids[j]``, for every ``j``.

    Parameters
    ----------
    unet : CellUNet
    noisy : Tensor (n, 3, H, W)
        Noised images, each encoded once.
    t : LongTensor (n,)
        Their timesteps.
    rows, class_ids : LongTensor (m,)
        Which image and which class each prediction is for.

    Returns
    -------
    Tensor (m, 3, H, W)
    """
    from napari_cytodiffusion.core.model.unet import select_encoded

    return unet.decode(select_encoded(unet.encode(noisy, t), rows), class_ids)


def paired_predictions(unet, noisy, t, class_ids):
    """Noise predicted for each image under each of its classes, in float32.

    ``class_ids`` is a LongTensor (n, k): the k classes of each of the n images. Returns a
    tensor (n, k, 3, H, W).
    """
    import torch

    n, k = class_ids.shape
    rows = torch.arange(n, device=noisy.device).repeat_interleave(k)
    predicted = class_predictions(unet, noisy, t, rows, class_ids.reshape(-1))
    return predicted.float().view(n, k, *noisy.shape[1:])
