"""The C++ backend's kernels are compiled once per instruction set and one path runs at a time
(inl_kernels.cpu.capability()). `each_cpu_path` runs a test on every path this machine can
execute (AVX-512, AVX2 + FMA, baseline), switching with inl_kernels.cpu.set_capability."""
import pytest

from inl_kernels.cpu import unavailable_reason


def _paths():
    if unavailable_reason() is not None:
        return ["unavailable"]
    from inl_kernels.cpu import capabilities
    return capabilities()


@pytest.fixture(params=_paths())
def each_cpu_path(request):
    if request.param == "unavailable":
        pytest.skip(str(unavailable_reason()))
    from inl_kernels.cpu import capability, set_capability
    before = capability()
    set_capability(request.param)
    try:
        yield request.param
    finally:
        set_capability(before)
