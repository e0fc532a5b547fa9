"""Test set-up shared by every test module.

Without a GPU, Triton kernels run on the CPU through Triton's interpreter; the variable must be set
before Triton is first imported, which is why it is set here, at collection time.
"""

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist (the README's test command runs two workers) each worker takes its share of the cores for torch's
# own threads: OpenMP threads that outnumber the cores wait on each other at every small op (see one_torch_thread).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))

# Helpers shared by test modules (e.g. `contract`) are imported by name; pytest's importlib mode
# does not put this folder on sys.path by itself.
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture
def one_torch_thread():
    """Many tiny ops: on shared cores OpenMP's hand-offs cost more than the arithmetic (the digits probe takes ~1 s
    on one thread and ~9 s on two busy ones)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --cpu-durations N: the N tests that used the most CPU time (this process and the subprocesses it waited for),
# setup and teardown included. On a shared machine wall-clock durations measure the neighbours as much as the
# test; CPU seconds are what a test costs on an idle one (for single-threaded tests, about its wall time there).
def pytest_addoption(parser):
    parser.addoption("--cpu-durations", type=int, default=0, metavar="N",
                     help="show the N tests that used the most CPU seconds")


_cpu_seconds: dict[str, float] = {}


def _cpu_now() -> float:
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    start = _cpu_now()
    yield
    _cpu_seconds[item.nodeid] = _cpu_now() - start


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    n = config.getoption("--cpu-durations")
    if n and _cpu_seconds:
        terminalreporter.write_sep("=", f"{n} largest CPU times (s, with waited-for subprocesses)")
        for nodeid, seconds in sorted(_cpu_seconds.items(), key=lambda kv: -kv[1])[:n]:
            terminalreporter.write_line(f"{seconds:8.1f}  {nodeid}")
        terminalreporter.write_line(f"{sum(_cpu_seconds.values()):8.1f}  in all")
