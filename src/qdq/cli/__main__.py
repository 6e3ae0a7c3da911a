"""`python -m qdq.cli`: the `qdq` command."""

import sys

from qdq.cli import main

sys.exit(main())
