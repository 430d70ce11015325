"""`python -m streamer` is the `coverwatch` command."""

import sys

from streamer.cli import main

sys.exit(main())
