"""inl_kernels.cpu.huge_pages: a model's memory backed by transparent huge pages in place — the
same storages, pointers and bits, huge pages where the kernel gave them, nothing touched that is
not the process's private anonymous memory, and a clear no-op where THP is off."""
import sys

import pytest
import torch
from torch import nn

from inl_kernels.cpu import pages as hp

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="transparent huge pages are Linux's")


def _huge_bytes_over(start: int, end: int) -> int:
    """AnonHugePages (bytes) of the mappings that overlap [start, end), from /proc/self/smaps
    (madvise splits a mapping where its advice starts, so a tensor may span several)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo < end and start < hi
            elif inside and line.startswith("AnonHugePages:"):
                total += int(line.split()[1]) * 1024
    return total


def test_a_models_weights_keep_their_storages_bits_and_outputs():
    import inl_llm
    torch.manual_seed(0)
    model = inl_llm.create_model("tiny").eval()
    probe = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        before_out = model(probe)[0]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    pointers = [t.data_ptr() for t in list(model.parameters()) + list(model.buffers())]
    report = hp.huge_pages(model)
    # every storage counted once (tied weights share one)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in list(model.parameters()) + list(model.buffers())}
    assert report["bytes"] == sum(storages.values())
    if report["reason"] is None:
        assert report["errors"] == []
        assert sum(report[k] for k in ("collapsed", "advised", "small_pages", "skipped")) == report["bytes"]
    assert pointers == [t.data_ptr() for t in list(model.parameters()) + list(model.buffers())]
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    with torch.no_grad():
        assert torch.equal(model(probe)[0], before_out)


@linux
def test_collapsed_memory_is_on_huge_pages():
    if hp.thp_mode() in ("never", "unavailable"):
        pytest.skip(f"transparent huge pages are {hp.thp_mode()} here")
    g = torch.Generator().manual_seed(1)
    page = hp.huge_page_size()
    t = torch.randn(4 * page // 4, generator=g)  # 4 huge pages' worth
    expected = t.clone()
    report = hp.huge_pages(t)
    assert report["bytes"] == t.numel() * 4 and report["skipped"] == 0 and report["reason"] is None
    assert report["collapsed"] + report["advised"] + report["small_pages"] == report["bytes"]
    if report["collapsed"] == 0:
        pytest.skip("the kernel had no free huge page now (advised only)")
    # what it says is collapsed is on huge pages: whole 2 MiB regions, at least the three that lie
    # wholly inside the tensor
    huge = _huge_bytes_over(t.data_ptr(), t.data_ptr() + t.numel() * 4)
    assert report["collapsed"] >= 3 * page and huge >= report["collapsed"]
    assert torch.equal(t, expected)


@linux
def test_memory_no_huge_page_can_back_is_reported_as_such():
    """A mapping smaller than a huge page (its own mmap, as glibc gives a 1 MiB tensor) has no
    whole 2 MiB region: nothing is collapsed or advised, all of it counted in small_pages."""
    import mmap as mmap_module
    if hp.thp_mode() in ("never", "unavailable"):
        pytest.skip(f"transparent huge pages are {hp.thp_mode()} here")
    import ctypes
    guard = mmap_module.PAGESIZE
    region = mmap_module.mmap(-1, (1 << 20) + 2 * guard, flags=mmap_module.MAP_PRIVATE | mmap_module.MAP_ANONYMOUS)
    # inaccessible pages on both sides: the kernel cannot merge the mapping with a neighbour
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    address = ctypes.addressof(ctypes.c_char.from_buffer(region))
    assert libc.mprotect(address, guard, 0) == 0 and libc.mprotect(address + guard + (1 << 20), guard, 0) == 0
    t = torch.frombuffer(region, dtype=torch.float32, offset=guard, count=(1 << 20) // 4)
    t.fill_(3.0)
    report = hp.huge_pages(t)
    assert report["reason"] is None and report["bytes"] == 1 << 20
    assert report["small_pages"] == 1 << 20 and report["collapsed"] == report["advised"] == 0
    assert torch.equal(t, torch.full_like(t, 3.0))


@linux
@pytest.mark.parametrize("shared", [True, False])
def test_file_mapped_tensors_are_left_alone(tmp_path, shared):
    path = tmp_path / "weights.bin"
    values = torch.arange(3 << 20, dtype=torch.float32)
    values.numpy().tofile(path)
    mapped = torch.from_file(str(path), shared=shared, size=values.numel(), dtype=torch.float32)
    report = hp.huge_pages([mapped])
    if report["reason"] is None:
        assert report["skipped"] == report["bytes"] == values.numel() * 4
        assert report["collapsed"] == report["advised"] == 0
    assert torch.equal(mapped, values)


def test_nothing_is_done_without_proc_maps(monkeypatch):
    def unreadable():
        raise PermissionError("/proc/self/maps: permission denied")
    monkeypatch.setattr(hp, "thp_mode", lambda: "madvise")
    monkeypatch.setattr(hp, "_private_anonymous_mappings", unreadable)
    report = hp.huge_pages(torch.ones(1 << 20))
    assert "permission denied" in report["reason"] and report["collapsed"] == report["advised"] == 0


def test_nothing_is_done_where_huge_pages_are_off(monkeypatch):
    calls = []
    monkeypatch.setattr(hp, "thp_mode", lambda: "never")
    monkeypatch.setattr(hp, "_madvise", lambda: calls.append(1))
    t = torch.ones(1 << 20)
    report = hp.huge_pages(t)
    assert report["collapsed"] == report["advised"] == 0 and report["bytes"] == t.numel() * 4
    assert "never" in report["reason"] or "Linux" in report["reason"]
    assert calls == []


def test_tensors_without_cpu_memory_are_not_counted():
    meta = torch.empty(1000, device="meta")
    empty = torch.empty(0)
    assert hp.huge_pages([meta, empty])["bytes"] == 0
    module = nn.Linear(4, 4, device="meta")
    assert hp.huge_pages(module)["bytes"] == 0


@pytest.mark.parametrize("bad, name", [("weights", "obj"), (3, "obj"), ([torch.zeros(2), "w"], "obj[1]")])
def test_bad_arguments_name_what_is_wrong(bad, name):
    with pytest.raises(TypeError, match=rf"huge_pages: {name.replace('[', '.').replace(']', '.')} must be"):
        hp.huge_pages(bad)
