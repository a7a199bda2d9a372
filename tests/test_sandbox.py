"""The code-evaluation sandbox: each hostile sample is stopped or refused, layer by layer, without
harming the test process; LLM Foundry's program building and test comparison; pass@k.

The layers that need root (a per-run uid, a network namespace) are tested on their own and together
where the tests run as root; the audit-hook guard and the limits are tested everywhere."""

from __future__ import annotations

import json
import math
import os
import resource
import secrets
import socket
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction

import pytest

from mpt_jax.eval.sandbox import LAYERS, build_program, check_program, pass_at_k, run_python

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="the uid and network-namespace layers need root")
# the layer sets each hostile sample is tried against: all (what evaluation uses), and each alone
GUARD_ONLY = ("guard",)
UID_ONLY = ("uid",)
NETNS_ONLY = ("netns",)


def live_processes(session: int, uid: int | None) -> list[int]:
    """Processes, not zombies, in the sandbox's session or process group or running as its uid: read
    from /proc here, independently of the sandbox's own clean-up."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                state, _, pgrp, sid = f.read().rpartition(")")[2].split()[:4]
            with open(f"/proc/{name}/status") as f:
                uids = next(line for line in f if line.startswith("Uid:")).split()[1:4]
        except (OSError, StopIteration):
            continue
        if state not in ("Z", "X") and (session in (int(pgrp), int(sid)) or str(uid) in uids):
            found.append(int(name))
    return found


def last_error(result) -> str:
    lines = result.stderr.strip().splitlines()
    return lines[-1] if lines else ""


# ----------------------------------------------------------------------------------------------
# run_python


def test_runs_in_a_child_process_in_a_throwaway_directory_that_is_removed():
    result = run_python("import os, sys\nprint(os.getcwd()); print(os.getpid()); print(sys.flags.isolated)")
    assert result.status == "passed", result.stderr
    cwd, pid, isolated = result.stdout.split()
    assert int(pid) == result.pid != os.getpid()
    assert isolated == "1"
    assert os.path.basename(cwd) == "work" and not os.path.exists(os.path.dirname(cwd))
    assert {"rlimits", "guard", "no_new_privs"} <= set(result.isolation)
    if ROOT:
        assert "netns" in result.isolation and result.uid is not None and result.uid != 0
    assert live_processes(result.pid, result.uid) == []


def test_exit_status_exceptions_and_stdin():
    assert run_python("import sys; sys.exit(3)").returncode == 3
    failed = run_python("raise ValueError('boom')")
    assert failed.status == "failed" and failed.reason == "exit status 1" and "ValueError: boom" in failed.stderr
    echoed = run_python("print(input()[::-1])", stdin="abc\n")
    assert echoed.status == "passed" and echoed.stdout == "cba\n"
    aborted = run_python("import os; os.abort()")
    assert aborted.status == "killed" and aborted.reason == "killed by SIGABRT"


def test_site_packages_on_request():
    """numpy (imports ctypes: the guard lets its dlopen(None) through) and the standard library's usual
    suspects work under every layer."""
    source = "import numpy, threading, logging, collections, tempfile\nprint(numpy.arange(4).sum())"
    assert run_python(source, site_packages=True).stdout == "6\n"
    assert "ModuleNotFoundError" in run_python(source).stderr


def test_environment_is_scrubbed(monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    env = json.loads(run_python("import os, json; print(json.dumps(dict(os.environ)))").stdout)
    assert "HTTPS_PROXY" not in env and "AWS_SECRET_ACCESS_KEY" not in env
    assert env["HOME"] == env["TMPDIR"] and env["HOME"].endswith("/work")


def test_files_inside_the_sandbox_directory_can_be_written():
    source = "import os, tempfile\nopen('a.txt', 'w').write('hi')\nos.mkdir('d')\nos.rename('a.txt', 'd/b.txt')\n"
    source += "tempfile.NamedTemporaryFile(delete=False).write(b'x')\nprint(open('d/b.txt').read())"
    result = run_python(source)
    assert result.status == "passed", result.stderr
    assert result.stdout == "hi\n"


def test_infinite_loop_is_stopped_by_the_wall_clock_timeout():
    result = run_python("while True:\n    pass", timeout_s=1.5)
    assert result.status == "timeout" and result.returncode == -9
    assert 1.4 < result.wall_s < 3.0
    assert live_processes(result.pid, result.uid) == []


def test_cpu_time_limit():
    result = run_python("while True:\n    pass", timeout_s=20, cpu_s=1)
    assert result.status == "killed" and "SIGXCPU" in result.reason
    assert result.wall_s < 10


def test_unbounded_allocation_is_stopped_by_the_memory_limit():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = run_python("chunks = []\nwhile True:\n    chunks.append(bytearray(10**7))", memory_mb=256, timeout_s=20)
    assert result.status == "killed" and "memory limit of 256 MiB" in result.reason
    assert result.wall_s < 10
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50_000  # KiB: the test process is untouched
    assert run_python("x = bytearray(100 * 2**20)\nprint(len(x))", memory_mb=256).stdout == "104857600\n"


def test_stdout_flood_is_capped():
    result = run_python("while True:\n    print('x' * 1000)", timeout_s=1, max_output_bytes=4096)
    assert result.status == "timeout"
    assert len(result.stdout) < 4096 + 64 and "bytes dropped" in result.stdout
    assert result.stdout.startswith("x" * 100) and result.stdout.rstrip().endswith("x" * 100)


FORK_LOOP = """
import os, time
n = 0
try:
    while True:
        if os.fork() == 0:
            time.sleep(60)
            os._exit(0)
        n += 1
except OSError as e:
    print(n, type(e).__name__)
"""
POPEN_LOOP = """
import subprocess
n = 0
try:
    while True:
        subprocess.Popen(["sleep", "60"])
        n += 1
except OSError as e:
    print(n, type(e).__name__)
"""
FORK_BOMB = "import os\nwhile True:\n    os.fork()"


@pytest.mark.parametrize("source", [FORK_LOOP, POPEN_LOOP, FORK_BOMB], ids=["fork_loop", "popen_loop", "fork_bomb"])
@pytest.mark.parametrize("layers", [LAYERS, GUARD_ONLY], ids=["all_layers", "guard"])
def test_process_creation_is_refused_by_the_guard(source, layers):
    result = run_python(source, layers=layers, timeout_s=3)
    assert result.status in ("passed", "failed") and result.wall_s < 2.5
    assert "PermissionError" in result.stdout + result.stderr  # refused at the first attempt
    assert result.stdout in ("", "0 PermissionError\n")
    assert live_processes(result.pid, result.uid) == []


@needs_root
@pytest.mark.parametrize("source", [FORK_LOOP, POPEN_LOOP], ids=["fork_loop", "popen_loop"])
def test_process_count_is_capped_by_the_uid_layer(source):
    """With the guard off the kernel stops the loop: RLIMIT_NPROC counts the run's own uid."""
    result = run_python(source, layers=UID_ONLY, max_processes=6, timeout_s=10)
    assert result.uid is not None, result.isolation
    count, error = result.stdout.split()
    assert error == "BlockingIOError" and 1 <= int(count) <= 5  # 6 tasks: the program and 5 more
    assert live_processes(result.pid, result.uid) == []  # the sleeping children were killed


@needs_root
def test_fork_bomb_under_the_uid_layer_leaves_nothing_behind():
    result = run_python(FORK_BOMB, layers=UID_ONLY, timeout_s=1)
    assert result.uid is not None
    assert live_processes(result.pid, result.uid) == []


@needs_root
def test_grandchild_that_leaves_the_session_is_killed():
    source = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\nprint('parent leaves')"
    result = run_python(source, layers=UID_ONLY, timeout_s=5)
    assert result.stdout == "parent leaves\n" and result.wall_s < 2
    assert live_processes(result.pid, result.uid) == []


@pytest.fixture
def server():
    """A listening TCP server in the test process; yields (port, a function that says whether
    anything connected)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.3)

    def connected() -> bool:
        try:
            listener.accept()[0].close()
        except TimeoutError:
            return False
        return True

    yield listener.getsockname()[1], connected
    listener.close()


def connect_source(port: int) -> str:
    return f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')"


@pytest.mark.parametrize("layers", [LAYERS, GUARD_ONLY], ids=["all_layers", "guard"])
def test_socket_is_refused(server, layers):
    port, connected = server
    result = run_python(connect_source(port), layers=layers)
    assert result.status == "failed" and "connected" not in result.stdout
    assert "PermissionError: sandbox: socket" in last_error(result)
    assert not connected()


@needs_root
def test_network_namespace_alone_refuses_connections(server):
    port, connected = server
    result = run_python(connect_source(port), layers=NETNS_ONLY)
    assert "netns" in result.isolation
    assert result.status == "failed" and "Network is unreachable" in last_error(result)
    assert not connected()


def test_connection_succeeds_without_the_layers(server):
    """The control: the same program reaches the server when no layer is on."""
    port, connected = server
    result = run_python(connect_source(port), layers=())
    assert result.stdout == "connected\n" and connected()


WRITES_OUTSIDE = [
    "open({target!r}, 'w').write('x')",
    "import os\nos.close(os.open({target!r}, os.O_WRONLY | os.O_CREAT))",
    "import pathlib\npathlib.Path({target!r}).write_text('x')",
    "import os\nos.mkdir({target!r})",
    "import os\nopen('inside.txt', 'w').close()\nos.rename('inside.txt', {target!r})",
    "import os\nos.symlink({target!r}, 'link')\nopen('link', 'w').write('x')",
    "import shutil\nopen('inside.txt', 'w').close()\nshutil.copy('inside.txt', {target!r})",
    "import os\nos.chdir(os.path.dirname({target!r}))\nopen(os.path.basename({target!r}), 'w')",
    "import os\nopen(os.path.relpath({target!r}), 'w')",  # ../../..
    "import os\nd = os.open(os.path.dirname({target!r}), os.O_RDONLY)\nos.open('outside.txt', os.O_CREAT, dir_fd=d)",
    "import sqlite3\nsqlite3.connect({target!r}).execute('create table t (x)')",
]


@pytest.mark.parametrize("source", WRITES_OUTSIDE)
def test_writes_outside_the_sandbox_directory_are_refused_by_the_guard(tmp_path, source):
    target = str(tmp_path / "outside.txt")
    result = run_python(source.format(target=target), layers=GUARD_ONLY)
    assert result.status == "failed" and "PermissionError: sandbox:" in last_error(result)
    assert not os.path.lexists(target)


@pytest.mark.parametrize("layers", [LAYERS, pytest.param(UID_ONLY, marks=needs_root)], ids=["all_layers", "uid"])
def test_writes_outside_are_refused(tmp_path, layers):
    target = str(tmp_path / "outside.txt")
    result = run_python(WRITES_OUTSIDE[0].format(target=target), layers=layers)
    assert result.status == "failed" and "PermissionError" in last_error(result)
    assert not os.path.lexists(target)


@pytest.mark.parametrize("layers", [LAYERS, GUARD_ONLY, pytest.param(UID_ONLY, marks=needs_root)], ids=str)
def test_deleting_outside_is_refused(tmp_path, layers):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    result = run_python(f"import os\nos.remove({str(victim)!r})", layers=layers)
    assert result.status == "failed" and "PermissionError" in last_error(result)
    assert victim.read_text() == "keep me"


def test_controls_without_layers(tmp_path):
    """The same writes and a fork succeed with every layer off: the tests above can fail."""
    target = str(tmp_path / "outside.txt")
    assert run_python(WRITES_OUTSIDE[0].format(target=target), layers=()).status == "passed"
    assert os.path.exists(target)
    result = run_python(
        "import os\npid = os.fork()\nos._exit(0) if pid == 0 else print(os.waitpid(pid, 0)[1])", layers=()
    )
    assert result.stdout == "0\n"


def test_grandchild_in_the_process_group_is_killed_without_the_uid_layer():
    """As a non-root evaluator would run it: the group/session kill alone."""
    source = "import os, time\nif os.fork() == 0:\n    time.sleep(60)\nprint('parent leaves')"
    result = run_python(source, layers=(), timeout_s=5)
    assert result.stdout == "parent leaves\n" and result.wall_s < 2
    assert live_processes(result.pid, None) == []


def test_concurrent_runs_are_independent():
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda i: run_python(f"import os\nprint({i}, os.getuid())"), range(8)))
    assert [r.stdout.split()[0] for r in results] == [str(i) for i in range(8)]
    assert all(r.status == "passed" for r in results)
    if ROOT:
        assert len({r.uid for r in results}) == 8


def test_world_writable_directories_are_refused_by_the_guard():
    target = f"/tmp/mpt_jax_sandbox_test_{secrets.token_hex(8)}"
    try:
        result = run_python(f"open({target!r}, 'w').write('x')")
        assert result.status == "failed" and "PermissionError: sandbox:" in last_error(result)
        assert not os.path.lexists(target)
    finally:
        if os.path.lexists(target):
            os.remove(target)


def test_file_size_limit():
    result = run_python("open('big', 'wb').write(bytes(3 * 2**20))", max_file_mb=1)
    assert result.status == "failed" and "File too large" in last_error(result)


def test_invalid_arguments_name_the_problem():
    with pytest.raises(ValueError, match="timeout_s"):
        run_python("pass", timeout_s=0)
    with pytest.raises(ValueError, match="unknown layers.*'seccomp'"):
        run_python("pass", layers=("guard", "seccomp"))


# ----------------------------------------------------------------------------------------------
# check_program: LLM Foundry's code evaluation

# From LLM Foundry's scripts/eval/local_data/programming/human_eval.jsonl (docstrings shortened).
HAS_CLOSE = dict(
    prompt="from typing import List\n\n\ndef has_close_elements(numbers: List[float], threshold: float) -> bool:\n"
    '    """ Check if in given list of numbers, are any two numbers closer to each other than\n'
    '    given threshold. """\n',
    entry_point="has_close_elements",
    test_inputs=[
        "([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.3)",
        "([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.05)",
        "([1.0, 2.0, 5.9, 4.0, 5.0], 0.95)",
        "([1.0, 2.0, 5.9, 4.0, 5.0], 0.8)",
        "([1.0, 2.0, 3.0, 4.0, 5.0, 2.0], 0.1)",
        "([1.1, 2.2, 3.1, 4.1, 5.1], 1.0)",
        "([1.1, 2.2, 3.1, 4.1, 5.1], 0.5)",
    ],
    test_outputs=["True", "False", "True", "False", "True", "True", "False"],
)
HAS_CLOSE_SOLUTION = (
    "    for idx, elem in enumerate(numbers):\n        for idx2, elem2 in enumerate(numbers):\n"
    "            if idx != idx2:\n                distance = abs(elem - elem2)\n"
    "                if distance < threshold:\n                    return True\n\n    return False\n"
)
MAKE_PALINDROME = dict(
    prompt='\n\ndef is_palindrome(string: str) -> bool:\n    """ Test if given string is a palindrome """\n'
    "    return string == string[::-1]\n\n\ndef make_palindrome(string: str) -> str:\n"
    '    """ Find the shortest palindrome that begins with a supplied string. """\n',
    entry_point="make_palindrome",
    test_inputs=["('',)", "('x',)", "('xyz',)", "('xyx',)", "('jerry',)"],
    test_outputs=["", "x", "xyzyx", "xyx", "jerryrrej"],  # no Python literals: compared as strings
)
MAKE_PALINDROME_SOLUTION = (
    "    if not string:\n        return ''\n\n    beginning_of_suffix = 0\n\n"
    "    while not is_palindrome(string[beginning_of_suffix:]):\n        beginning_of_suffix += 1\n\n"
    "    return string + string[:beginning_of_suffix][::-1]\n"
)
STRING_XOR = dict(
    prompt="from typing import List\n\n\ndef string_xor(a: str, b: str) -> str:\n",
    entry_point="string_xor",
    test_inputs=["('111000', '101010')", "('1', '1')", "('0101', '0000')"],
    test_outputs=["010010", "0", "0101"],
)
STRING_XOR_SOLUTION = (
    "    def xor(i, j):\n        if i == j:\n            return '0'\n        else:\n            return '1'\n\n"
    "    return ''.join(xor(x, y) for x, y in zip(a, b))\n"
)


def test_correct_solution_passes_and_wrong_one_fails():
    assert check_program(completion=HAS_CLOSE_SOLUTION, **HAS_CLOSE)
    wrong = HAS_CLOSE_SOLUTION.replace("distance < threshold", "distance > threshold")
    assert not check_program(completion=wrong, **HAS_CLOSE)
    assert not check_program(completion="    return undefined_name\n", **HAS_CLOSE)
    assert not check_program(completion="    return (\n", **HAS_CLOSE)  # a syntax error


def test_outputs_that_are_not_python_are_compared_as_strings():
    assert check_program(completion=MAKE_PALINDROME_SOLUTION, **MAKE_PALINDROME)


def test_outputs_that_are_python_are_evaluated_as_llm_foundry_does():
    """LLM Foundry evaluates "0" to the int 0, which the canonical string_xor ('0') does not equal:
    the canonical solution fails there, and passes the tests whose outputs are not Python."""
    assert not check_program(completion=STRING_XOR_SOLUTION, **STRING_XOR)
    only_strings = dict(STRING_XOR, test_inputs=STRING_XOR["test_inputs"][::2], test_outputs=["010010", "0101"])
    assert check_program(completion=STRING_XOR_SOLUTION, **only_strings)


def test_program_is_cut_where_the_function_ends():
    prompt = "def add(a, b):\n"
    body = "    # add them\n    total = a + b\n\n    return total\n"
    for tail in [
        "\ndef other():\n    pass\n",
        "\nprint(add(1, 2))\n",
        "\n# done\n",
        "\n```\n",
        "\n1/0\n",
        "\nif True: x = 1\n",
    ]:
        assert build_program(prompt, body + tail) == prompt + body
    assert build_program(prompt, body) == prompt + body
    assert build_program(prompt, body + "\n raise SystemExit") == prompt + body + "\n raise SystemExit"
    assert check_program(prompt, body + "\nimport sys\nsys.exit(1)\n", "add", ["(1, 2)"], ["3"])


def test_samples_cannot_fake_a_pass():
    prompt, args = "def add(a, b):\n", dict(entry_point="add", test_inputs=["(1, 2)"], test_outputs=["3"])
    assert not check_program(prompt, "    import sys\n    sys.exit(0)\n", **args)
    assert not check_program(prompt, "    import os\n    os._exit(0)\n", **args)
    assert not check_program(prompt, "    print('PASS')\n    print('x PASS')\n    return 4\n", **args)
    assert check_program(prompt, "    print('FAIL')\n    return 3\n", **args)


def test_hostile_samples_fail_within_the_timeout():
    prompt, args = "def add(a, b):\n", dict(entry_point="add", test_inputs=["(1, 2)"], test_outputs=["3"])
    assert not check_program(prompt, "    while True:\n        pass\n", timeout_s=1, **args)
    assert not check_program(prompt, "    import os\n    os.fork()\n    return 3\n", **args)
    assert not check_program(prompt, "    x = bytearray(2**40)\n    return 3\n", **args)


def test_each_test_case_has_its_own_time_limit_and_module():
    prompt = "import time\ncalls = []\n\ndef f(x):\n"
    args = dict(entry_point="f", test_inputs=["(1,)", "(2,)", "(3,)"], test_outputs=["1", "1", "1"])
    # 3 x 0.6 s in all exceeds the 1 s limit, no test case does; a fresh module each time: calls has 1 item
    assert check_program(
        prompt, "    time.sleep(0.6)\n    calls.append(x)\n    return len(calls)\n", timeout_s=1, **args
    )
    assert not check_program(prompt, "    time.sleep(1.3)\n    return 1\n", timeout_s=1, **args)
    disarm = "    import signal\n    signal.setitimer(signal.ITIMER_REAL, 0)\n    time.sleep(1.3)\n    return 1\n"
    assert not check_program(prompt, disarm, timeout_s=1, **args)  # the elapsed time is checked too


def test_check_program_arguments():
    with pytest.raises(ValueError, match="'javascript'"):
        check_program("", "", "f", [], [], language="javascript")
    with pytest.raises(ValueError, match="2 test_inputs but 1 test_outputs"):
        check_program("", "", "f", ["(1,)", "(2,)"], ["1"])
    assert check_program("def f(:\n", "", "f", [], [])  # no tests: passes, as all([]) does in LLM Foundry


# ----------------------------------------------------------------------------------------------
# pass@k


def exact_pass_at_k(n: int, c: int, k: int) -> Fraction:
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))


def test_pass_at_k_matches_the_exact_fraction():
    for n in range(1, 31):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(float(exact_pass_at_k(n, c, k)), abs=1e-12)
    assert pass_at_k(200, 3, 100) == pytest.approx(float(exact_pass_at_k(200, 3, 100)), rel=1e-12)


def test_pass_at_k_by_hand():
    assert pass_at_k(1, 1, 1) == 1.0 and pass_at_k(1, 0, 1) == 0.0
    assert pass_at_k(2, 1, 1) == 0.5
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the fraction correct
    assert pass_at_k(10, 3, 2) == pytest.approx(1 - 21 / 45)  # 1 - C(7,2)/C(10,2)
    assert pass_at_k(5, 4, 2) == 1.0  # fewer than k wrong samples: any k include a correct one
    assert pass_at_k(20, 0, 10) == 0.0


def test_pass_at_k_arguments():
    with pytest.raises(ValueError, match="c=6"):
        pass_at_k(5, 6, 1)
    with pytest.raises(ValueError, match="k=6"):
        pass_at_k(5, 1, 6)
