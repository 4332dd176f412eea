"""Device and precision choice for the encoders (CUDA, then MPS, then CPU; bf16 where native)."""

from __future__ import annotations


def select_device(device: str = "auto"):
    """``auto`` -> CUDA, then MPS, then CPU; explicit names are checked."""
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        message = (
            "CUDA was requested but torch sees no CUDA device (a CPU build of torch, or no"
            ' driver). Choose device "cpu" or "auto", or install a CUDA build of PyTorch.'
        )
        raise RuntimeError(message)
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
        native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        return "bf16" if native else "fp32"
    return "fp32"
