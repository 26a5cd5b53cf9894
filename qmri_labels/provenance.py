"""Where a result came from: package versions and the compute device, for manifests.

Bundles, study folders and maps record these through the same two functions. This module
sits low (it imports no other part of the toolkit but the package's version), so any layer
may use it.
"""

from __future__ import annotations

import platform
from typing import Any

import numpy as np
import torch

import qmri_labels


def package_versions(extra: tuple[str, ...] = ()) -> dict[str, str]:
    """Versions of Python and the packages a trained network depends on.

    ``extra`` names more importable packages to report (e.g. ``("scipy", "nibabel")`` for the
    fit command); a package that is not installed is reported as ``"not installed"``.
    """
    import lightning  # heavy; only manifests need its version

    versions = {
        "python": platform.python_version(),
        "qmri_labels": qmri_labels.__version__,
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "numpy": np.__version__,
    }
    try:
        import safetensors
    except ImportError:  # pragma: no cover - bundles fall back to torch.save then
        pass
    else:
        versions["safetensors"] = safetensors.__version__
    for name in extra:
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = "not installed"
    return versions


def device_info(device: str | torch.device | None = None) -> dict[str, Any]:
    """The compute device and the determinism flags in force, for manifests."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    info: dict[str, Any] = {
        "device": str(device),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
        "cuda_available": torch.cuda.is_available(),
    }
    if device.type == "cuda" and torch.cuda.is_available():
        info["gpu_name"] = torch.cuda.get_device_name(device)
        info["cuda_version"] = torch.version.cuda
    return info
