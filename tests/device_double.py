"""A test double of a device tensor: a CPU tensor that refuses host conversion as a CUDA tensor does
(``.numpy()``, ``np.*(t)``), until ``.cpu()`` brings it over. Lets the CPU suite run the code paths
that keep tensors on the GPU (``OnDevice.wrap(t)``); ``.item()`` and ``.tolist()`` work, as on CUDA."""

from __future__ import annotations

from typing import Any

import torch

REFUSAL = "can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor to host memory first."


class OnDevice(torch.Tensor):
    """Results of torch ops on an ``OnDevice`` stay ``OnDevice`` (``__torch_function__``)."""

    @staticmethod
    def wrap(t: torch.Tensor) -> "OnDevice":
        return t.as_subclass(OnDevice)

    def cpu(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.Tensor.cpu(self, *args, **kwargs).as_subclass(torch.Tensor)

    def numpy(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(REFUSAL)

    def __array__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(REFUSAL)
