"""`python -m vlmtune ...` == `vlmtune ...`."""

import sys

from vlmtune.cli import main

sys.exit(main())
