"""Signal models (pure forward functions) and noise."""

from qmri_labels.physics.base import (
    Parameter,
    SignalModel,
    available_models,
    class_path,
    display_unit,
    get_model,
    register_model,
    use_model,
)
from qmri_labels.physics.fatwater import FatWater1p5TModel, FatWaterModel, fat_phasor
from qmri_labels.physics.ivim import IVIMModel, ivim_signal
from qmri_labels.physics.monoexp import MonoExpModel, monoexp_signal
from qmri_labels.physics.relaxometry import T2Model, T2StarModel, relaxation_signal
from qmri_labels.physics.noise import add_noise, sigma_from_snr

__all__ = [
    "Parameter",
    "SignalModel",
    "available_models",
    "display_unit",
    "get_model",
    "register_model",
    "use_model",
    "class_path",
    "FatWaterModel",
    "FatWater1p5TModel",
    "fat_phasor",
    "IVIMModel",
    "ivim_signal",
    "MonoExpModel",
    "monoexp_signal",
    "T2Model",
    "T2StarModel",
    "relaxation_signal",
    "add_noise",
    "sigma_from_snr",
]
