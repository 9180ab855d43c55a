"""`python -m jointrank …`: the same command line as the `jointrank` script (for environments without it on PATH)."""

import sys

from .cli import main

sys.exit(main())
