"""The shipped IVIM networks: a label study's verified bundles copied into ``models/`` under the
names they ship with."""

from __future__ import annotations

import shutil
from pathlib import Path

from qmri_labels import paths
from qmri_labels.estimators.bundle import verify_bundle
from qmri_labels.estimators.shipped import MODEL_CARD, model_card
from qmri_labels.fileio import atomic_dir


def shipped_name(method: str, prefix: str = "ivim_epstein_snr30_") -> str:
    """Folder name of a shipped network: ``net-hybrid-0.5`` -> ``ivim_epstein_snr30_hybrid0.5``."""
    label = method.removeprefix("net-")
    if label.startswith("hybrid-"):
        label = "hybrid" + label.removeprefix("hybrid-")
    return prefix + label


def export_networks(run_dir: str | Path, dest: str | Path | None = None, prefix: str = "ivim_epstein_snr30_",
                    methods=None) -> list[Path]:
    """Copy the verified network bundles of a study run into ``dest``, each with its model card
    (``MODEL_CARD.md``, made from its manifest).

    This is how the shipped networks were made::

        python -m qmri_labels.study --alpha 0.5 --out runs/shipped
        python -c "from qmri_labels.workflows.ivim_models import export_networks; export_networks('runs/shipped')"

    Parameters
    ----------
    run_dir : path
        A label study's results folder (its ``networks/net-*`` bundles).
    dest : path or None
        Where they go (None: the package's ``models/``).
    prefix : str
        Prefix of the shipped names (:func:`shipped_name`).
    methods : sequence of str or None
        Only these bundles (None: every ``net-*``).

    Returns
    -------
    list of Path
        The folders written.
    """
    run_dir = Path(run_dir)
    dest = Path(dest) if dest is not None else paths.models_dir()
    sources = sorted((run_dir / "networks").glob("net-*"))
    if methods is not None:
        sources = [s for s in sources if s.name in set(methods)]
    if not sources:
        raise ValueError(f"{run_dir} holds no networks/net-* bundles")
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for source in sources:
        verify_bundle(source)  # never ship a bundle that does not verify
        target = dest / shipped_name(source.name, prefix)
        # the shipped folder is the complete old bundle or the complete new one, never half
        with atomic_dir(target, overwrite=True) as staging:
            shutil.copytree(source, staging, dirs_exist_ok=True)
            (staging / MODEL_CARD).write_text(model_card(staging, name=target.name), encoding="utf-8")
        written.append(target)
    return written
