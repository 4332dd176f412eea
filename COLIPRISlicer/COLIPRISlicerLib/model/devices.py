"""Device and precision choice for the encoders (CUDA, then MPS, then CPU; bf16 where native)."""

from __future__ import annotations

import re

#: Device names accepted from users: auto, cpu, cuda, cuda:N, mps.
DEVICE_NAME = re.compile(r"auto|cpu|cuda(?::\d+)?|mps")


def select_device(device: str = "auto"):
    """``auto`` -> CUDA, then MPS, then CPU; explicit names are checked.

    Raises:
        ValueError: a name other than auto, cpu, cuda, cuda:N or mps.
        RuntimeError: CUDA or MPS requested but not available to this torch.
    """
    import torch

    if not DEVICE_NAME.fullmatch(str(device)):
        raise ValueError(f'Unknown device "{device}"; use "auto", "cpu", "cuda", "cuda:N" or "mps".')
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        message = (
            "CUDA was requested but torch sees no CUDA device (a CPU build of torch, or no"
            ' driver). Choose device "cpu" or "auto", or install a CUDA build of PyTorch.'
        )
        raise RuntimeError(message)
    if device == "mps" and not mps:
        raise RuntimeError('MPS (Apple GPU) was requested but torch sees none; choose device "cpu" or "auto".')
    return torch.device(device)


def select_precision(precision: str, device) -> str:
    """Return ``bf16`` or ``fp32`` for the image and text encoders."""
    import torch

    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f'Unknown precision "{precision}"; use "auto", "bf16" or "fp32".')
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_has_native_bf16() else "fp32"
    return "fp32"


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), per torch's private probes.

    Those probes (``torch.cpu._is_avx512_bf16_supported``, ``_is_amx_tile_supported``) are not
    public API: where a torch build lacks them, the answer is False (fp32, always correct).
    """
    import torch

    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(bool(probe()) for probe in probes if callable(probe))


def out_of_memory_errors() -> tuple[type[BaseException], ...]:
    """Exception types torch raises when a device runs out of memory.

    ``torch.OutOfMemoryError`` exists from torch 2.5 (older builds raise ``torch.cuda.OutOfMemoryError``).
    """
    import torch

    found = [getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None)]
    return tuple(kind for kind in found if isinstance(kind, type)) or (MemoryError,)
