"""The sandbox that runs model-written programs (kvflow.tts.sandbox): a correct solution passes;
a loop, a fork bomb and an unbounded allocation are stopped and count as failures; the network and
the host's files are out of reach."""
from __future__ import annotations

import os

import pytest

from kvflow.tts.sandbox import SandboxLimits, run_program, sandbox_setup

LIMITS = SandboxLimits(cpu_seconds=1, wall_seconds=3, memory_bytes=512 << 20)

SOLUTION = '''
def add(a, b):
    return a + b

def check(candidate):
    assert candidate(2, 3) == 5
    assert candidate(-1, 1) == 0

check(add)
'''


def test_a_correct_solution_passes_and_a_wrong_one_fails():
    assert run_program(SOLUTION, LIMITS).passed
    wrong = run_program(SOLUTION.replace("a + b", "a - b"), LIMITS)
    assert wrong.status == "failed" and "AssertionError" in wrong.output


@pytest.mark.parametrize("name, source, statuses", [
    ("loop", "while True:\n    pass\n", {"killed", "timeout"}),
    ("fork bomb", "import os\nwhile True:\n    os.fork()\n", {"failed", "killed"}),
    ("allocation", "blocks = []\nwhile True:\n    blocks.append(bytearray(1 << 26))\n", {"failed", "killed"}),
])
def test_bombs_are_stopped_and_fail(name, source, statuses):
    result = run_program(source, LIMITS)
    assert not result.passed and result.status in statuses, (name, result)
    assert result.seconds < LIMITS.wall_seconds + 2


def test_a_program_that_waits_is_killed_at_the_wall_clock_limit():
    result = run_program("import time\ntime.sleep(60)\n", SandboxLimits(wall_seconds=0.5))
    assert result.status == "timeout"


def test_no_network_and_no_host_writes():
    net = run_program("import socket\nsocket.create_connection(('127.0.0.1', 22), timeout=1)\n", LIMITS)
    assert net.status == "failed" and ("unreachable" in net.output or "refused" in net.output
                                       or "disabled" in net.output), net.output
    if sandbox_setup()[1] is not None:  # run as root, the child is `nobody`: root's files are out of reach
        home = os.path.expanduser("~")
        assert not run_program(f"open({home + '/kvflow-escape'!r}, 'w')\n", LIMITS).passed
        assert not os.path.exists(home + "/kvflow-escape")
    here = run_program("open('scratch.txt', 'w').write('ok')\nprint(open('scratch.txt').read())\n", LIMITS)
    assert here.passed and "ok" in here.output
