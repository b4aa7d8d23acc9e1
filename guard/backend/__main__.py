"""``python -m guard.backend --model NAME=BASE_PATH ...``."""

import sys

from guard.backend.cli import main

sys.exit(main())
