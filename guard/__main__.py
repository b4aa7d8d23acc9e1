"""``python -m guard`` runs the CLI."""

import sys

from guard.cli import main

sys.exit(main())
