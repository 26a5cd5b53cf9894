"""``python -m qmri_labels.fit``: the mapping command, kept runnable under its old module name.

The command itself lives in :mod:`qmri_labels.cli.fit` (console script ``qmri-fit``).
"""

import sys

from qmri_labels.cli.fit import main

if __name__ == "__main__":
    sys.exit(main())
