"""What the curation tools share: one way to stop (SIGTERM unwinds) and to fail (one line, exit status 1)."""

import signal
import sys

from megaphi.curate.stage import mpi_world


def run_tool(fn, args) -> int:
    """fn(args) -> exit status: 0, or 1 with "error: ..." on stderr for bad input or a failed worker."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind, so temporary files are removed
    try:
        fn(args)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        comm = mpi_world()[2]
        if comm is not None:
            comm.Abort(1)  # the other ranks would wait in a barrier
        return 1
    return 0
