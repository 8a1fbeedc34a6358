"""``python -m metaldefect.cli`` (as ``torchrun ... -m metaldefect.cli train ...`` launches it)."""
import sys

from metaldefect.cli import main

sys.exit(main())
