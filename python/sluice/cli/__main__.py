"""`python -m sluice.cli`: the same as the `sluice` script."""

import sys

from sluice.cli import main

sys.exit(main())
