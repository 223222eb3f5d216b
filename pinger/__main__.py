"""`python -m pinger -c FILE`: the pinger daemon in the foreground (see pinger.daemon)."""

import sys

from pinger.daemon import cli

sys.exit(cli())
