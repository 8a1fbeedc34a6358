import sys

from metaldefect.cli import main

sys.exit(main())
