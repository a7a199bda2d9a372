"""Running untrusted (model-generated) Python in a sandbox, LLM Foundry's code-eval check, pass@k.

Generated code never runs in the evaluator's process. ``run_python`` starts a fresh
``python -I -B -S`` child per program, in a throwaway directory that is removed afterwards, in its
own session and process group, with a scrubbed environment (no proxies or credentials; HOME and
TMPDIR are the throwaway directory), and kills every process it left behind at the end.

What holds, and when:

* Always: a wall-clock timeout; resource limits set in the child before the program runs
  (RLIMIT_AS memory, RLIMIT_CPU, RLIMIT_FSIZE file size, RLIMIT_NOFILE, RLIMIT_CORE=0,
  RLIMIT_NPROC); stdout/stderr captured up to ``max_output_bytes`` (head and tail are kept, the
  middle is counted and dropped) so a sample printing forever cannot fill memory; the session and
  process group killed with SIGKILL at the end; ``no_new_privs`` (a setuid binary gains nothing).
* Layer ``"uid"`` (when the evaluator runs as root): the child drops to a uid/gid of its own, drawn
  per run from an unused range (nobody, 65534, if that range is not mapped, e.g. in a user
  namespace), with no supplementary groups and no capabilities. The kernel then refuses writes
  anywhere but the throwaway directory and world-writable places (/tmp, /dev/shm), refuses signals
  to other users' processes, and enforces RLIMIT_NPROC per run (it counts the processes of a uid
  and does not apply to root). Every process of that uid is killed at the end, also one that left
  the process group with setsid(). Where the interpreter's own files are not readable by other
  users (a pyenv under /root, say), the child keeps one capability, CAP_DAC_READ_SEARCH, so that it
  can import the standard library: it may then read any file (never write one); ``isolation`` says
  "read_all" then. As a non-root evaluator the child keeps the evaluator's uid:
  RLIMIT_NPROC then counts all of that user's processes (it is set to their number plus
  ``max_processes``) and the end-of-run kill reaches the session and process group only.
* Layer ``"netns"`` (root only): the child enters a new network namespace (unshare CLONE_NEWNET),
  which has no interface but a loopback that is down: no connection can leave it, not even to
  127.0.0.1.
* Layer ``"guard"`` (always available): a PEP 578 audit hook, installed before the program runs and
  impossible to remove from Python, refuses with PermissionError: creating sockets (and every other
  ``socket.*`` event), starting processes (os.fork/forkpty/exec*/spawn*/posix_spawn/system,
  subprocess, multiprocessing, _posixsubprocess), ctypes (but for the ``dlopen(None)`` that
  ``import ctypes`` does: numpy imports it), sub-interpreters, signals to other
  processes, gc introspection, and writes outside the throwaway directory (open for writing,
  mkdir, remove, rename, chmod, chown, utime, truncate, xattrs, sqlite3 databases; symlinks and
  hard links anywhere). It covers what the standard library reports through audit events; it
  does not cover os.mkfifo/os.mknod, C extensions that call libc directly, or code written to
  corrupt the interpreter. Against those, only the kernel layers above hold.

Not limited: the number of files written in the throwaway directory (each up to ``max_file_mb``,
on the evaluator's disk until the run ends), and reading files the child's uid may read.

``SandboxResult.isolation`` lists the layers the child actually applied. ``check_program`` builds
and checks a program the way LLM Foundry's code evaluation did (``InContextLearningCodeEvalAccuracy``
with its local eval client, llm-foundry <= 0.8 / composer); ``pass_at_k`` is the unbiased estimator
of Chen et al. (2021).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import os
import random
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Collection
from typing import Literal

from absl import logging

Status = Literal["passed", "failed", "timeout", "killed"]
LAYERS = ("uid", "netns", "guard")  # every layer; run_python(layers=...) takes a subset (tests)
LANGUAGES = ("python",)  # what check_program runs
LLMFOUNDRY_TIMEOUT_S = 5.0  # LLM Foundry's local code-eval timeout per test case

# Constants the child needs: sent with its source (see _child_script), defined once here.
_MEMORY_EXIT_CODE = 213  # the child's exit status when the program died of MemoryError
_NOBODY = 65534
_CLONE_NEWNET = 0x40000000
_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_KEEPCAPS = 8
_CAP_DAC_READ_SEARCH = 2
_CAPABILITY_VERSION_3 = 0x20080522
_UID_BASE, _UID_SPAN = 1_900_000_000, 1 << 24  # per-run uids: far above any real or subordinate uid
_CHILD_CONSTANTS = (
    "_MEMORY_EXIT_CODE",
    "_NOBODY",
    "_CLONE_NEWNET",
    "_PR_SET_NO_NEW_PRIVS",
    "_PR_SET_KEEPCAPS",
    "_CAP_DAC_READ_SEARCH",
    "_CAPABILITY_VERSION_3",
)

_claimed_uids: set[int] = set()
_claim_lock = threading.Lock()


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    """How one sandboxed run ended.

    status: "passed" (exit status 0), "failed" (another exit status), "timeout" (wall-clock limit),
    "killed" (a signal: CPU limit, SIGKILL, a crash; or the memory limit, seen as MemoryError).
    returncode: the exit status, negative for a signal (-9 after a timeout). stdout/stderr: decoded
    output, its middle dropped past ``max_output_bytes``. reason: why, in words. isolation: the
    layers the child applied, e.g. ("rlimits", "netns", "no_new_privs", "uid=1900012345", "guard"),
    with "read_all" where the uid kept CAP_DAC_READ_SEARCH (see the module docstring).
    pid: the child's pid, which is also its session and process group id."""

    status: Status
    returncode: int
    stdout: str
    stderr: str
    wall_s: float
    reason: str
    isolation: tuple[str, ...]
    pid: int

    @property
    def uid(self) -> int | None:
        """The uid the program ran as when the "uid" layer applied, else None."""
        for layer in self.isolation:
            if layer.startswith("uid="):
                return int(layer[4:])
        return None


def run_python(
    source: str,
    *,
    timeout_s: float = 10.0,
    memory_mb: int = 1024,
    cpu_s: float | None = None,
    max_processes: int = 16,
    max_file_mb: int = 16,
    max_open_files: int = 64,
    max_output_bytes: int = 64 * 1024,
    stdin: str | bytes | None = None,
    site_packages: bool = False,
    layers: Collection[str] = LAYERS,
) -> SandboxResult:
    """Runs ``source`` as ``__main__`` in a sandboxed child process (see the module docstring).

    timeout_s: wall-clock limit. memory_mb: address-space limit. cpu_s: CPU-time limit (default
    timeout_s + 1; SIGXCPU at cpu_s, SIGKILL a second later). max_processes: tasks (processes and
    threads) the run may have under its own uid. max_file_mb: largest file it may write.
    max_open_files: RLIMIT_NOFILE. max_output_bytes: kept of stdout and of stderr each.
    stdin: the program's standard input (default: empty). site_packages: put the interpreter's
    site-packages on sys.path (off by default: the standard library is what code eval needs, and
    without ``site`` the child starts in a fraction of the time). layers: which of ``LAYERS`` to
    apply; turn one off only to test the others."""
    if not timeout_s > 0:
        raise ValueError(f"run_python: timeout_s must be > 0, got {timeout_s}")
    if memory_mb < 64:
        raise ValueError(f"run_python: memory_mb must be at least 64 (Python itself needs it), got {memory_mb}")
    for name, value in (("max_processes", max_processes), ("max_file_mb", max_file_mb)):
        if value < 1:
            raise ValueError(f"run_python: {name} must be >= 1, got {value}")
    if max_open_files < 16:
        raise ValueError(f"run_python: max_open_files must be >= 16, got {max_open_files}")
    unknown = set(layers) - set(LAYERS)
    if unknown:
        raise ValueError(f"run_python: unknown layers {sorted(unknown)}; known: {list(LAYERS)}")
    if not sys.platform.startswith("linux"):
        raise ValueError(f"run_python: the sandbox needs Linux (/proc, prctl, namespaces); this is {sys.platform}")
    if not sys.executable:
        raise ValueError("run_python: sys.executable is empty; cannot start a Python child")

    cpu = math.ceil(timeout_s + 1 if cpu_s is None else cpu_s)
    is_root = os.geteuid() == 0
    uid = _claim_uid() if "uid" in layers and is_root else None
    read_all = uid is not None and not _readable_by_others(_interpreter_dirs(site_packages))
    nproc = max_processes if uid is not None else _count_tasks(os.getuid()) + max_processes
    limits = f"AS={memory_mb << 20},CPU={cpu},FSIZE={max_file_mb << 20},NOFILE={max_open_files},NPROC={nproc},CORE=0"
    root, proc, report_r = None, None, -1
    try:
        root = tempfile.mkdtemp(prefix="mpt_jax_sandbox_")
        work = os.path.join(os.path.realpath(root), "work")
        os.mkdir(work, 0o700)
        main_path = os.path.join(root, "main.py")
        _write_file(main_path, source.encode("utf-8"), 0o644)
        stdin_path = os.path.join(root, "stdin")
        _write_file(stdin_path, stdin.encode("utf-8") if isinstance(stdin, str) else stdin or b"", 0o600)
        if is_root:
            os.chmod(root, 0o711)  # the child's uid may pass through to work/, not list or write root/
        report_r, report_w = os.pipe()
        argv = [sys.executable, "-I", "-B"] + ([] if site_packages else ["-S"])
        argv += ["-c", _child_script(), work, main_path, str(report_w), str(-1 if uid is None else uid)]
        argv += [limits, ",".join([layer for layer in LAYERS if layer in layers] + ["read_all"] * read_all)]
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": work,
            "TMPDIR": work,
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
        }
        with open(stdin_path, "rb") as stdin_file:
            start = time.monotonic()
            try:
                proc = subprocess.Popen(
                    argv,
                    cwd=work,
                    env=env,
                    stdin=stdin_file,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    pass_fds=(report_w,),
                    start_new_session=True,
                )
            finally:
                os.close(report_w)
        out, err = _Capture(max_output_bytes), _Capture(max_output_bytes)
        exited = _pump(proc, {proc.stdout.fileno(): out, proc.stderr.fileno(): err}, start + timeout_s)
        wall_s = time.monotonic() - start
        _kill_everything(proc.pid, uid)
        _pump(proc, {proc.stdout.fileno(): out, proc.stderr.fileno(): err}, time.monotonic() + 1.0, drain=True)
        returncode = proc.wait()
        with os.fdopen(report_r, "rb") as report:
            report_r = -1
            isolation = tuple(report.read().decode().split())
    finally:
        if report_r >= 0:
            os.close(report_r)
        if proc is not None:
            proc.stdout.close()
            proc.stderr.close()
            if proc.returncode is None:  # an exception before the end: nothing may outlive us
                _kill_everything(proc.pid, uid)
                proc.wait()
        _release_uid(uid)
        if root is not None:
            _remove_tree(root)
    status, reason = _classify(exited, returncode, timeout_s=timeout_s, memory_mb=memory_mb, cpu_s=cpu)
    _warn_missing_layers(layers, isolation, is_root)
    return SandboxResult(status, returncode, out.text(), err.text(), wall_s, reason, isolation, proc.pid)


# ----------------------------------------------------------------------------------------------
# LLM Foundry's code evaluation


_FUNCTION_END = re.compile(r"\n[A-Za-z0-9#`]")  # LLM Foundry: a line starting flush left ends the function


def build_program(prompt: str, completion: str) -> str:
    """The program LLM Foundry checks: the completion cut at the first line that starts flush left
    with a letter, digit, ``#`` or a backtick (the end of the function), appended to the prompt."""
    end = _FUNCTION_END.search(completion)
    return prompt + (completion[: end.start()] if end else completion)


# The test cases of one sample, each as LLM Foundry's local eval client ran it in a process of its
# own: exec the program in a fresh module named "test_module", call entry_point(*eval(test_input)),
# compare with eval(test_output) (the raw string when that does not evaluate). Any Exception before
# the comparison fails the test, and so does a test over the time limit (SIGALRM stops it; the
# elapsed time is checked as well, as the program may catch or disarm the alarm). Leaving without a
# verdict (SystemExit, a crash, the sandbox's overall timeout) fails too. The verdict goes to a copy
# of stdout taken before the program runs, tagged with a nonce read from stdin, so printing "PASS"
# passes nothing. Inputs and outputs are evaluated with builtins only (LLM Foundry used its own
# module's namespace, which test files never refer to). One process for all the test cases of a
# sample instead of one each: the verdict is the same (all() of the tests, each with its own fresh
# module and time limit) and a sample costs one interpreter start.
_TEST_CASES = """\
import sys
from os import _exit, dup, write
from signal import ITIMER_REAL, SIGALRM, setitimer, signal
from time import monotonic

_nonce = sys.stdin.readline().strip()
_verdict_fd = dup(1)


def _verdict(word):
    try:
        sys.stdout.flush()
    except BaseException:
        pass
    write(_verdict_fd, ("\\n%s %s\\n" % (_nonce, word)).encode())
    _exit(0)


signal(SIGALRM, lambda *_: _verdict("FAIL"))
for _test_input, _test_output in {tests!r}:
    _passed = False
    _start = monotonic()
    setitimer(ITIMER_REAL, {timeout_s!r})
    try:
        _module = type(sys)("test_module")
        exec({program!r}, _module.__dict__)
        _result = _module.__dict__[{entry_point!r}](*eval(_test_input, {{}}))
        try:
            _expected = eval(_test_output, {{}})
        except BaseException:
            _expected = _test_output
        _passed = bool(_result == _expected)
    except Exception:
        pass
    setitimer(ITIMER_REAL, 0)
    if not _passed or monotonic() - _start > {timeout_s!r}:
        _verdict("FAIL")
_verdict("PASS")
"""


def check_program(
    prompt: str,
    completion: str,
    entry_point: str,
    test_inputs: list[str],
    test_outputs: list[str],
    *,
    language: str = "python",
    timeout_s: float = LLMFOUNDRY_TIMEOUT_S,
    memory_mb: int = 1024,
) -> bool:
    """Whether ``build_program(prompt, completion)`` passes every test case, as LLM Foundry's code
    evaluation judged a sample: each test case with a fresh module and ``timeout_s`` of its own, all
    of them in one sandbox (``run_python``) that gets ``timeout_s`` per test case plus a second.

    Stops at the first failing test (the answer is the same). No test cases means True, as in LLM
    Foundry (``all([])``). Only ``language="python"`` is supported. Thread-safe: samples may be
    checked in parallel threads, each in its own sandbox."""
    if language not in LANGUAGES:
        raise ValueError(f"check_program: language {language!r} is not supported; supported: {list(LANGUAGES)}")
    if len(test_inputs) != len(test_outputs):
        raise ValueError(f"check_program: {len(test_inputs)} test_inputs but {len(test_outputs)} test_outputs")
    if not test_inputs:
        return True
    nonce = secrets.token_hex(16)
    source = _TEST_CASES.format(
        program=build_program(prompt, completion),
        entry_point=entry_point,
        tests=list(zip(test_inputs, test_outputs, strict=True)),
        timeout_s=float(timeout_s),
    )
    result = run_python(source, timeout_s=timeout_s * len(test_inputs) + 1.0, memory_mb=memory_mb, stdin=nonce + "\n")
    return result.status == "passed" and result.stdout.rstrip("\n").rpartition("\n")[2] == f"{nonce} PASS"


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimator (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), the chance that k
    of n samples, c of them correct, include a correct one; as the product prod_{i=n-c+1}^{n} (1 - k/i),
    which never forms the (huge) binomials."""
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 1 <= k <= n (at least k samples per problem), got n={n}, k={k}")
    if n - c < k:
        return 1.0
    fail = 1.0
    for i in range(n - c + 1, n + 1):
        fail *= 1.0 - k / i
    return 1.0 - fail


# ----------------------------------------------------------------------------------------------
# The child: these functions run in the sandboxed interpreter, sent as source (stdlib only; no
# globals but _CHILD_CONSTANTS). Never call them in the evaluator: the audit hook cannot be removed.


def _child_main() -> None:
    """Limits, network namespace, privileges, guard, in that order; then the program as __main__.
    argv: work dir, program path, report fd, uid (-1: keep), "NAME=value,..." rlimits, layers."""
    import os
    import resource
    import sys

    work, main_path, report_fd, uid, limits, layers = sys.argv[1:7]
    report_fd, uid, layers = int(report_fd), int(uid), layers.split(",")
    applied = []
    os.umask(0o077)
    for item in limits.split(","):
        name, value = item.split("=")
        which = getattr(resource, "RLIMIT_" + name)
        soft = int(value)
        hard = soft + 1 if name == "CPU" else soft  # SIGXCPU first, SIGKILL a second later
        current_hard = resource.getrlimit(which)[1]
        if current_hard != resource.RLIM_INFINITY:  # raising a hard limit needs CAP_SYS_RESOURCE
            soft, hard = min(soft, current_hard), min(hard, current_hard)
        resource.setrlimit(which, (soft, hard))
    applied.append("rlimits")
    if "netns" in layers and os.geteuid() == 0 and _libc_call("unshare", _CLONE_NEWNET) == 0:
        applied.append("netns")
    if _libc_call("prctl", _PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0:
        applied.append("no_new_privs")
    with open(main_path, encoding="utf-8") as f:
        source = f.read()
    if uid >= 0:
        read_all = "read_all" in layers
        for candidate in (uid, _NOBODY):  # nobody where the per-run uid is not mapped (user namespaces)
            try:
                os.chown(work, candidate, candidate)
                if read_all and _libc_call("prctl", _PR_SET_KEEPCAPS, 1, 0, 0, 0) != 0:
                    raise OSError("prctl(PR_SET_KEEPCAPS) failed")
                os.setgroups([])
                os.setgid(candidate)
                os.setuid(candidate)  # from root to non-root: every capability goes (but for KEEPCAPS)
            except OSError:
                continue
            applied.append(f"uid={candidate}")
            if read_all:  # keep CAP_DAC_READ_SEARCH alone, or stop: never run with the kept set
                mask = (1 << _CAP_DAC_READ_SEARCH).to_bytes(4, sys.byteorder)
                header = _CAPABILITY_VERSION_3.to_bytes(4, sys.byteorder) + bytes(4)
                if _libc_call("capset", header, mask + mask + bytes(16)) != 0:
                    os.write(2, b"sandbox: capset failed\n")
                    os._exit(1)
                _libc_call("prctl", _PR_SET_KEEPCAPS, 0, 0, 0, 0)
                applied.append("read_all")
            break
    code = compile(source, main_path, "exec")
    if "guard" in layers:
        _install_guard(work)
        applied.append("guard")
    os.write(report_fd, " ".join(applied).encode())
    os.close(report_fd)
    main = type(sys)("__main__")
    main.__file__ = main_path
    sys.modules["__main__"] = main
    sys.argv = [main_path]
    try:
        exec(code, main.__dict__)
    except MemoryError:
        os.write(2, b"MemoryError: the sandbox's memory limit was reached\n")
        os._exit(_MEMORY_EXIT_CODE)


def _libc_call(name: str, *args: int | bytes) -> int:
    """Calls a libc function with C long (int) or pointer-to-buffer (bytes) arguments; -1 when it is
    missing. Built on _ctypes directly: ``import ctypes`` would add about 15 ms to every start."""
    import _ctypes
    import os

    class Long(_ctypes._SimpleCData):
        _type_ = "l"

    class Int(_ctypes._SimpleCData):
        _type_ = "i"

    class Function(_ctypes.CFuncPtr):
        _flags_ = _ctypes.FUNCFLAG_CDECL | _ctypes.FUNCFLAG_USE_ERRNO
        _restype_ = Int

    try:
        address = _ctypes.dlsym(_ctypes.dlopen(None, os.RTLD_NOW), name)
    except OSError:
        return -1
    return Function(address)(*[a if isinstance(a, bytes) else Long(a) for a in args])


def _install_guard(work: str) -> None:
    """Installs the audit hook described in the module docstring. Writes are allowed under ``work``
    (a real path without symlinks: the hook forbids creating any) and to /dev/null; a path with a
    ``..`` component is refused rather than resolved. Everything the hook uses is bound here, so
    rebinding a module attribute later does not change it."""
    import _posixsubprocess
    import os
    import sys

    getcwd, readlink, stat, getpid, fspath = os.getcwd, os.readlink, os.stat, os.getpid, os.fspath
    isinstance_, int_, str_, bytes_, refused = isinstance, int, str, bytes, PermissionError
    encoding = sys.getfilesystemencoding()
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    prefix = work + "/"
    devices = ("/dev/null", "/dev/stdout", "/dev/stderr")
    always = {
        "os.fork", "os.forkpty", "os.exec", "os.spawn", "os.posix_spawn", "os.system", "os.killpg",
        "subprocess.Popen", "os.link", "os.symlink", "cpython.PyInterpreterState_New",
        "gc.get_objects", "gc.get_referrers", "gc.get_referents",
        "sqlite3.enable_load_extension", "sqlite3.load_extension", "syslog.openlog", "syslog.syslog",
    }  # fmt: skip
    no_fresh_import = {"_posixsubprocess", "_posixshmem", "_gdbm", "_dbm"}  # C code that forks or writes
    # event -> ((index of a path argument, index of its dir_fd argument or None), ...)
    path_events = {
        "os.mkdir": ((0, 2),), "os.remove": ((0, 1),), "os.rmdir": ((0, 1),),
        "os.rename": ((0, 2), (1, 3)), "os.truncate": ((0, None),), "os.chmod": ((0, 2),),
        "os.chown": ((0, 3),), "os.utime": ((0, 3),), "os.chflags": ((0, None),),
        "os.setxattr": ((0, None),), "os.removexattr": ((0, None),),
    }  # fmt: skip

    def fd_path(fd):
        try:
            return readlink("/proc/self/fd/" + str_(fd))
        except OSError:
            return None

    def text(path):  # a plain str, whatever str/bytes/PathLike (sub)class came in
        path = fspath(path)
        return bytes_.decode(path, encoding, "surrogateescape") if isinstance_(path, bytes_) else str_.__add__("", path)

    def absolute(path, dir_fd=None):
        if isinstance_(path, int_):
            return fd_path(path)
        path = text(path)
        if path.startswith("/"):
            return path
        base = getcwd() if dir_fd is None or dir_fd == -1 else fd_path(dir_fd)
        return None if base is None else base + "/" + path

    def inside(path, dir_fd=None):
        full = absolute(path, dir_fd)
        if full is None:
            return False
        parts = [part for part in full.split("/") if part and part != "."]
        if ".." in parts:
            return False
        full = "/" + "/".join(parts)
        return full == work or full.startswith(prefix)

    def is_outside_dir(path):
        full = absolute(path)
        try:
            return full is not None and not inside(full) and (stat(full).st_mode & 0o170000) == 0o040000
        except OSError:
            return False

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            if isinstance_(path, int_):
                return  # wraps a descriptor that is already open
            if flags & write_flags:
                if not inside(path) and absolute(path) not in devices:
                    raise refused(f"sandbox: writing {absolute(path)!r} is not allowed (outside {work})")
            elif mode is None and is_outside_dir(path):  # a directory fd outside would serve as a dir_fd
                raise refused(f"sandbox: opening the directory {absolute(path)!r} is not allowed")
        elif event in path_events:
            for path_index, dir_fd_index in path_events[event]:
                dir_fd = None if dir_fd_index is None else args[dir_fd_index]
                if not inside(args[path_index], dir_fd):
                    raise refused(
                        f"sandbox: {event} on {absolute(args[path_index], dir_fd)!r} is not allowed (outside {work})"
                    )
        elif event in always or event.startswith("socket."):
            raise refused(f"sandbox: {event} is not allowed")
        elif event.startswith("ctypes."):
            if event != "ctypes.dlopen" or args[0] is not None:  # dlopen(None): the running program
                raise refused(f"sandbox: {event} is not allowed")
        elif event == "os.kill":
            if args[0] != getpid():
                raise refused("sandbox: signals to other processes are not allowed")
        elif event == "import":
            if args[0] in no_fresh_import:
                raise refused(f"sandbox: loading {args[0]} is not allowed")
        elif event == "sqlite3.connect":
            database = text(args[0])
            if database in (":memory:", ""):
                return
            if database.startswith("file:") or not inside(database):  # a file: URI may name any path
                raise refused("sandbox: sqlite3 databases outside the sandbox directory are not allowed")
        elif event == "object.__setattr__" and args[1] == "__code__":
            raise refused("sandbox: replacing a function's code is not allowed")

    def no_fork_exec(*args, **kwargs):
        raise refused("sandbox: starting processes is not allowed")

    _posixsubprocess.fork_exec = no_fork_exec  # the one process starter that raises no audit event
    sys.addaudithook(hook)


# ----------------------------------------------------------------------------------------------
# The evaluator's side


@functools.cache
def _child_script() -> str:
    """The child's program for ``python -c``: the shared constants, the child functions, a call."""
    constants = "".join(f"{name} = {globals()[name]!r}\n" for name in _CHILD_CONSTANTS)
    functions = "\n\n".join(inspect.getsource(f) for f in (_libc_call, _install_guard, _child_main))
    return f"{constants}\n\n{functions}\n\n_child_main()\n"


@functools.cache
def _interpreter_dirs(site_packages: bool) -> tuple[str, ...]:
    """Directories the child imports from."""
    paths = sysconfig.get_paths()
    dirs = {paths["stdlib"], paths["platstdlib"], os.path.join(paths["platstdlib"], "lib-dynload")}
    if site_packages:
        dirs |= {paths["purelib"], paths["platlib"]}
    return tuple(sorted(d for d in dirs if os.path.isdir(d)))


@functools.cache
def _readable_by_others(dirs: tuple[str, ...]) -> bool:
    """Whether a user with no relation to the owners may list and enter ``dirs`` (o+rx) and pass
    through every directory above them (o+x)."""
    for directory in dirs:
        path = os.path.realpath(directory)
        if os.stat(path).st_mode & 0o005 != 0o005:
            return False
        while path != "/":
            path = os.path.dirname(path)
            if not os.stat(path).st_mode & 0o001:
                return False
    return True


class _Capture:
    """Keeps the first and the last ``limit // 2`` bytes of a stream and counts the rest."""

    def __init__(self, limit: int):
        self.half = max(limit, 2) // 2
        self.head, self.tail, self.total = bytearray(), bytearray(), 0

    def add(self, data: bytes) -> None:
        self.total += len(data)
        room = self.half - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if data:
            self.tail += data
            del self.tail[: max(0, len(self.tail) - self.half)]

    def text(self) -> str:
        dropped = self.total - len(self.head) - len(self.tail)
        middle = f"\n[... {dropped} bytes dropped ...]\n".encode() if dropped else b""
        return (bytes(self.head) + middle + bytes(self.tail)).decode("utf-8", "replace")


def _pump(proc: subprocess.Popen, streams: dict[int, _Capture], deadline: float, drain: bool = False) -> bool:
    """Reads the child's pipes into ``streams`` until the child exits (True) or ``deadline``
    (False). ``drain``: read until the pipes close instead (after the kill), at most to deadline.
    The child is never reaped here (os.WNOWAIT), so its pid, session and group stay ours to kill."""
    poller = select.poll()  # not select.select: the evaluator may hold fds above 1024
    for fd in streams:
        poller.register(fd, select.POLLIN)
    open_fds = set(streams)
    while True:
        if drain and not open_fds:
            return True
        if not drain and os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        if not open_fds:
            time.sleep(min(0.005, remaining))
            continue
        for fd, _ in poller.poll(min(50.0, remaining * 1000)):
            data = os.read(fd, 1 << 16)
            if data:
                streams[fd].add(data)
            else:
                poller.unregister(fd)
                open_fds.discard(fd)


def _classify(exited: bool, returncode: int, *, timeout_s: float, memory_mb: int, cpu_s: int) -> tuple[Status, str]:
    if not exited:
        return "timeout", f"wall-clock limit of {timeout_s:g} s reached"
    if returncode == 0:
        return "passed", "exit status 0"
    if returncode == _MEMORY_EXIT_CODE:
        return "killed", f"memory limit of {memory_mb} MiB reached (MemoryError)"
    if returncode < 0:
        sig = -returncode
        if sig == signal.SIGXCPU:
            return "killed", f"CPU-time limit of {cpu_s} s reached (SIGXCPU)"
        if sig == signal.SIGKILL:
            return "killed", "killed by SIGKILL (the CPU-time hard limit or the kernel's out-of-memory killer)"
        return "killed", f"killed by {signal.Signals(sig).name}"
    return "failed", f"exit status {returncode}"


def _claim_uid() -> int:
    """A uid for one run: unused by this process's other runs and by any live process."""
    with _claim_lock:
        for _ in range(100):
            uid = _UID_BASE + random.randrange(_UID_SPAN)
            if uid not in _claimed_uids and not _processes(uid=uid):
                _claimed_uids.add(uid)
                return uid
    raise RuntimeError("run_python: found no free sandbox uid in 100 draws")


def _release_uid(uid: int | None) -> None:
    with _claim_lock:
        _claimed_uids.discard(uid)


def _processes(*, uid: int | None = None, session: int | None = None) -> list[int]:
    """Live (not zombie) processes whose real, effective or saved uid is ``uid``, or whose session or
    process group is ``session``, from /proc."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                state, _ppid, pgrp, sid = f.read().rpartition(b")")[2].split()[:4]
            if state in (b"Z", b"X"):
                continue
            if session is not None and session in (int(pgrp), int(sid)):
                found.append(int(name))
                continue
            if uid is not None:
                with open(f"/proc/{name}/status", "rb") as f:
                    status = f.read()
                start = status.index(b"\nUid:") + 5
                if uid in map(int, status[start : status.index(b"\n", start)].split()[:3]):
                    found.append(int(name))
        except (OSError, ValueError):
            continue  # the process ended while we looked
    return found


def _count_tasks(uid: int) -> int:
    """Tasks (threads) of ``uid``: what RLIMIT_NPROC counts."""
    total = 0
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status", "rb") as f:
                status = f.read()
            start = status.index(b"\nUid:") + 5
            if int(status[start : status.index(b"\n", start)].split()[0]) == uid:
                start = status.index(b"\nThreads:") + 9
                total += int(status[start : status.index(b"\n", start)])
        except (OSError, ValueError):
            continue
    return total


def _kill_everything(pid: int, uid: int | None) -> None:
    """SIGKILLs the child's process group, its session, and every process of its own ``uid``, until
    none is left (a process that is being killed cannot fork)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass
    for _ in range(1000):
        targets = [p for p in _processes(uid=uid, session=pid) if p != pid]
        if not targets:
            return
        for target in targets:
            try:
                os.kill(target, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.002)
    logging.warning("run_python: processes of sandbox %d (uid %s) survived 1000 SIGKILL rounds", pid, uid)


def _write_file(path: str, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _remove_tree(path: str) -> None:
    """Removes the throwaway directory, also what the program made unreadable (as non-root)."""

    def make_writable_and_retry(function, failed_path, _exc_info):
        parent = os.path.dirname(failed_path)
        os.chmod(parent, 0o700)  # a real directory: rmtree does not follow symlinks
        if not os.path.islink(failed_path) and os.path.isdir(failed_path):
            os.chmod(failed_path, 0o700)
        function(failed_path)

    shutil.rmtree(path, onerror=make_writable_and_retry)


_warned: set[str] = set()


def _warn_missing_layers(requested: Collection[str], isolation: tuple[str, ...], is_root: bool) -> None:
    """Says once per process which requested layer could not be applied, and what that costs."""
    missing = []
    if "uid" in requested and not any(layer.startswith("uid=") for layer in isolation):
        missing.append("uid (" + ("setuid failed" if is_root else "the evaluator is not root") + ")")
    if "netns" in requested and "netns" not in isolation:
        missing.append("netns (" + ("unshare failed" if is_root else "the evaluator is not root") + ")")
    key = ",".join(missing)
    if missing and isolation and key not in _warned:
        _warned.add(key)
        logging.warning("run_python: sandbox layers unavailable: %s; the audit-hook guard and rlimits remain", key)
