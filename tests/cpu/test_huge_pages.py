"""inl_kernels.cpu.huge_pages: a model's memory backed by transparent huge pages in place — the
same storages, pointers and bits, huge pages where the kernel gave them, nothing touched that is
not the process's private anonymous memory, and a clear no-op where THP is off."""
import sys

import pytest
import torch
from torch import nn

from inl_kernels.cpu import pages as hp

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="transparent huge pages are Linux's")


def _huge_kib_of_mapping(address: int) -> int:
    """AnonHugePages (KiB) of the mapping holding `address`, from /proc/self/smaps."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                start, end = (int(x, 16) for x in head.split("-"))
                inside = start <= address < end
            elif inside and line.startswith("AnonHugePages:"):
                return int(line.split()[1])
    return 0


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
    assert report["collapsed"] + report["advised"] + report["skipped"] == report["bytes"] or report["reason"]
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
    t = torch.randn(4 * hp.huge_page_size() // 4, generator=g)  # 4 huge pages' worth
    expected = t.clone()
    report = hp.huge_pages(t)
    assert report["bytes"] == t.numel() * 4 and report["skipped"] == 0 and report["reason"] is None
    assert report["collapsed"] + report["advised"] == report["bytes"]
    if report["collapsed"] == 0:
        pytest.skip("the kernel had no free huge page now (advised only)")
    # at least the three aligned 2 MiB regions that lie wholly inside the tensor are huge pages
    assert _huge_kib_of_mapping(t.data_ptr()) * 1024 >= 3 * hp.huge_page_size()
    assert torch.equal(t, expected)


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
