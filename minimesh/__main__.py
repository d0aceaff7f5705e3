"""`python -m minimesh`: the same entry point as the `minimesh` command."""

import sys

from minimesh.cli import main

sys.exit(main())
