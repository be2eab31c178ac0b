"""Pick the torch device a run trains on: CUDA when present (and asked for), else CPU."""

from __future__ import annotations

import torch

from fedvault.errors import ConfigError


def resolve_device(requested: str) -> torch.device:
    """``auto`` -> cuda if available else cpu; ``cuda`` without a GPU is a config error."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("invalid value for 'device': 'cuda' (no CUDA device is visible to this process)")
    return torch.device(requested)
