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


@pytest.fixture
def one_thread():
    """torch and the C++ ops on one thread for the test: a model run then gives the same bits
    twice even when another process takes a core (on a contended machine the ops' thread
    governor lowers torch's thread count, and torch's matmuls round differently on fewer
    threads)."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
