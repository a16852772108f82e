"""Ahead-of-time compilation of Triton kernels for an H100 (sm_90) on a machine without a GPU.

The interpreter runs kernels as Python, so it accepts code the compiler rejects (types that
differ between the branches of an `if`, operands a tl.dot cannot take, ...). Compiling with
the installed Triton and its bundled ptxas catches those without a GPU. It runs in a child
process: in the test process TRITON_INTERPRET=1 has already turned every kernel into Python.
"""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def compile_for_sm90(fn, signature, constexprs, num_warps=4, num_stages=1, label=""):
    """Child side: compiles one kernel to a cubin and prints one 'compiled' line."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    compiled = triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    assert compiled.asm["cubin"], fn.__name__
    print("compiled", fn.__name__, label, flush=True)


def compile_in_child(entry: str, expected: int):
    """Test side: runs `entry` ("tests.triton.module:function") in a child process without
    the interpreter and checks it compiled `expected` kernels; skips if Triton has no ptxas."""
    module, function = entry.split(":")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", f"from {module} import {function}; {function}()"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0 and "ptxas" in proc.stderr and "compiled" not in proc.stdout:
        pytest.skip("no usable ptxas in this Triton install: " + proc.stderr.strip().splitlines()[-1])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("compiled") == expected
