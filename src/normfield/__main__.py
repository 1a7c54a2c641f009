"""``python -m normfield``: the ``normfield`` command line (see `normfield.cli`)."""

import sys

from normfield.cli import main

if __name__ == "__main__":
    sys.exit(main())
