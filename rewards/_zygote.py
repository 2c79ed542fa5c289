"""Entry point of the worker zygote (see :mod:`rewards.pool`).

``python -m rewards._zygote CTL_FD MODULE:FUNCTION MEMORY_MB``; a module of its own so that running
it does not re-execute ``rewards.pool``, which the package has already imported.
"""
import sys

from rewards.pool import zygote_main

if __name__ == "__main__":
    zygote_main(int(sys.argv[1]), sys.argv[2], int(sys.argv[3]))
