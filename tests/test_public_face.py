"""`import qmri_labels` is the front door: every advertised name resolves, and importing the
package alone stays light (no torch) so that `--version` and `--help` are quick."""

import subprocess
import sys

import pytest

import qmri_labels


@pytest.mark.parametrize("name", [n for n in qmri_labels.__all__ if n != "__version__"])
def test_every_public_name_resolves(name):
    value = getattr(qmri_labels, name)
    assert value is not None and name in dir(qmri_labels)


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'fit_everything'"):
        qmri_labels.fit_everything


def test_importing_the_package_does_not_import_torch():
    code = "import sys, qmri_labels; print(qmri_labels.__version__, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == [qmri_labels.__version__, "False"]


def test_the_notebook_names_are_the_estimators_themselves():
    from qmri_labels.estimators import MLEEstimator, NetworkEstimator
    from qmri_labels.maps import fit_volume

    assert qmri_labels.MLEEstimator is MLEEstimator and qmri_labels.NetworkEstimator is NetworkEstimator
    assert qmri_labels.fit_volume is fit_volume
