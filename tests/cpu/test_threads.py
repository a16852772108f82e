"""On a machine with fewer free cores than threads, the CPU ops fall back to one thread (csrc/cpu/
entry.cpp, "threads on a shared machine"). Made deterministic here: a child process pinned to one
CPU, with a busy process pinned beside it, asks for 2 threads; its ops must notice that its
threads wait for the core and drop to 1, unless INL_KERNELS_ADAPTIVE_THREADS=0."""
import os
import subprocess
import sys

import pytest

from inl_kernels.cpu import unavailable_reason

pytestmark = pytest.mark.skipif(unavailable_reason() is not None or not sys.platform.startswith("linux")
                                or not os.path.exists("/proc/self/task"),
                                reason="the cpu backend on Linux (per-thread schedstat)")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CHILD = """
import os, subprocess, sys, time
import torch
from inl_kernels import rms_norm
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])  # inherits the one CPU
try:
    torch.set_num_threads(2)
    x, w = torch.randn(256, 512), torch.ones(512)
    seen, start = [], time.monotonic()
    while time.monotonic() - start < 1.5:
        rms_norm(x, w, backend="cpu")
        seen.append(torch.get_num_threads())
    print(seen[0], min(seen))
finally:
    busy.kill()
"""


@pytest.mark.parametrize("adaptive", ["1", "0"])
def test_contended_cores_make_the_ops_use_one_thread(adaptive):
    env = dict(os.environ, INL_KERNELS_ADAPTIVE_THREADS=adaptive,
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    first, fewest = proc.stdout.split()
    assert first == "2"
    assert fewest == ("1" if adaptive == "1" else "2")


CALLER = """
import os, subprocess, sys, time
import torch
from inl_kernels import rms_norm
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
x, w = torch.randn(256, 512), torch.ones(512)
torch.set_num_threads(2)
start = time.monotonic()
while torch.get_num_threads() != 1 and time.monotonic() - start < 5:
    rms_norm(x, w, backend="cpu")
reduced = torch.get_num_threads() == 1
torch.set_num_threads(1)  # the caller's own choice, equal to what the ops had set
busy.kill()
busy.wait()
seen, start = [], time.monotonic()
while time.monotonic() - start < 3:  # past the 2 s after which the ops try their maximum again
    rms_norm(x, w, backend="cpu")
    seen.append(torch.get_num_threads())
print(reduced, max(seen))
"""


def test_a_count_the_caller_sets_is_kept_even_when_it_equals_the_reduced_one():
    """The ops reduced torch's threads to 1 on a busy core; the caller then sets 1 itself. By the
    count alone that cannot be told from the ops' own setting, and once the load went they raised
    it back to 2: torch.set_num_threads now tells them (inl_kernels.cpu wraps it)."""
    env = dict(os.environ, INL_KERNELS_ADAPTIVE_THREADS="1",
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", CALLER], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    reduced, most = proc.stdout.split()
    assert reduced == "True" and most == "1"
