"""What the curation tools share: their data flags, one way to stop (SIGTERM unwinds) and to fail (one line, exit 1)."""

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


def add_stage_args(parser, required: bool = True):
    """The flags of a filter stage: --input/--output/--report, text key, folders, workers, resumption, quiet."""
    g = parser.add_argument_group("data")
    g.add_argument("--input", nargs="+", required=required, default=[],
                   help="jsonl / .jsonl.gz / parquet files, globs or source folders")
    g.add_argument("--output", required=required, help="kept records (.jsonl or .parquet), every field kept")
    g.add_argument("--report", default=None, help="jsonl: one line per removed record, its reason and evidence")
    g.add_argument("--keep-dropped", action="store_true", help="put each removed record whole into the report")
    g.add_argument("--text-key", default="text", help="the field holding the text")
    g.add_argument("--extensions", nargs="+", default=None, help="source files to take from folders (e.g. .py)")
    g.add_argument("--workers", type=int, default=1, help="processes (per rank under mpiexec)")
    g.add_argument("--chunk-bytes", type=int, default=4 << 20, help="input bytes per work item")
    g.add_argument("--no-resume", action="store_true", help="start over instead of reusing finished work")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    return g
