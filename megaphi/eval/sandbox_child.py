"""The sandboxed side of megaphi.eval.sandbox: confines this process, then runs one untrusted program in it.

Started by sandbox.py as `python -S -s -B sandbox_child.py CONFIG_JSON` with a clean environment, the program's
source on stdin, its stdout/stderr going to a capped file, and a report file open as config["report_fd"]. Writes
there one JSON line naming the protections that took effect, then after the program "passed" or "failed: <why>".
Standard library only, and nothing imported from the program's working directory.

Order: namespaces (as root, or inside a new user namespace) -> fork (the program becomes pid 1 of its own pid
namespace, so everything it starts dies with it) -> mounts (the whole filesystem read-only, a private tmpfs as the
working directory) -> rlimits -> unprivileged uid -> in-process guard -> exec of the program.
"""

import ctypes
import json
import os
import resource
import signal
import sys

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
    os.chdir(config["cwd"])
    report["rlimits"] = _set_limits(config["limits"])
    if uid is not None:
        os.setgroups([])
        os.setgid(config["gid"])
        os.setuid(uid)
        report["uid"] = uid
    elif namespaces:
        _drop_capabilities()
        report["uid"] = f"unchanged ({os.getuid()}, not root), capabilities dropped"
    else:
        report["uid"] = f"unchanged ({os.getuid()}, not root)"


# Audit events that are refused outright, and the prefixes of whole families of them.
BLOCKED_EVENTS = {"os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "os.kill",
                  "os.killpg", "subprocess.Popen", "signal.pthread_kill", "resource.setrlimit", "resource.prlimit",
                  "sys.remote_exec", "os.chroot"}
BLOCKED_PREFIXES = ("socket.", "ctypes.", "_ctypes.", "winreg.")
# Audit events that change the filesystem, allowed inside the working directory only: event -> (positions of its
# path arguments, positions of its dir_fd arguments; a relative path with a dir_fd is refused).
PATH_EVENTS = {"os.remove": ((0,), (1,)), "os.rmdir": ((0,), (1,)), "os.rename": ((0, 1), (2, 3)),
               "os.link": ((0, 1), (2, 3)), "os.symlink": ((1,), (2,)), "os.mkdir": ((0,), (2,)),
               "os.chmod": ((0,), (2,)), "os.chown": ((0,), (3,)), "os.utime": ((0,), (3,)), "os.truncate": ((0,), ()),
               "os.chflags": ((0,), ()), "os.setxattr": ((0,), ()), "os.removexattr": ((0,), ()),
               "shutil.rmtree": ((0,), (1,))}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def install_guard(root):
    """Defense in depth: an audit hook (which the program cannot remove) refusing process creation, signals,
    sockets, ctypes and any write, delete or rename outside root; plus setsid/setpgid, whose escape from the
    process group has no audit event. The OS-level limits stay the real barrier."""
    realpath, fsdecode, sep = os.path.realpath, os.fsdecode, os.sep
    root = realpath(root)

    def refuse(what):
        raise PermissionError(f"sandbox: {what} is not allowed")

    def check_path(event, path):
        if isinstance(path, int):
            return  # an already open file descriptor
        full = realpath(fsdecode(path))
        if full != root and not full.startswith(root + sep):
            refuse(f"{event} outside the working directory ({full})")

    def hook(event, args):
        if event in BLOCKED_EVENTS or event.startswith(BLOCKED_PREFIXES):
            refuse(event)
        if event == "import" and args[0].partition(".")[0] in ("ctypes", "_ctypes"):
            refuse("importing ctypes")
        if event == "open":
            path, mode, flags = args
            if (mode is not None and any(c in mode for c in "wax+")) or (flags or 0) & WRITE_FLAGS:
                check_path("writing", path)
        elif event in PATH_EVENTS:
            paths, dir_fds = PATH_EVENTS[event]
            if any(i < len(args) and args[i] is not None and args[i] >= 0 for i in dir_fds):
                refuse(f"{event} with dir_fd")
            for i in paths:
                check_path(event, args[i])

    sys.addaudithook(hook)
    for name in ("setsid", "setpgid", "setpgrp"):
        setattr(os, name, lambda *a, _name=name: refuse(f"os.{_name}"))


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
