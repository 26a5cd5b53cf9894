"""Writing maps as a BIDS-derivative folder: file names, JSON sidecars, dataset_description.json.

Names follow the BIDS derivatives conventions (and the diffusion-model proposal BEP016):

* a diffusion parameter map: ``<prefix>_model-<model>_param-<name>_dwimap.nii.gz``
  (e.g. ``sub-01_model-ivim_param-Dstar_dwimap.nii.gz``);
* the standard deviation of a parameter map (``--uncertainty``):
  ``<prefix>_model-<model>_param-<name>_desc-sd_dwimap.nii.gz``, the map's name with the
  ``desc-sd`` entity, in the parameter's units (its sidecar says what the SD is);
* the fit status per voxel: ``<prefix>_model-<model>_desc-status_dseg.nii.gz``;
* a noise map (when sigma was estimated per voxel): ``<prefix>_desc-sigma_noisemap.nii.gz``;
* a susceptibility map: ``<prefix>_Chimap.nii.gz`` (BIDS's QSM suffix); its standard deviation
  (``--uncertainty``, a U-Net ensemble): ``<prefix>_desc-sd_Chimap.nii.gz``, the same
  ``desc-sd`` entity;
* each NIfTI gets a JSON sidecar with the same stem: model, parameter, units, estimator,
  software name and version, and the SHA-256 of every input;
* the folder holds ``dataset_description.json`` (``DatasetType: derivative``, ``GeneratedBy``).

Everything is written into a folder that :func:`qmri_labels.fileio.atomic_dir` renames into
place only when complete.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

import numpy as np

from qmri_labels.data.io import save_nifti
from qmri_labels.fileio import write_json
from qmri_labels.maps.result import STATUS_CODES
from qmri_labels.physics import display_unit

BIDS_VERSION = "1.9.0"
_ENTITY = re.compile(r"^[A-Za-z0-9]+$")


def _label(value: str, what: str) -> str:
    if not _ENTITY.match(value):
        raise ValueError(f"{what} {value!r}: a BIDS entity label may hold letters and digits only")
    return value


def param_map_name(prefix: str, model: str, param: str) -> str:
    """``<prefix>_model-<model>_param-<param>_dwimap.nii.gz``."""
    return f"{prefix}_model-{_label(model, 'model')}_param-{_label(param, 'parameter')}_dwimap.nii.gz"


def sd_map_name(prefix: str, model: str, param: str) -> str:
    """``<prefix>_model-<model>_param-<param>_desc-sd_dwimap.nii.gz``: the SD of a parameter map."""
    return f"{prefix}_model-{_label(model, 'model')}_param-{_label(param, 'parameter')}_desc-sd_dwimap.nii.gz"


def status_map_name(prefix: str, model: str) -> str:
    return f"{prefix}_model-{_label(model, 'model')}_desc-status_dseg.nii.gz"


def noise_map_name(prefix: str) -> str:
    return f"{prefix}_desc-sigma_noisemap.nii.gz"


def chi_map_name(prefix: str) -> str:
    return f"{prefix}_Chimap.nii.gz"


def chi_sd_map_name(prefix: str) -> str:
    """``<prefix>_desc-sd_Chimap.nii.gz``: the standard deviation of a chi map."""
    return f"{prefix}_desc-sd_Chimap.nii.gz"


def sidecar_name(nifti_name: str) -> str:
    """The JSON sidecar of a NIfTI file name."""
    for suffix in (".nii.gz", ".nii"):
        if nifti_name.endswith(suffix):
            return nifti_name[: -len(suffix)] + ".json"
    raise ValueError(f"{nifti_name}: not a NIfTI file name")


def software() -> dict:
    import qmri_labels  # here, not at the top: the package's __init__ imports this wing

    return {"Name": "qmri_labels", "Version": qmri_labels.__version__}


def write_dataset_description(folder: Path, description: str = "Quantitative MRI parameter maps") -> Path:
    """``dataset_description.json`` of a derivatives folder."""
    return write_json(Path(folder) / "dataset_description.json", {
        "Name": description,
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [software()],
    })


def write_map(folder: Path, name: str, data: np.ndarray, affine, header, sidecar: Mapping, *, description: str,
              dtype=np.float32) -> list[str]:
    """One NIfTI map and its JSON sidecar (the software entry is added); returns both names."""
    save_nifti(Path(folder) / name, data, affine, header, description=description, dtype=dtype)
    json_name = sidecar_name(name)
    write_json(Path(folder) / json_name, {**sidecar, "Software": software()})
    return [name, json_name]


def write_parameter_maps(folder: Path, maps, prefix: str, affine, header, *, inputs: Mapping[str, str],
                         extra: Mapping | None = None) -> dict[str, str]:
    """Every parameter map of a :class:`qmri_labels.maps.Maps`, its status map and noise map.

    ``inputs`` maps an input's role to its SHA-256 (recorded in each sidecar). Returns
    ``{file name: what it holds}``.
    """
    outputs: dict[str, str] = {}
    common = {"Model": maps.model, "Estimator": maps.estimator, "InputChecksums": {k: v for k, v in inputs.items()
                                                                                  if v is not None},
              **(extra or {})}
    if maps.noise is not None:
        common["Noise"] = maps.noise
    for name in maps.param_names:
        file_name = param_map_name(prefix, maps.model, name)
        unit = maps.units[name]
        written = write_map(folder, file_name, maps[name], affine, header,
                            {**common, "Parameter": name, "Units": unit,
                             "Description": f"{name} map; 0 outside the mask, NaN where not estimated"},
                            description=f"qmri_labels {maps.model} {name} [{display_unit(unit)}]")
        outputs[written[0]] = f"{name} map ({display_unit(unit)}), float32; 0 outside the mask, NaN where not estimated"
        outputs[written[1]] = f"sidecar of {written[0]}"
        if maps.sd is not None:
            outputs.update(_write_sd_map(folder, maps, name, prefix, affine, header, common))
    status_name = status_map_name(prefix, maps.model)
    written = write_map(folder, status_name, maps.status, affine, header,
                        {**common, "Parameter": "status", "Units": "code",
                         "Levels": {str(k): v for k, v in STATUS_CODES.items()}},
                        description="qmri_labels fit status", dtype=np.uint8)
    outputs[written[0]] = "uint8 status code per voxel: " + "; ".join(f"{k} {v}" for k, v in STATUS_CODES.items())
    outputs[written[1]] = f"sidecar of {written[0]}"
    if maps.sigma_map is not None:
        noise_name = noise_map_name(prefix)
        written = write_map(folder, noise_name, maps.sigma_map, affine, header,
                            {**common, "Parameter": "sigma", "Units": "input intensity units",
                             "Description": "noise standard deviation used by the fit, per voxel"},
                            description="qmri_labels noise sigma")
        outputs[written[0]] = "noise standard deviation per voxel (input intensity units) used by the fit"
        outputs[written[1]] = f"sidecar of {written[0]}"
    return outputs


def _write_sd_map(folder: Path, maps, name: str, prefix: str, affine, header, common: Mapping) -> dict[str, str]:
    """The standard-deviation map of parameter ``name`` and its sidecar."""
    file_name = sd_map_name(prefix, maps.model, name)
    unit = maps.units[name]
    missing = {reason: n for reason, n in maps.sd_reason_counts(name).items() if reason != "reported"}
    if maps.sd_kind == "label":
        what = (f"spread of the {name} estimate around the network's training label, NOT an error bar against "
                "the true value (asked for with --sd-kind label)")
    else:
        what = f"standard deviation of the {name} estimate around the true value"
    written = write_map(folder, file_name, maps.sd_map(name), affine, header,
                        {**common, "Parameter": name, "Statistic": "standard deviation", "Units": unit,
                         "Method": maps.sd_method, "SDKind": maps.sd_kind or "truth",
                         "Description": f"{what}; 0 outside the mask, NaN where there is no number (see NaNReasons)",
                         "NaNReasons": missing},
                        description=f"qmri_labels {maps.model} sd({name}) [{display_unit(unit)}]")
    return {written[0]: f"standard deviation of {name} ({display_unit(unit)}), float32; 0 outside the mask, NaN where none "
                        "(reasons counted in the sidecar)",
            written[1]: f"sidecar of {written[0]}"}
