"""Every iterate kernel compiles for an H100 (sm_90, bf16) on a machine without a GPU.

The interpreter runs kernels as Python, so it accepts code the compiler rejects (types that
differ between the branches of an `if`, operands a tl.dot cannot take, ...). Compiling ahead of
time with the installed Triton and its bundled ptxas catches those here. The compile runs in a
child process: in this one TRITON_INTERPRET=1 has already turned every kernel into Python."""
import pytest
import torch

from tests.triton.sm90 import compile_for_sm90, compile_in_child

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
    from inl_kernels.triton import iterate

    for name, constexprs in cases().items():
        fn = getattr(iterate, name)
        compile_for_sm90(fn, signature(fn, constexprs), constexprs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU compiles the kernels when it runs them")
def test_every_kernel_compiles_for_sm90():
    pytest.importorskip("triton")
    compile_in_child("tests.triton.test_iterate_compile:compile_all", len(cases()))
