"""``python -m diffmodel``: the command line (see :mod:`diffmodel._cli`)."""

import sys

from ._app._cli import main

if __name__ == "__main__":
    sys.exit(main())
