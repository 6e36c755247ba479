"""The sandboxed side of megaphi.eval.sandbox: confines this process, then runs one untrusted program in it.

Started by sandbox.py as `python -S -s -B sandbox_child.py CONFIG_JSON` with a clean environment, the program's
source on stdin, its stdout/stderr going to a capped file, and a report file open as config["report_fd"]. Writes
there one JSON line naming the protections that took effect, then after the program "passed" or "failed: <why>".
Standard library only, and nothing imported from the program's working directory.

Order: namespaces (as root, or inside a new user namespace) -> fork (the program becomes pid 1 of its own pid
namespace, so everything it starts dies with it) -> mounts (the whole filesystem read-only, a private tmpfs as the
working directory) -> rlimits -> unprivileged uid -> in-process guard -> exec of the program.
"""

import _posixsubprocess
import _signal
import ctypes
import json
import os
import posix
import resource
import signal
import sys
import types
from stat import S_ISDIR

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_BIND, MS_REC, MS_PRIVATE = 0x2, 0x4, 0x1000, 0x4000, 0x40000
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID = 0x1, 0x2
AT_FDCWD, AT_RECURSIVE, SYS_MOUNT_SETATTR = -100, 0x8000, 442  # 442 on every architecture since Linux 5.12
PR_SET_PDEATHSIG = 1

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result, what):
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _mount(source, target, fstype, flags, data=None):
    enc = [None if s is None else os.fsencode(s) for s in (source, target, fstype, data)]
    _check(_libc.mount(enc[0], enc[1], enc[2], ctypes.c_ulong(flags), enc[3]), f"mount {target}")


def _set_mount_attr(path, attr_set, attr_clr, recursive):
    attr = (ctypes.c_uint64 * 4)(attr_set, attr_clr, 0, 0)  # struct mount_attr
    flags = AT_RECURSIVE if recursive else 0
    _check(_libc.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, os.fsencode(path), flags, ctypes.byref(attr),
                         ctypes.sizeof(attr)), f"mount_setattr {path}")


def _unshare(as_root):
    """New network, pid, mount, IPC and UTS namespaces; as non-root inside a new user namespace."""
    flags = CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS
    uid, gid = os.getuid(), os.getgid()
    if not as_root:
        flags |= CLONE_NEWUSER
    _check(_libc.unshare(flags), "unshare")
    if not as_root:  # map our own ids so files stay ours; the capabilities it brings are dropped later
        for name, text in (("uid_map", f"{uid} {uid} 1"), ("setgroups", "deny"), ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)


def _blocked_ancestor(path):
    """The highest ancestor of path that other users cannot search, or None."""
    parts = os.path.abspath(path).split(os.sep)[1:]
    for i in range(1, len(parts)):
        ancestor = os.sep + os.sep.join(parts[:i])
        if not os.stat(ancestor).st_mode & 0o001:
            return ancestor
    return None


def _expose_python(paths):
    """Makes the interpreter's import paths readable after the uid drop when they sit under a private folder
    (a pyenv in /root): that folder is covered by a tmpfs holding only bind mounts of those paths."""
    paths = sorted({os.path.realpath(p) for p in paths if os.path.isdir(p)})
    paths = [p for p in paths if not any(p.startswith(q + os.sep) for q in paths)]
    hidden = {}
    for path in paths:
        ancestor = _blocked_ancestor(path)
        if ancestor is not None:
            hidden.setdefault(ancestor, []).append((path, os.open(path, os.O_PATH)))
    for ancestor, entries in hidden.items():
        _mount("tmpfs", ancestor, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
        for path, fd in entries:
            os.makedirs(path, mode=0o755, exist_ok=True)
            _mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
            os.close(fd)
    return sorted(hidden)


def _confine_filesystem(cwd, uid, gid, disk_mb):
    """Everything read-only and nosuid, the working directory a private size-capped tmpfs."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing done here propagates back to the host
    exposed = _expose_python(sys.path) if uid is not None else []
    _set_mount_attr("/", MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID, 0, recursive=True)
    owner = f",uid={uid},gid={gid}" if uid is not None else ""
    _mount("tmpfs", cwd, "tmpfs", MS_NOSUID | MS_NODEV, f"size={disk_mb}m,mode=0700{owner}")
    note = f"; private folders opened for the interpreter: {', '.join(exposed)}" if exposed else ""
    return f"read-only except cwd (tmpfs, {disk_mb} MiB){note}"


def _set_limits(limits):
    applied = {}
    for name, key in (("cpu", "RLIMIT_CPU"), ("memory", "RLIMIT_AS"), ("file_size", "RLIMIT_FSIZE"),
                      ("processes", "RLIMIT_NPROC"), ("open_files", "RLIMIT_NOFILE"), ("core", "RLIMIT_CORE")):
        value = limits.get(name)
        if value is None:
            continue
        soft, hard = (value, value + 1) if name == "cpu" else (value, value)  # SIGXCPU first, then SIGKILL
        resource.setrlimit(getattr(resource, key), (soft, hard))
        applied[name] = value
    return applied


def _drop_capabilities():
    """Clears every capability (used inside a user namespace, where we keep our uid)."""

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    data = (ctypes.c_uint32 * 6)()  # two cap_user_data_t: effective, permitted, inheritable
    _check(_libc.capset(ctypes.byref(Header(0x20080522, 0)), data), "capset")


def confine(config, report):
    """Applies every protection it can; records each in report (value, or 'unavailable: why')."""
    as_root = os.geteuid() == 0
    uid = config["uid"] if as_root else None
    try:
        _unshare(as_root)
        namespaces = True
        report["namespaces"] = "network (no interfaces up), pid, mount, ipc, uts"
    except OSError as e:
        namespaces = False
        report["namespaces"] = f"unavailable: {e}"
    if namespaces:
        child = os.fork()
        if child:  # stays outside the pid namespace; when it is killed, the kernel kills the program too
            _, status = os.waitpid(child, 0)
            code = os.waitstatus_to_exitcode(status)
            os._exit(128 - code if code < 0 else code)
        _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL), "prctl")
        try:
            report["filesystem"] = _confine_filesystem(config["cwd"], uid, config["gid"], config["disk_mb"])
        except OSError as e:
            report["filesystem"] = f"unavailable: {e}"
    else:
        report["filesystem"] = "unavailable: no mount namespace"
    note = ""
    if uid is not None and not report["filesystem"].startswith("read-only"):
        # Without the mount namespace nothing opens a private folder holding the interpreter (a pyenv in /root)
        # to another uid, whose imports would then fail: every score would be wrong. Keep our uid instead.
        hidden = sorted({a for a in (_blocked_ancestor(p) for p in sys.path if os.path.isdir(p)) if a})
        if hidden:
            uid, note = None, f"; {', '.join(hidden)} holds the interpreter and is private to this uid"
    os.chdir(config["cwd"])
    report["rlimits"] = _set_limits(config["limits"])
    if uid is not None:
        os.setgroups([])
        os.setgid(config["gid"])
        os.setuid(uid)
        report["uid"] = uid
    else:
        who = f"unchanged ({os.getuid()}, {'root' if as_root else 'not root'})"
        if namespaces:
            _drop_capabilities()
            who += ", capabilities dropped"
        report["uid"] = who + note


# Audit events that are refused outright, and the prefixes of whole families of them. chdir is refused so that
# relative paths always start at the working directory, symlinks so that no path inside it leads outside, and gc's
# object walks so that the program cannot reach the guard's own objects.
BLOCKED_EVENTS = frozenset({
    "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "os.kill", "os.killpg",
    "subprocess.Popen", "signal.pthread_kill", "resource.setrlimit", "resource.prlimit", "sys.remote_exec",
    "os.chroot", "os.chdir", "os.symlink", "gc.get_objects", "gc.get_referrers", "gc.get_referents"})
BLOCKED_PREFIXES = ("socket.", "ctypes.", "_ctypes.", "winreg.")
# Functions that raise no audit event yet leave the process group, signal another process, start a program or
# create files: replaced by refusals. Their modules may not be loaded afresh (which would bring them back).
UNAUDITED = {"posix": ("setsid", "setpgid", "setpgrp", "pidfd_open", "mkfifo", "mknod"),
             "os": ("setsid", "setpgid", "setpgrp", "pidfd_open", "mkfifo", "mknod"),
             "_signal": ("pidfd_send_signal",), "signal": ("pidfd_send_signal",), "_posixsubprocess": ("fork_exec",)}
PROTECTED_MODULES = frozenset({"ctypes", "_ctypes", "posix", "_signal", "_posixsubprocess"})
# Audit events that change the filesystem, allowed inside the working directory only:
# event -> ((position of a path argument, position of its dir_fd argument or None), ...).
PATH_EVENTS = types.MappingProxyType({
    "os.remove": ((0, 1),), "os.rmdir": ((0, 1),), "os.rename": ((0, 2), (1, 3)), "os.link": ((0, 2), (1, 3)),
    "os.mkdir": ((0, 2),), "os.chmod": ((0, 2),), "os.chown": ((0, 3),), "os.utime": ((0, 3),),
    "os.truncate": ((0, None),), "os.chflags": ((0, None),), "os.setxattr": ((0, None),),
    "os.removexattr": ((0, None),), "shutil.rmtree": ((0, 1),), "sqlite3.connect": ((0, None),)})
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


# The guard's functions keep everything they use in default arguments, bound when the guard is installed: the
# program can rebind module globals and builtins (isinstance, os.path.realpath, ...), not these. Paths are
# resolved by their text alone (no symlink can exist under the working directory) with unbound str methods, so a
# str subclass cannot lie about its value.
def _resolve(path, dir_fd, root, *, int_=int, str_=str, bytes_=bytes, isinstance_=isinstance, join="/".join,
             split=str.split, startswith=str.startswith, decode=bytes.decode, readlink=os.readlink,
             fd_text=int.__repr__):
    """The absolute path, '..' folded in, that path (str, bytes or an open descriptor) names; None for others."""
    if isinstance_(path, int_):
        path = readlink("/proc/self/fd/" + fd_text(path))
    elif isinstance_(path, bytes_):
        path = decode(path, "utf-8", "surrogateescape")
    elif not isinstance_(path, str_):
        return None  # a path object could name one file to the check and another to the call
    if not startswith(path, "/"):
        base = root if dir_fd is None or dir_fd < 0 else readlink("/proc/self/fd/" + fd_text(dir_fd))
        path = join((base, path))
    parts = []
    for part in split(path, "/"):
        if part == "..":
            if parts:
                parts.pop()
        elif part and part != ".":
            parts.append(part)
    return "/" + join(parts)


def _refusal(name):
    def refused(*args, **kwargs):
        raise PermissionError(f"sandbox: {name} is not allowed")
    return refused


def install_guard(root):
    """Defense in depth: an audit hook (which the program cannot remove) refusing process creation, signals,
    sockets, ctypes, chdir, symlinks and any write, delete or rename outside root; plus refusals in place of the
    functions that have no audit event (UNAUDITED). The OS-level limits stay the real barrier: a program that
    knows CPython's internals well (e.g. _imp.create_dynamic) can still rebuild what is removed here."""
    modules = {"posix": posix, "os": os, "_signal": _signal, "signal": signal, "_posixsubprocess": _posixsubprocess}
    for module, names in UNAUDITED.items():
        for name in names:
            if hasattr(modules[module], name):
                setattr(modules[module], name, _refusal(f"{module}.{name}"))

    def hook(event, args, *, root=os.path.realpath(root), blocked=BLOCKED_EVENTS, prefixes=BLOCKED_PREFIXES,
             protected=PROTECTED_MODULES, path_events=PATH_EVENTS, write_flags=WRITE_FLAGS, resolve=_resolve,
             error=PermissionError, startswith=str.startswith, partition=str.partition, exact=str.__str__,
             stat=os.stat, is_dir=S_ISDIR, isinstance_=isinstance, len_=len, type_=type, int_=int,
             import_error=ImportError):
        if event in blocked or startswith(event, prefixes):
            raise error(f"sandbox: {event} is not allowed")
        if event == "import":
            name = partition(exact(args[0]), ".")[0]
            if name in protected:  # an ImportError, which code that can do without the module expects
                raise import_error(f"sandbox: importing {name} is not allowed", name=name)
        elif event in ("object.__setattr__", "object.__getattr__"):
            if args[0] is resolve:
                raise error("sandbox: the guard's functions are not open to change")
        elif event == "open":
            path, mode, flags = args
            writes = (mode is not None and ("w" in mode or "a" in mode or "x" in mode or "+" in mode)) or \
                (flags or 0) & write_flags
            if isinstance_(path, int_) or not writes and mode is not None:
                return  # an open descriptor wrapped, or a file opened for reading
            full = resolve(path, None, root)
            if full is None:
                raise error(f"sandbox: opening through a {type_(path).__name__} path; pass a str")
            inside = full == root or startswith(full, root + "/")
            if writes and not inside:
                raise error(f"sandbox: writing outside the working directory ({full}) is not allowed")
            # os.open's dir_fd is not in the event: a descriptor of an outside folder would let it write there.
            if not inside and is_dir(stat(path).st_mode):
                raise error(f"sandbox: opening a folder outside the working directory ({full}) is not allowed")
        elif event in path_events:
            for i, fd_at in path_events[event]:
                if i >= len_(args):
                    continue
                full = resolve(args[i], None if fd_at is None or fd_at >= len_(args) else args[fd_at], root)
                if full is None:
                    raise error(f"sandbox: {event} through a {type_(args[i]).__name__} path; pass a str")
                if event == "sqlite3.connect" and startswith(full, root + "/file:"):
                    raise error("sandbox: sqlite3.connect with a file: URI is not allowed")
                if full != root and not startswith(full, root + "/"):
                    raise error(f"sandbox: {event} outside the working directory ({full}) is not allowed")

    sys.addaudithook(hook)


def _forget_ctypes():
    """Drops this module's libc handle and ctypes itself, so the program finds no ready-made foreign functions
    (calls through them raise no audit event; the import hook keeps ctypes from coming back)."""
    global ctypes, _libc
    ctypes = _libc = None
    for name in list(sys.modules):
        if name in ("ctypes", "_ctypes") or name.startswith("ctypes."):
            del sys.modules[name]


def main():
    config = json.loads(sys.argv[1])
    sys.path.extend(config["site_packages"])  # without their .pth files (-S)
    source = sys.stdin.buffer.read().decode("utf-8", errors="replace")
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    report = {}
    confine(config, report)
    _forget_ctypes()
    if config["guard"]:
        install_guard(os.getcwd())
        report["guard"] = "audit hook"
    else:
        report["guard"] = "off"
    write, getpid, exit_now = os.write, os.getpid, os._exit  # the program may replace os's attributes
    fd = config["report_fd"]
    write(fd, (json.dumps(report) + "\n").encode())
    me = getpid()
    sys.argv = ["<program>"]
    try:
        exec(compile(source, "<program>", "exec"), {"__name__": "__sandbox__"})
        outcome = "passed"
    except BaseException as e:  # noqa: SystemExit and KeyboardInterrupt fail the program too
        outcome = f"failed: {type(e).__name__}"
        try:
            detail = " ".join(str(e).split())[:200]
            outcome += f": {detail}" if detail else ""
        except BaseException:  # noqa: the program's own __str__ may raise
            pass
    if getpid() == me:  # a process the program forked does not get to report
        write(fd, (outcome + "\n").encode())
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # noqa
            pass
    exit_now(0)


if __name__ == "__main__":
    if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
        sys.path.pop(0)  # like -P: the program must not import this package's files by accident
    main()
