"""``python -m guard.models build DIR``."""

import sys

from guard.models.cli import main

sys.exit(main())
