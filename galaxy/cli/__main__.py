"""`python -m galaxy.cli`: the `galaxy` command (how local workers are spawned).

Once the command has returned, the process ends without the interpreter's finalization: tearing down
torch's modules took ~0.45 s of CPU per process (an import and exit: 1.98 s against 1.52 s, medians of
7), paid by every `galaxy` run after its work was done and by whoever waits for it. The atexit handlers
(logging's flush, temporary directories' clean-up) still run, and the output is flushed; an exception
(argparse's exit, -v's traceback) ends the process the ordinary way."""

import atexit
import os
import sys

from . import main

code = main()
atexit._run_exitfuncs()
for stream in (sys.stdout, sys.stderr):
    try:
        stream.flush()
    except (OSError, ValueError):  # a closed pipe, or closed by main (BrokenPipeError)
        pass
os._exit(code if isinstance(code, int) else 1)
