"""Throughput of bulk prediction against NumPy, XGBoost and the memory-bandwidth bound.

The benchmark lives in the package (``diffmodel._app._bench``) so that an installed
``diffmodel bench`` runs it too; this script is its command line:

    python experiments/throughput.py [--n-steps N] [--repeats R] [--json PATH]
        [--markdown PATH]
"""

from diffmodel._app._bench import _cli, main

__all__ = ["main"]

if __name__ == "__main__":
    _cli()
