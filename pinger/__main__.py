"""`python -m pinger -c FILE`: the pinger daemon in the foreground (see pinger.daemon)."""

import sys

from pinger.run import cli

sys.exit(cli())
