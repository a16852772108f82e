"""Test setup. Without a GPU, Triton kernels run through the interpreter: TRITON_INTERPRET
must be set before triton is first imported, so it is set here, at collection time."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("cuda") is not None:  # not `in item.keywords`: that holds tests/cuda/ too
            item.add_marker(skip)
