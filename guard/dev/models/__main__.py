"""``python -m guard.dev.models build DIR``."""

import sys

from guard.dev.models.cli import main

sys.exit(main())
