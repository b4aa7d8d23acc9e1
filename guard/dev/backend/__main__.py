"""``python -m guard.dev.backend --model NAME=BASE_PATH ...``."""

import sys

from guard.dev.backend.cli import main

sys.exit(main())
