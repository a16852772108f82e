"""The iterate's documented maximum step count, on the compiled CPU backend (issue: a huge
num_iterations once crashed the process)."""
import os
import subprocess
import sys

import pytest

from inl_kernels.cpu import unavailable_reason

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))


def test_iteration_count_beyond_the_maximum_is_an_error_not_a_signal():
    """num_iterations = 2**33 once killed the process (SIGFPE: truncated to 0), 2**32 + 3 ran 3
    steps and 2**31 + 5 raised std::bad_alloc. Now a documented maximum is checked by the Python
    validation (ValueError naming the argument) and again by the extension (RuntimeError, its
    check of its own: the ops' arguments pass no Python check). Run in a child process, which
    must end normally whatever happens."""
    from inl_kernels import MAX_ITERATIONS
    from inl_kernels.cpu import _C
    assert MAX_ITERATIONS == _C.iterate_max_iterations
    code = f"""
import torch, inl_kernels
from inl_kernels.cpu import _C
from tests.iterate_cases import make_args
h, x, kw = make_args(n=3, d=8, H=4, E=1, T=2, dtype=torch.float32)
for T in (2**33, 2**32 + 3, 2**31 + 5, {_C.iterate_max_iterations + 1}):
    try:
        inl_kernels.inl_iterate(h, x, **dict(kw, num_iterations=T), backend="cpu")
        print("ran", T)
    except ValueError as e:
        print("ValueError", "num_iterations" in str(e))
    bias, mod = kw["b_h"] + kw["b_x"] + kw["b_v"], torch.cat((kw["mod_scale"], kw["mod_bias"]))
    try:  # the extension on its own
        _C.iterate_forward(h, x, None, kw["w_h"], kw["w_x"], kw["w_v"], kw["w_o"], bias, kw["b_o"], mod, kw["mu"],
                           None, 0.1, None, T, None, 0, False)
        print("ran", T)
    except RuntimeError as e:
        print("RuntimeError", "num_iterations" in str(e))
"""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert proc.stdout.split() == ["ValueError", "True", "RuntimeError", "True"] * 4, proc.stdout
