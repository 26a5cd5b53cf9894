"""What a QSM network takes as input, recorded in its bundle, and the check that refuses a
network given another kind of field than it was trained on.

A network trained on masked local fields has never seen the errors that a background-field
removal (BFR) method leaves, and one trained after V-SHARP has never seen a true local field:
its accuracy on the other kind is unknown (see docs/performance.md, QSM), so the fit command
refuses the combination unless told (``--allow-input-mismatch``).
"""

from __future__ import annotations

from typing import Any, Mapping

from qmri_labels.data.qsm import FIELD_KINDS

__all__ = ["INPUT_KINDS", "input_kind_of", "check_input_kind"]

#: what a network was trained on (recorded in its bundle): the phantom field kinds, or a
#: local field after a background-field removal method, ``"bfr:<method>"``
INPUT_KINDS = FIELD_KINDS


def input_kind_of(train_spec: Mapping[str, Any] | None) -> str:
    """What a network trained on data of this spec takes as input: ``"bfr:<method>"`` when the
    data went through a background-field removal step, else the phantoms' ``field_kind``."""
    spec = dict(train_spec or {})
    bfr = spec.get("bfr")
    if bfr:
        return f"bfr:{bfr['method'] if isinstance(bfr, Mapping) else bfr}"
    return str(spec.get("field_kind", "local_unmasked"))


def check_input_kind(manifest: Mapping[str, Any], given_kind: str, force: bool = False) -> str:
    """Refuse a QSM network whose training input differs from the field it is about to get.

    Parameters
    ----------
    manifest : mapping
        A QSM bundle's manifest (``QSMEstimator.load(path).manifest_``); its ``input_kind`` is
        what the network was trained on: ``"local"`` (masked local field), ``"local_unmasked"``,
        ``"total"`` or ``"bfr:<method>"`` (local field after that background-field removal).
        Bundles written before the kind was recorded were trained on unmasked local fields.
    given_kind : str
        What the caller has: ``"local"`` for a local field map (zero outside the mask),
        ``"bfr:<method>"`` after removing the background with ``<method>``, ...
    force : bool
        Return instead of raising (the caller takes the responsibility).

    Returns
    -------
    The network's training input kind. ValueError (naming both kinds) on a mismatch unless
    ``force``. A network trained on masked local fields accepts a BFR result (a masked local
    field as well) and vice versa only with ``force``: their errors differ.
    """
    trained = str(manifest.get("input_kind", "local_unmasked"))
    given = str(given_kind)
    valid = set(INPUT_KINDS) | {k for k in (trained, given) if k.startswith("bfr:")}
    for name, kind in (("given_kind", given), ("network input_kind", trained)):
        if kind not in valid:
            raise ValueError(f"{name} {kind!r} is not one of {sorted(INPUT_KINDS)} or 'bfr:<method>'")
    if trained != given and not force:
        raise ValueError(
            f"this QSM network was trained on {trained!r} fields but is given {given!r}; its accuracy on other "
            f"inputs is unknown (pass force=True to use it anyway)")
    return trained
