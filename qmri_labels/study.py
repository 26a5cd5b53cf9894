"""``python -m qmri_labels.study``: the study command, kept runnable under its old module name.

The command itself lives in :mod:`qmri_labels.cli.study` (console script ``qmri-study``).
"""

import sys

from qmri_labels.cli.study import main

if __name__ == "__main__":
    sys.exit(main())
