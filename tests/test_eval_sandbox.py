"""The sandbox: each attack a completion could make fails that program and harms nothing else.

Attacks run twice where it matters: with the in-process guard, and without it (guard=False) to show that the OS
layer (namespaces, read-only filesystem, unprivileged uid, rlimits) stops them on its own. A guard-off case is
skipped only when this machine does not allow the OS protection it exercises (the report says which).
"""

import json
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from megaphi.eval.sandbox import CHILD, OUTPUT_TAIL, Limits, probe_protections, run_program, run_programs

FAST = Limits(timeout=2.0)


@pytest.fixture(scope="module")
def protections():
    report = probe_protections()
    print("sandbox protections:", report)
    return report


def os_layer(protections, what):
    """Skips a guard-off case when the OS protection it relies on is not available here."""
    active = {  # a uid of its own alone does not keep a program out of world-writable folders such as /tmp
        "filesystem": str(protections.get("filesystem", "")).startswith("read-only"),
        "namespaces": not str(protections.get("namespaces", "unavailable")).startswith("unavailable"),
        "processes": isinstance(protections.get("uid"), int)
        or not str(protections.get("namespaces", "unavailable")).startswith("unavailable"),
    }[what]
    if not active:
        pytest.skip(f"the OS-level {what} protection is unavailable on this machine: {protections}")


def leftovers(cwd: str) -> list[int]:
    """Processes still running from the sandbox run whose working directory was cwd (its config names it)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().decode(errors="replace")
        except OSError:
            continue
        if CHILD in cmdline and cwd in cmdline:
            pids.append(int(pid))
    return pids


@pytest.fixture
def open_dir():
    """A world-writable folder outside the sandbox (unlike pytest's tmp_path, which other uids cannot enter)."""
    path = tempfile.mkdtemp(prefix="megaphi-victim-")
    os.chmod(path, 0o777)
    victim = os.path.join(path, "victim.txt")
    with open(victim, "w") as f:
        f.write("precious")
    os.chmod(victim, 0o666)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_programs_pass_only_when_they_run_to_the_end():
    assert run_program("x = 1\nassert x == 1").result == "passed"
    assert run_program("assert 1 == 2, 'wrong'").result == "failed: AssertionError: wrong"
    assert run_program("def f(:\n  pass").result.startswith("failed: SyntaxError")
    assert run_program("import sys\nsys.exit(0)").result.startswith("failed: SystemExit")
    assert run_program("input()").result.startswith("failed: EOFError")
    early = run_program("import os\nos._exit(0)\nassert False", guard=False)
    assert early.result == "failed: exited with code 0 before the tests finished"


def test_protections_are_reported(protections):
    assert {"namespaces", "filesystem", "rlimits", "uid", "guard"} <= set(protections)
    assert protections["guard"] == "audit hook"
    assert protections["rlimits"]["processes"] == Limits().processes
    if os.geteuid() == 0 and "holds the interpreter" not in str(protections["uid"]):  # else imports would fail
        assert isinstance(protections["uid"], int) and protections["uid"] != 0


def test_working_directory_is_fresh_private_and_deleted():
    source = "import os\nprint(os.getcwd())\nassert os.listdir('.') == []\nopen('scratch.txt', 'w').write('x')"
    result = run_program(source)
    assert result.passed, result
    cwd = result.output.strip()
    assert not os.path.exists(cwd)
    assert not os.path.exists(os.path.dirname(cwd))


def test_folders_the_program_locks_are_deleted_too():
    source = ("import os\nprint(os.getcwd())\nos.makedirs('a/b')\nopen('a/b/f', 'w').write('x')\n"
              "os.chmod('a/b', 0)\nos.chmod('a', 0)\nos.chmod('.', 0)")
    result = run_program(source)
    assert result.passed, result
    assert not os.path.exists(os.path.dirname(result.output.strip()))


def test_infinite_loop_times_out_and_is_killed():
    start = time.monotonic()
    result = run_program("import os\nprint(os.getcwd(), flush=True)\nwhile True:\n    pass", FAST)
    assert result.result == "timed out"
    assert time.monotonic() - start < FAST.timeout + 3
    assert leftovers(result.output.strip()) == []


@pytest.mark.parametrize("guard", [True, False])
def test_fork_bomb_is_contained(protections, guard):
    if not guard:
        os_layer(protections, "processes")
    source = ("import os, time\nprint(os.getcwd(), flush=True)\nforks = 0\ntry:\n    while True:\n"
              "        if os.fork() == 0:\n            time.sleep(60)\n            os._exit(0)\n        forks += 1\n"
              "finally:\n    print('forks', forks, flush=True)")
    result = run_program(source, FAST, guard=guard)
    assert not result.passed
    cwd, forks = result.output.split("\n")[:2]
    if guard:
        assert "PermissionError" in result.result and forks == "forks 0"
    else:
        assert "BlockingIOError" in result.result  # RLIMIT_NPROC: the program's uid may have `processes` tasks
        assert int(forks.split()[1]) < Limits().processes
    assert leftovers(cwd) == []  # every sleeping child died with the program
    assert run_program("assert sum(range(10)) == 45").passed


def test_memory_bomb_fails_with_memory_error():
    limits = Limits(timeout=10, memory_mb=256)
    assert run_program("b = bytearray(1 << 30)", limits).result == "failed: MemoryError"
    grow = "chunks = []\nwhile True:\n    chunks.append(bytearray(1 << 24))"
    assert run_program(grow, limits).result == "failed: MemoryError"
    assert run_program("b = bytearray(64 << 20)", limits).passed


@pytest.mark.parametrize("guard", [True, False])
def test_writes_outside_the_working_directory_fail(protections, guard, tmp_path, open_dir):
    if not guard:
        os_layer(protections, "filesystem")
    targets = [tmp_path / "escape.txt", os.path.join(open_dir, "escape.txt"), os.path.join(open_dir, "victim.txt"),
               os.path.join(tempfile.gettempdir(), f"megaphi-escape-{os.getpid()}.txt")]
    for target in targets:
        result = run_program(f"with open({str(target)!r}, 'a') as f:\n    f.write('pwned')", guard=guard)
        assert not result.passed and ("PermissionError" in result.result or "OSError" in result.result), result
    for target in targets[:2] + targets[3:]:
        assert not os.path.exists(target)
    with open(targets[2]) as f:
        assert f.read() == "precious"


@pytest.mark.parametrize("guard", [True, False])
def test_deleting_files_fails(protections, guard, tmp_path, open_dir):
    if not guard:
        os_layer(protections, "filesystem")
    mine = tmp_path / "victim.txt"
    mine.write_text("precious")
    theirs = os.path.join(open_dir, "victim.txt")
    attacks = [f"import os\nos.remove({str(mine)!r})", f"import os\nos.unlink({theirs!r})",
               f"import shutil\nshutil.rmtree({open_dir!r})", f"import shutil\nshutil.rmtree({str(tmp_path)!r})",
               f"import os\nos.rename({theirs!r}, {theirs + '.moved'!r})", f"import os\nos.truncate({theirs!r}, 0)",
               f"import os\nos.chmod({theirs!r}, 0)"]
    for source in attacks:
        result = run_program(source, guard=guard)
        assert not result.passed, (source, result)
    assert mine.read_text() == "precious"
    with open(theirs) as f:
        assert f.read() == "precious"
    assert os.stat(theirs).st_mode & 0o777 == 0o666


@pytest.mark.parametrize("guard", [True, False])
def test_sockets_reach_nothing(protections, guard):
    if not guard:
        os_layer(protections, "namespaces")
    with socket.socket() as tcp, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        tcp.bind(("127.0.0.1", 0))
        tcp.listen()
        udp.bind(("127.0.0.1", 0))
        attacks = [f"import socket\ns = socket.create_connection(('127.0.0.1', {tcp.getsockname()[1]}), timeout=2)\n"
                   f"s.sendall(b'hello')",
                   f"import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                   f"s.sendto(b'hello', ('127.0.0.1', {udp.getsockname()[1]}))\nassert False, 'sent'",
                   "import urllib.request\nurllib.request.urlopen('http://example.com', timeout=2)"]
        for source in attacks:
            result = run_program(source, Limits(timeout=5), guard=guard)
            assert not result.passed, (source, result)
        readable, _, _ = select.select([tcp, udp], [], [], 0.3)
        assert readable == []  # no connection arrived, no datagram either


@pytest.mark.parametrize("guard", [True, False])
def test_killing_the_parent_or_others_fails(protections, guard):
    if not guard:
        os_layer(protections, "processes")
    victim = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        attacks = ["os.kill(os.getppid(), signal.SIGKILL)", f"os.kill({os.getpid()}, signal.SIGKILL)",
                   f"os.killpg({os.getpgid(0)}, signal.SIGKILL)", f"os.killpg({victim.pid}, signal.SIGKILL)",
                   f"os.kill({victim.pid}, signal.SIGTERM)", "os.kill(-1, signal.SIGKILL)"]
        for attack in attacks:
            source = f"import os, signal\n{attack}\nimport time\ntime.sleep(0.2)\nassert False, 'still here'"
            result = run_program(source, guard=guard)
            assert not result.passed, (attack, result)
        time.sleep(0.2)
        assert victim.poll() is None  # and this test process is evidently alive
    finally:
        victim.kill()
        victim.wait()


@pytest.mark.parametrize("guard", [True, False])
def test_leaving_the_process_group_does_not_survive_the_timeout(protections, guard):
    if not guard:
        os_layer(protections, "namespaces")
    source = ("import os, time\nprint(os.getcwd(), flush=True)\nif os.fork() == 0:\n    os.setsid()\n"
              "    time.sleep(60)\nwhile True:\n    pass")
    result = run_program(source, FAST, guard=guard)
    assert not result.passed
    time.sleep(0.2)
    assert leftovers(result.output.split("\n")[0]) == []


def test_huge_output_and_files_are_capped():
    limits = Limits(timeout=10, file_size_mb=4)
    spam = run_program("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)", limits)
    assert "File too large" in spam.result, spam.result
    assert len(spam.output) <= OUTPUT_TAIL
    big = run_program("with open('big.bin', 'wb') as f:\n    f.write(b'0' * (8 << 20))", limits)
    assert "File too large" in big.result, big.result
    assert run_program("print('x' * 100000)", limits).passed


@pytest.mark.parametrize("source, refused", [
    ("import subprocess\nsubprocess.run(['true'])", "subprocess.Popen"),
    ("import os\nos.system('true')", "os.system"),
    ("import socket\nsocket.socket()", "socket.__new__"),
    ("import os\nos.setsid()", "os.setsid"),
    ("import posix\nposix.setsid()", "posix.setsid"),
    ("import resource\nresource.setrlimit(resource.RLIMIT_CPU, (1, 1))", "resource.setrlimit"),
    ("import os\nos.remove('/etc/hostname')", "os.remove outside the working directory"),
    # Calls without an audit event of their own: killing the parent by pidfd, starting a program, a fifo.
    ("import os, signal\nsignal.pidfd_send_signal(os.pidfd_open(os.getppid()), 9)", "pidfd_open"),
    ("import multiprocessing\nmultiprocessing.get_context('spawn').Process(target=print).start()", "fork_exec"),
    ("import os\nos.mkfifo('/tmp/megaphi-fifo')", "mkfifo"),
    # Tampering with what the guard itself uses.
    ("import sys, os\nm = sys.modules['__main__']\nm.BLOCKED_EVENTS = frozenset()\nm.BLOCKED_PREFIXES = ('@',)\n"
     "os.kill(os.getpid(), 0)", "os.kill"),
    ("import builtins\nbuiltins.isinstance = lambda *a: True\nopen('/tmp/megaphi-escape', 'w')", "writing outside"),
    ("import posixpath\nposixpath.realpath = lambda *a, **k: '.'\nopen('/tmp/megaphi-escape', 'w')", "writing outside"),
    ("class S(str):\n    def startswith(self, *a):\n        return True\nopen(S('/tmp/megaphi-escape'), 'w')",
     "writing outside"),
    ("import sys\nsys.modules['__main__']._resolve.__code__ = (lambda *a: '/').__code__", "guard's functions"),
    ("import gc\ngc.get_objects()", "gc.get_objects"),
    # Ways around a path check: relative paths after chdir, symlinks, folder descriptors, open descriptors.
    ("import os\nos.chdir('/tmp')", "os.chdir"),
    ("import os\nos.symlink('/tmp', 'out')", "os.symlink"),
    ("import os\nos.open('x', os.O_WRONLY | os.O_CREAT, dir_fd=os.open('/tmp', os.O_RDONLY))", "opening a folder"),
    ("import os\nos.chmod(os.open('/etc/hostname', os.O_RDONLY), 0o777)", "os.chmod outside"),
    ("open('a/../../escape.txt', 'w')", "writing outside"),
    ("import sqlite3\nsqlite3.connect('/tmp/megaphi-escape.db')", "sqlite3.connect outside"),
])
def test_guard_refuses(source, refused):
    result = run_program(source)
    assert result.result.startswith("failed: PermissionError") and refused in result.result, result.result


def test_guard_refuses_imports_with_an_import_error():
    """Code that can do without a module (numpy without ctypes) catches ImportError, so refusals are one."""
    for source in ("import ctypes", "import _ctypes", "import sys\ndel sys.modules['posix']\nimport posix"):
        result = run_program(source)
        assert result.result.startswith("failed: ImportError: sandbox: importing"), result.result
    assert run_program("import numpy as np\nassert np.arange(4).sum() == 6").passed


def test_the_sandbox_leaves_no_foreign_function_handle_behind():
    result = run_program("import sys\nsys.modules['__main__']._libc.prctl(1, 0)")
    assert result.result.startswith("failed: AttributeError"), result.result  # _libc is None


def test_guard_allows_work_inside_the_working_directory():
    source = ("import os, shutil, sqlite3, tempfile\nos.mkdir('d')\nopen('d/a.txt', 'w').write('1')\n"
              "os.rename('d/a.txt', 'd/b.txt')\nos.remove('d/b.txt')\nshutil.rmtree('d')\n"
              "with tempfile.NamedTemporaryFile() as f:\n    f.write(b'x')\n"
              "os.makedirs('e/f')\nopen('e/f/g', 'w').write('1')\nos.chmod('e/f/g', 0o600)\nshutil.rmtree('e')\n"
              "with tempfile.TemporaryDirectory() as d:\n    open(os.path.join(d, 'x'), 'w').write('1')\n"
              "sqlite3.connect('db.sqlite').execute('create table t (x)')\nos.remove('db.sqlite')\n"
              "assert os.listdir('.') == []")
    result = run_program(source)
    assert result.passed, result


def test_attacks_in_parallel_leave_honest_programs_alone(protections):
    honest = "import math\nassert math.factorial(10) == 3628800"
    attacks = ["while True:\n    pass", "chunks = []\nwhile True:\n    chunks.append(bytearray(1 << 24))",
               "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
               "import sys\nwhile True:\n    sys.stdout.write('y' * 65536)"]
    sources = [s for attack in attacks for s in (attack, honest)]
    # Guard off only where the OS limits processes (root has no RLIMIT_NPROC): else the fork loop would be real.
    guard = not (isinstance(protections.get("uid"), int) or not protections["namespaces"].startswith("unavailable"))
    results = run_programs(sources, Limits(timeout=3, memory_mb=512), workers=4, guard=guard)
    assert [r.passed for r in results] == [False, True] * len(attacks)


UNPRIVILEGED_RUN = '''
import json, os, socket, sys, sysconfig
from megaphi.eval import sandbox_child as child

# As root: a mount namespace where the interpreter stays reachable for uid 65534 (it may live under /root).
paths = sys.path + [os.path.dirname(os.path.realpath(sys.executable)), sysconfig.get_config_var("LIBDIR")]
try:
    child._check(child._libc.unshare(child.CLONE_NEWNS), "unshare")
    child._mount(None, "/", None, child.MS_REC | child.MS_PRIVATE)
    child._expose_python(paths)
except OSError as e:  # root without CAP_SYS_ADMIN (a container): fine unless the interpreter is private
    if any(child._blocked_ancestor(p) for p in paths if os.path.isdir(p)):
        print(f"SKIP uid 65534 cannot reach the interpreter and there is no mount namespace to open it: {e}")
        sys.exit(0)
os.setgroups([])
os.setgid(65534)
os.setuid(65534)
os.chdir(os.path.dirname(VICTIM))

from megaphi.eval.sandbox import Limits, probe_protections, run_program

server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen()
attacks = {
    "write": f"open({VICTIM!r}, 'w').write('pwned')",
    "kill": "import os, signal\\nos.kill(os.getppid(), signal.SIGKILL)\\nos.kill(-1, signal.SIGKILL)\\nassert False",
    "socket": f"import socket\\nsocket.create_connection(('127.0.0.1', {server.getsockname()[1]}), timeout=2)",
    "forks": "import os, time\\nn = 0\\ntry:\\n    while True:\\n        if os.fork() == 0:\\n            time.sleep(30)\\n"
             "        n += 1\\nfinally:\\n    print('forks', n, flush=True)",
}
report = {"protections": probe_protections(), "uid": os.getuid()}
# Guard off only inside namespaces: without them, these attacks would really kill and write on this machine.
for guard in (True,) if report["protections"]["namespaces"].startswith("unavailable") else (True, False):
    for name, source in attacks.items():
        result = run_program(source, Limits(timeout=3), guard=guard)
        report[f"{name}:{guard}"] = [result.result, result.output.strip()]
server.setblocking(False)
try:
    server.accept()
    report["connected"] = True
except BlockingIOError:
    report["connected"] = False
print("REPORT " + json.dumps(report))
'''


@pytest.mark.skipif(os.geteuid() != 0, reason="this run is already unprivileged: the other tests cover that case")
def test_an_unprivileged_runner_still_contains_attacks(open_dir, repo_root):
    """Without root the sandbox uses a user namespace (where allowed) instead of a uid of its own."""
    victim = os.path.join(open_dir, "victim.txt")
    script = f"VICTIM = {victim!r}\n" + UNPRIVILEGED_RUN
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180,
                          cwd=repo_root, env={**os.environ, "PYTHONPATH": str(repo_root)})
    if done.stdout.startswith("SKIP "):
        pytest.skip(done.stdout[5:].strip())
    assert "REPORT " in done.stdout, done.stderr[-3000:]
    report = json.loads(done.stdout.rsplit("REPORT ", 1)[1])
    print(json.dumps(report, indent=1))
    assert report["uid"] == 65534
    for name in ("write", "kill", "socket", "forks"):
        assert "PermissionError" in report[f"{name}:True"][0], report
    if str(report["protections"]["namespaces"]).startswith("unavailable"):
        return  # only the guard and the rlimits hold here; the guard-off cases would harm this machine
    assert report["protections"]["uid"].endswith("capabilities dropped")
    for name in ("write", "kill", "socket"):
        assert report[f"{name}:False"][0] != "passed", report
    assert "BlockingIOError" in report["forks:False"][0] and int(report["forks:False"][1].split()[1]) < 8
    assert report["connected"] is False
    with open(victim) as f:
        assert f.read() == "precious"
