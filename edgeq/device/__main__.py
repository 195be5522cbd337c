"""`python -m edgeq.device BUNDLE`: see edgeq.device.cli."""

import sys

from edgeq.device.cli import main

sys.exit(main())
