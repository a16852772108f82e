"""keep_freed_memory(): glibc keeps freed memory for reuse, so a step's large buffers stop costing
a page fault per page. Process-wide and one-way: every case that applies it runs in a fresh
interpreter; the minor-fault counter (getrusage) is the measure, not a time."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from inl_kernels.cpu import memory

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GLIBC = memory._glibc()[0] is not None


def run_child(code, **env):
    full = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "python"),
                                                       os.environ.get("PYTHONPATH", "")]), **env)
    for name in ("INL_KERNELS_KEEP_FREED_MEMORY", "THP_MEM_ALLOC_ENABLE", "LD_PRELOAD"):
        full.pop(name, None)  # THP_MEM_ALLOC_ENABLE: torch would back the buffers with huge pages
    full.update(env)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=full, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc


# three 8 MiB buffers alive at once, then freed, round after round: the pattern of SwiGLU's gate,
# up and product in a forward. Prints the minor faults of each round.
ROUNDS = """
import resource, torch
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
counts = []
for _ in range(10):
    before = faults()
    bufs = [torch.empty(2 ** 21) for _ in range(3)]  # 8 MiB of float32 each
    for b in bufs:
        b.fill_(1.0)  # touch every page
    del bufs
    counts.append(faults() - before)
print(*counts)
"""


def _huge_pages_always() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[always]" in f.read()
    except OSError:
        return False


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
@pytest.mark.skipif(_huge_pages_always(),
                    reason="transparent huge pages always on: faults are not counted in 4 KiB pages")
@pytest.mark.parametrize("mmap_mib", [32, 1])
def test_kept_memory_is_reused_without_page_faults(mmap_mib):
    """After keep_freed_memory() the first round faults its 24 MiB in (3 × 2048 pages of 4 KiB)
    and, once the heap has settled (a few rounds here), no round faults. The control: with a
    1 MiB mmap threshold each buffer is its own mapping, unmapped at its free, and every round
    faults all its pages in again, so the counter sees what the threshold decides."""
    proc = run_child(f"from inl_kernels.cpu import keep_freed_memory, memory_info\n"
                     f"assert keep_freed_memory(mmap_threshold_mib={mmap_mib}) is True\n"
                     f"info = memory_info()\n"
                     f"assert info == dict(malloc='keep', mmap_threshold_mib={mmap_mib}, "
                     f"trim_threshold_mib=1024), info\n"
                     + ROUNDS)
    counts = list(map(int, proc.stdout.split()))
    pages = 3 * (8 << 20) // os.sysconf("SC_PAGE_SIZE")
    assert counts[0] >= 0.9 * pages, counts
    if mmap_mib == 1:
        assert min(counts) >= 0.9 * pages, counts
    else:
        assert max(counts[-4:]) < 64, counts


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_environment_variable_applies_it_at_import_and_a_bad_value_warns():
    code = ("import warnings\nwarnings.simplefilter('always')\nimport inl_kernels\n"
            "from inl_kernels.cpu import info\nprint(info()['malloc'])\n")
    assert run_child(code, INL_KERNELS_KEEP_FREED_MEMORY="1").stdout.split() == ["keep"]
    assert run_child(code, INL_KERNELS_KEEP_FREED_MEMORY="0").stdout.split() == ["default"]
    proc = run_child(code, INL_KERNELS_KEEP_FREED_MEMORY="yes")
    assert proc.stdout.split() == ["default"]
    assert "INL_KERNELS_KEEP_FREED_MEMORY must be 0 or 1, got 'yes'" in proc.stderr


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_the_cli_applies_it_unless_told_not_to():
    code = ("from inl_llm import cli\nfrom inl_kernels.cpu import memory_info\n"
            "cli._process_setup()\nprint(memory_info()['malloc'])\n")
    assert run_child(code).stdout.split() == ["keep"]
    assert run_child(code, INL_KERNELS_KEEP_FREED_MEMORY="0").stdout.split() == ["default"]
    assert run_child(code, INL_KERNELS_KEEP_FREED_MEMORY="off").stdout.split() == ["default"]  # warned, left alone


@pytest.mark.parametrize("kwargs, name", [
    (dict(mmap_threshold_mib=33), "mmap_threshold_mib"), (dict(mmap_threshold_mib=0), "mmap_threshold_mib"),
    (dict(trim_threshold_mib=2048), "trim_threshold_mib"), (dict(trim_threshold_mib=1.5), "trim_threshold_mib"),
    (dict(mmap_threshold_mib=True), "mmap_threshold_mib")])
def test_bad_thresholds_raise_before_changing_anything(kwargs, name, monkeypatch):
    calls = []
    monkeypatch.setattr(memory, "_glibc", lambda: calls.append(1) or (None, "not reached"))
    before = memory.memory_info()
    with pytest.raises(ValueError, match=name):
        memory.keep_freed_memory(**kwargs)
    assert calls == [] and memory.memory_info() == before


def test_a_preloaded_allocator_or_another_platform_is_left_alone(monkeypatch):
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    assert memory._glibc() == (None, "another allocator is preloaded (LD_PRELOAD=/usr/lib/x86_64-linux-gnu/"
                                     "libjemalloc.so.2)")
    monkeypatch.delenv("LD_PRELOAD")
    monkeypatch.setattr(memory.sys, "platform", "win32")
    assert memory._glibc() == (None, "mallopt is glibc's; this is win32")


def test_without_glibc_it_does_nothing_and_says_why(monkeypatch):
    monkeypatch.setattr(memory, "_state", {"applied": None})
    monkeypatch.setattr(memory, "_glibc", lambda: (None, "the C library is not glibc (mallopt is glibc's)"))
    assert memory.keep_freed_memory() is False
    assert memory.memory_info() == {"malloc": "unchanged: the C library is not glibc (mallopt is glibc's)"}
