"""`python -m coverwatch` is the `coverwatch` command."""

import sys

from coverwatch.cli import main

sys.exit(main())
