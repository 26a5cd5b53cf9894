"""Determinism controls: the six sources of irreproducibility of Oh et al. (2022), fixed or varied
one at a time, and their record for manifests.

Sources and the control for each:

* weight initialisation: ``init_seed`` (the network's RNG stream);
* mini-batch order: ``shuffle_seed`` (the data module's own generator, separate from the init);
* data type: ``dtype`` in ``float32`` / ``float64`` / ``bf16-mixed`` (Lightning precision);
* deterministic algorithms: ``deterministic`` (``torch.use_deterministic_algorithms`` and
  ``torch.backends.cudnn.deterministic``; with CUDA also ``CUBLAS_WORKSPACE_CONFIG``);
* cuDNN benchmarking: ``cudnn_benchmark`` (``torch.backends.cudnn.benchmark``);
* device (GPU model): ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...), recorded with
  the device's name.

:class:`DeterminismSettings` holds one choice of all of them,
:func:`determinism_scope` applies it (and restores the previous global state afterwards),
:func:`record_determinism` writes what was in force into a manifest, and :func:`run_inference`
runs a trained network under (possibly other) settings.
:func:`qmri_labels.estimators.train_network` trains an estimator under the settings.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import random
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch import nn

from qmri_labels.provenance import device_info, package_versions
from qmri_labels.threads import torch_threads

#: dtype choice -> Lightning precision flag
PRECISIONS = {"float32": "32-true", "float64": "64-true", "bf16-mixed": "bf16-mixed"}
#: the sources a study can vary one at a time
SOURCES = ("init_seed", "shuffle_seed", "dtype", "deterministic", "cudnn_benchmark", "device", "num_threads")
_CUBLAS_ENV = "CUBLAS_WORKSPACE_CONFIG"


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's legacy and torch's (CPU and CUDA) global generators.

    The toolkit itself draws from explicit generators; this covers third-party code that uses
    the global ones.
    """
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


@dataclass(frozen=True)
class DeterminismSettings:
    """One choice of every source of irreproducibility.

    Parameters
    ----------
    seed : int
        Seeds the train/validation split and the global generators; also the weight init and
        the batch order unless those are given.
    init_seed : int or None
        Weight-initialisation seed (``None``: ``seed``).
    shuffle_seed : int or None
        Mini-batch order seed (``None``: ``seed``).
    dtype : {"float32", "float64", "bf16-mixed"}
    deterministic : bool
        Deterministic algorithms (an error where an op has none).
    cudnn_benchmark : bool
        Let cuDNN time kernels and pick the fastest (may differ from run to run).
    device : str
        ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    num_threads : int or None
        CPU intra-op threads (``None``: leave torch's setting); a different number of
        threads can change the order of floating-point reductions.
    """

    seed: int = 0
    init_seed: int | None = None
    shuffle_seed: int | None = None
    dtype: str = "float32"
    deterministic: bool = True
    cudnn_benchmark: bool = False
    device: str = "cpu"
    num_threads: int | None = None

    def __post_init__(self):
        if self.dtype not in PRECISIONS:
            raise ValueError(f"dtype must be one of {sorted(PRECISIONS)}, got {self.dtype!r}")
        for name in ("seed", "init_seed", "shuffle_seed"):
            value = getattr(self, name)
            if value is not None and (int(value) != value or value < 0):
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if self.num_threads is not None and (int(self.num_threads) != self.num_threads or self.num_threads < 1):
            raise ValueError(f"num_threads must be a positive integer or None, got {self.num_threads!r}")
        device = str(self.device)
        if not (device == "cpu" or device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit())):
            raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        for name in ("deterministic", "cudnn_benchmark"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")

    @property
    def resolved_init_seed(self) -> int:
        return int(self.seed if self.init_seed is None else self.init_seed)

    @property
    def resolved_shuffle_seed(self) -> int:
        return int(self.seed if self.shuffle_seed is None else self.shuffle_seed)

    @property
    def precision(self) -> str:
        """Lightning's precision flag for :attr:`dtype`."""
        return PRECISIONS[self.dtype]

    @property
    def torch_dtype(self) -> torch.dtype:
        """Parameter dtype (``bf16-mixed`` keeps float32 weights and computes in bfloat16)."""
        return torch.float64 if self.dtype == "float64" else torch.float32

    def replace(self, **changes) -> "DeterminismSettings":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DeterminismSettings":
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown determinism settings {sorted(unknown)}")
        return cls(**d)

    def available(self) -> tuple[bool, str]:
        """Whether these settings can run here, and if not, why."""
        return device_available(self.device)

    def estimator_kwargs(self) -> dict:
        """Keyword arguments of :class:`~qmri_labels.estimators.NetworkEstimator` for these settings."""
        accelerator, devices = ("cpu", 1) if self.device == "cpu" else ("gpu", [_cuda_index(self.device)])
        return {"seed": int(self.seed), "init_seed": self.resolved_init_seed,
                "shuffle_seed": self.resolved_shuffle_seed, "precision": self.precision,
                "deterministic": bool(self.deterministic), "benchmark": bool(self.cudnn_benchmark),
                "accelerator": accelerator, "devices": devices, "record_step_losses": True}


def _cuda_index(device: str) -> int:
    return int(device.split(":")[1]) if ":" in device else 0


def device_available(device: str) -> tuple[bool, str]:
    """``(True, "")`` if ``device`` can be used here, else ``(False, reason)``."""
    if device == "cpu":
        return True, ""
    if not torch.cuda.is_available():
        return False, f"{device} requested but torch.cuda.is_available() is False (no CUDA GPU on this machine)"
    index = _cuda_index(device)
    if index >= torch.cuda.device_count():
        return False, f"{device} requested but only {torch.cuda.device_count()} CUDA device(s) present"
    return True, ""


def device_name(device: str) -> str:
    """Human-readable name: the GPU model for CUDA devices, the processor for the CPU
    (from :func:`qmri_labels.provenance.device_info`, the one place that describes devices)."""
    info = device_info(device if device_available(device)[0] else "cpu")
    return info.get("gpu_name") or info["processor"] or "cpu"


@contextlib.contextmanager
def determinism_scope(settings: DeterminismSettings) -> Iterator[DeterminismSettings]:
    """Apply the global flags of ``settings`` and restore the previous state on exit.

    Sets ``torch.use_deterministic_algorithms``, ``torch.backends.cudnn.deterministic`` and
    ``.benchmark``, the cuBLAS workspace variable that deterministic CUDA matmuls need, the
    CPU thread count, and seeds the global generators with ``settings.seed``.
    """
    ok, reason = settings.available()
    if not ok:
        raise ValueError(reason)
    before = {
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cublas": os.environ.get(_CUBLAS_ENV),
    }
    try:
        if settings.deterministic and _CUBLAS_ENV not in os.environ:
            os.environ[_CUBLAS_ENV] = ":4096:8"
        torch.use_deterministic_algorithms(bool(settings.deterministic))
        torch.backends.cudnn.deterministic = bool(settings.deterministic)
        torch.backends.cudnn.benchmark = bool(settings.cudnn_benchmark)
        with torch_threads(settings.num_threads):
            seed_everything(settings.seed)
            yield settings
    finally:
        torch.use_deterministic_algorithms(before["deterministic"], warn_only=before["warn_only"])
        torch.backends.cudnn.deterministic = before["cudnn_deterministic"]
        torch.backends.cudnn.benchmark = before["cudnn_benchmark"]
        if before["cublas"] is None:
            os.environ.pop(_CUBLAS_ENV, None)
        else:
            os.environ[_CUBLAS_ENV] = before["cublas"]


def record_determinism(settings: DeterminismSettings | None = None) -> dict:
    """The determinism state for a manifest: the settings asked for and the flags in force.

    Call it inside :func:`determinism_scope` to record what a run actually used.
    """
    device = settings.device if settings is not None else "cpu"
    info = device_info(device if device_available(device)[0] else "cpu")
    record = {
        "settings": settings.to_dict() if settings is not None else None,
        "precision": settings.precision if settings is not None else None,
        "use_deterministic_algorithms": info["deterministic_algorithms"],
        "deterministic_warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "cudnn_deterministic": info["cudnn_deterministic"],
        "cudnn_benchmark": info["cudnn_benchmark"],
        "cudnn_version": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cublas_workspace_config": os.environ.get(_CUBLAS_ENV),
        "num_threads": info["torch_threads"],
        "device": device,
        "device_name": info.get("gpu_name") or info["processor"] or "cpu",
        # what bundle manifests record too, from the same functions
        "device_info": info,
        "versions": package_versions(),
    }
    return record


# --------------------------------------------------------------------------------------------
# inference under settings
# --------------------------------------------------------------------------------------------


def run_inference(network: nn.Module, signals: np.ndarray, settings: DeterminismSettings | None = None,
                  batch_size: int = 65536) -> np.ndarray:
    """Run a trained network on ``signals`` (N, M) under ``settings``; float32 (N, P) output.

    The network is copied, cast to ``settings.torch_dtype`` and moved to ``settings.device``;
    ``bf16-mixed`` runs under bfloat16 autocast. The caller's network is left untouched.
    """
    settings = settings or DeterminismSettings()
    with determinism_scope(settings):
        device = torch.device(settings.device)
        net = copy.deepcopy(network).to(device=device, dtype=settings.torch_dtype).eval()
        signals = np.asarray(signals)
        out = np.empty((signals.shape[0], _n_outputs(net, signals[:1], device, settings)), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, signals.shape[0], int(batch_size)):
                block = torch.as_tensor(signals[start : start + batch_size], device=device, dtype=settings.torch_dtype)
                with _autocast(settings, device):
                    pred = net(block)
                out[start : start + batch_size] = pred.float().cpu().numpy()
    return out


def _n_outputs(net, first, device, settings) -> int:
    with torch.inference_mode(), _autocast(settings, device):
        return int(net(torch.as_tensor(first, device=device, dtype=settings.torch_dtype)).shape[-1])


def _autocast(settings: DeterminismSettings, device: torch.device):
    if settings.dtype == "bf16-mixed":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def weights_equal(a: nn.Module, b: nn.Module) -> bool:
    """Bitwise equality of two networks' state dicts."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape and torch.equal(sa[k].cpu(), sb[k].cpu())
        for k in sa)


def bitwise_equal(a: np.ndarray, b: np.ndarray) -> bool:
    """Same shape, dtype and bytes (NaNs with equal payloads count as equal)."""
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()
