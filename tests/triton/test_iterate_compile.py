"""Every iterate kernel compiles for an H100 (sm_90, bf16) on a machine without a GPU.

The interpreter runs kernels as Python, so it accepts code the compiler rejects (types that
differ between the branches of an `if`, operands a tl.dot cannot take, ...). Compiling ahead of
time with the installed Triton and its bundled ptxas catches those here. The compile runs in a
child process: in this one TRITON_INTERPRET=1 has already turned every kernel into Python."""
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BF16_POINTERS = ("h_ptr", "x0_ptr", "v0_ptr", "xo_ptr", "vo_ptr", "w_h_ptr", "w_x_ptr", "w_v_ptr", "w_o_ptr",
                 "b_o_ptr", "mu_ptr", "trajx_ptr", "trajv_ptr", "gxT_ptr", "gvT_ptr", "dx_ptr", "dv_ptr")
FLOATS = ("dt", "kappa", "tol")


def cases():
    import triton.language as tl

    flags = dict(HAS_V=True, HAS_EXC=True, USE_KAPPA=True, DOT=tl.bfloat16, PREC="ieee", ACC=tl.float32)
    grads = dict(HAS_GX=True, HAS_GV=True, HAS_GE=True, HAS_GD=True)
    return {
        "_iterate_fwd_tile": dict(H=64, BM=16, BD=32, EARLY_EXIT=True, SAVE=True, TRAJ=True, CAST_OUT=True, **flags),
        "_decode_prologue": dict(H=64, BM=16, BD=32, HAS_V=True, TRAJ=True, DOT=tl.bfloat16, PREC="ieee",
                                 ACC=tl.float32),
        "_decode_step": dict(H=64, BM=16, BD=32, EARLY_EXIT=True, TRAJ=True, CAST_OUT=True, **flags),
        "_iterate_bwd_rows": dict(H=64, BM=16, BD=32, **flags, **grads),
        "_iterate_bwd_cols": dict(H=64, BM=16, BD=32, TP=8, **flags, **grads),
    }


def signature(fn, constexprs):
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name == "iters_ptr":
            sig[name] = "*i32"
        elif name.endswith("_ptr"):
            sig[name] = "*bf16" if name in BF16_POINTERS else "*fp32"
        else:
            sig[name] = "fp32" if name in FLOATS else "i32"
    return sig


def compile_all():
    """Child process: compiles each kernel for sm_90 and prints one line per kernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from inl_kernels.triton import iterate

    for name, constexprs in cases().items():
        fn = getattr(iterate, name)
        compiled = triton.compile(ASTSource(fn, signature(fn, constexprs), constexprs),
                                  target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=1))
        assert compiled.asm["cubin"], name
        print("compiled", name, flush=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU compiles the kernels when it runs them")
def test_every_kernel_compiles_for_sm90():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", "from tests.triton.test_iterate_compile import compile_all; "
                           "compile_all()"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and "ptxas" in proc.stderr and "compiled" not in proc.stdout:
        pytest.skip("no usable ptxas in this Triton install: " + proc.stderr.strip().splitlines()[-1])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("compiled") == len(cases())
