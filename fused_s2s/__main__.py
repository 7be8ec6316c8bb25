"""``python -m fused_s2s ...`` is the ``fused-s2s`` command."""
import sys

from fused_s2s.cli import main

if __name__ == "__main__":
    sys.exit(main())
