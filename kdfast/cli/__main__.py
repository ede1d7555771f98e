"""`python -m kdfast.cli ...`: the kdfast command."""

import sys

from . import main

sys.exit(main())
