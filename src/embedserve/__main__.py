"""`python -m embedserve` is the `embedserve` command."""

import sys

from embedserve.cli import main

sys.exit(main())
