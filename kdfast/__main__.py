"""`python -m kdfast ...`: the kdfast command."""

import sys

from .cli import main

sys.exit(main())
