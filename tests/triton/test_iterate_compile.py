"""Every iterate kernel compiles for an H100 (sm_90; bf16, fp16 and fp32 activations) on a machine without
a GPU.

The interpreter runs kernels as Python, so it accepts code the compiler rejects (types that
differ between the branches of an `if`, operands a tl.dot cannot take, ...). Compiling ahead of
time with the installed Triton and its bundled ptxas catches those here. The compile runs in a
child process: in this one TRITON_INTERPRET=1 has already turned every kernel into Python."""
import pytest
import torch

from tests.triton.sm90 import compile_for_sm90, compile_in_child

ACTIVATION_POINTERS = ("h_ptr", "x0_ptr", "v0_ptr", "xo_ptr", "vo_ptr", "w_h_ptr", "w_x_ptr", "w_v_ptr",
                       "w_o_ptr", "b_o_ptr", "mu_ptr", "trajx_ptr", "trajv_ptr", "gxT_ptr", "gvT_ptr", "dx_ptr",
                       "dv_ptr")
FLOATS = ("dt", "kappa", "tol")


def cases():
    """(kernel name, constexprs, activation pointer type) for bf16 and fp16 activations (dots
    in that dtype) and fp32 (tf32x3 dots), as the launcher's `_dot_types` picks them."""
    import triton.language as tl

    grads = dict(HAS_GX=True, HAS_GV=True, HAS_GE=True, HAS_GD=True)
    out = []
    for ptr, dot, prec, cast_out in (("*bf16", tl.bfloat16, "ieee", True), ("*fp16", tl.float16, "ieee", True),
                                     ("*fp32", tl.float32, "tf32x3", False)):
        types = dict(DOT=dot, PREC=prec, ACC=tl.float32)
        flags = dict(HAS_V=True, HAS_EXC=True, USE_KAPPA=True, **types)
        out += [
            ("_iterate_fwd_tile", dict(H=64, BM=64, BD=64, EARLY_EXIT=True, SAVE=True, TRAJ=True,
                                       CAST_OUT=cast_out, **flags), ptr),
            ("_decode_prologue", dict(H=64, BM=16, BD=64, HAS_V=True, TRAJ=True, **types), ptr),
            ("_decode_step", dict(H=64, BM=16, BD=64, EARLY_EXIT=True, TRAJ=True, CAST_OUT=cast_out, **flags), ptr),
            ("_iterate_bwd_rows", dict(H=64, BM=16, BD=32, **flags, **grads), ptr),
            ("_iterate_bwd_cols", dict(H=64, BM=16, BD=32, TP=8, **flags, **grads), ptr),
        ]
    return out


def signature(fn, constexprs, activation_ptr):
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name == "iters_ptr":
            sig[name] = "*i32"
        elif name.endswith("_ptr"):
            sig[name] = activation_ptr if name in ACTIVATION_POINTERS else "*fp32"
        else:
            sig[name] = "fp32" if name in FLOATS else "i32"
    return sig


def compile_all():
    """Child process: compiles each kernel for sm_90 and prints one line per kernel."""
    from inl_kernels.triton import iterate

    for name, constexprs, activation_ptr in cases():
        fn = getattr(iterate, name)
        compile_for_sm90(fn, signature(fn, constexprs, activation_ptr), constexprs, label=activation_ptr)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU compiles the kernels when it runs them")
def test_every_kernel_compiles_for_sm90():
    pytest.importorskip("triton")
    compile_in_child("tests.triton.test_iterate_compile:compile_all", len(cases()))
