"""agent/main.py on a host whose wall clock is off by TETHER_TEST_CLOCK_SKEW seconds, as
faketime would run it: `time.time()` (what the agent signs with, and stamps its journal and
reports with) is shifted; monotonic clocks are not. Standard library only, no agent change."""

import os
import runpy
import sys
import time
from pathlib import Path

AGENT = str(Path(__file__).resolve().parents[2] / "agent" / "main.py")
SKEW = float(os.environ["TETHER_TEST_CLOCK_SKEW"])
_real_time = time.time
time.time = lambda: _real_time() + SKEW

sys.argv[0] = AGENT
runpy.run_path(AGENT, run_name="__main__")
