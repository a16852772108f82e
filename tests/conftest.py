"""Test setup. Without a GPU, Triton kernels run through the interpreter: TRITON_INTERPRET
must be set before triton is first imported, so it is set here, at collection time. Every test
is seeded (the `seeded` fixture)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import random  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from inl_kernels import pin_inductor_vec_isa  # noqa: E402

# torch.compile's on-disk cache (shared by every run on this machine) is keyed on the vector ISA
# inductor generates for: a run under ATEN_CPU_CAPABILITY=avx2 (how the AVX2 machines of CI are
# reproduced here) must not load the code of an AVX-512 run (inl_kernels.common.pin_inductor_vec_isa)
pin_inductor_vec_isa()

# every test starts from the same RNG state; INL_TEST_SEED=k runs the suite under another seed
# (how a test's verdict is checked not to hang on one lucky draw)
SEED = int(os.environ.get("INL_TEST_SEED", "0"))


@pytest.fixture(autouse=True)
def seeded():
    """Seeds torch, numpy and random before every test."""
    torch.manual_seed(SEED)
    np.random.seed(SEED)
    random.seed(SEED)


@pytest.fixture
def one_thread():
    """torch and the C++ ops on one thread for the test: a model run then gives the same bits
    twice even when another process takes a core (on a contended machine the ops' thread
    governor lowers torch's thread count, and torch's matmuls round differently on fewer
    threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("cuda") is not None:  # not `in item.keywords`: that holds tests/cuda/ too
            item.add_marker(skip)
