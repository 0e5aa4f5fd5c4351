"""``python -m srm_ext``: see :mod:`srm_ext.cli`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
