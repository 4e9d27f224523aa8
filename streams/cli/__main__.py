"""`python -m streams.cli`: the `lsti` command."""

import sys

from streams.cli.main import main

sys.exit(main())
