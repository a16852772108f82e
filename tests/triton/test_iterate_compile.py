"""Every iterate kernel compiles for an H100 (sm_90; bf16, fp16 and fp32 activations) on a machine without
a GPU, with every feature switched on and the masked (not EVEN) block edges.

The interpreter runs kernels as Python, so it accepts code the compiler rejects (types that
differ between the branches of an `if`, operands a tl.dot cannot take, ...). Compiling ahead of
time with the installed Triton and its bundled ptxas catches those here. The compile runs in a
child process: in this one TRITON_INTERPRET=1 has already turned every kernel into Python.
tests/triton/test_kernel_report.py holds the kernels to their register budget."""
import pytest
import torch

from tests.triton.sm90 import compile_for_sm90, compile_in_child


def cases():
    """(kernel name, constexprs, activation pointer type, num_warps) for bf16 and fp16 activations
    (dots in that dtype) and fp32 (tf32x3 dots), as the launcher's `_dot_types` picks them, at
    the block shapes the dispatch launches on a GPU."""
    import triton.language as tl

    from inl_kernels.triton import iterate

    tile = iterate._tile_config(2048, 64, gpu=True)
    dec = iterate._decode_config(2048, 64, gpu=True)
    grads = dict(HAS_GX=True, HAS_GV=True, HAS_GE=True, HAS_GD=True)
    out = []
    for ptr, dot, prec, cast, dtype in (("*bf16", tl.bfloat16, "ieee", True, torch.bfloat16),
                                        ("*fp16", tl.float16, "ieee", True, torch.float16),
                                        ("*fp32", tl.float32, "tf32x3", False, torch.float32)):
        types = dict(DOT=dot, PREC=prec, ACC=tl.float32)
        flags = dict(HAS_V=True, HAS_EXC=True, USE_KAPPA=True, EVEN=False, **types)
        bwd = iterate._backward_config(16384, 2048, 64, torch.device("cpu"), None, gpu=True, dtype=dtype)
        out += [
            ("_fwd_prologue", dict(H=64, BM=tile["BM"], BD=tile["BD"], HAS_V=True, TRAJ=True, SINGLE=True,
                                   EVEN=False, **types), ptr, tile["num_warps"]),
            ("_fwd_prologue", dict(H=64, BM=dec["BM"], BD=dec["BD"], HAS_V=True, TRAJ=True, SINGLE=False,
                                   EVEN=False, **types), ptr, dec["num_warps"]),
            ("_tile_step", dict(H=64, BM=tile["BM"], BD=tile["BD"], EARLY_EXIT=True, SAVE=True, SAVE_DOT=cast,
                                TRAJ=True, FINAL_OUT=cast, I32=False, **flags), ptr, tile["num_warps"]),
            ("_compact_rows", dict(CHUNK=1024), ptr, 4),
            ("_copy_stopped", dict(BM=16, BD=128), ptr, 4),
            ("_decode_reduce", dict(H=64, BM=dec["BM"], HC=2, BATCH=16, USE_KAPPA=True, EARLY_EXIT=True,
                                    ACC=tl.float32), ptr, 4),
            ("_decode_step", dict(H=64, BM=dec["BM"], BD=dec["BD"], EARLY_EXIT=True, TRAJ=True, FINAL_OUT=cast,
                                  **{k: v for k, v in flags.items() if k != "USE_KAPPA"}), ptr, dec["num_warps"]),
            ("_bwd_rows", dict(H=64, BM=bwd["BM"], BD=bwd["BD"], LAST_SAVED=cast, SAVE_DOT=cast, DEFER=False, DC=128,
                               REREAD=False, **flags, **grads), ptr, bwd.get("num_warps", 4)),
            # the chunked dL/dc of H = 128 (compiled here at H = 64: the code path, not the fit)
            ("_bwd_rows", dict(H=64, BM=bwd["BM"], BD=bwd["BD"], LAST_SAVED=cast, SAVE_DOT=cast, DEFER=True, DC=128,
                               REREAD=True, **flags, **grads), ptr, bwd.get("num_warps", 4)),
            # fp32 compiles the weight tiles re-read where used, bf16/fp16 held (both branches)
            ("_bwd_cols", dict(H=64, BM=bwd["BM2"], BD=bwd["BD2"], TP=8,
                               RELOAD_W=iterate._reload_bwd_weights(64, dtype), **flags, **grads),
             ptr, bwd.get("num_warps2", 4)),
        ]
    # fp32's own forward blocks: 128 × 8 over 8 warps at H <= 32, 64 × 8 over 8 warps at H = 128
    types = dict(DOT=tl.float32, PREC="tf32x3", ACC=tl.float32)
    flags = dict(HAS_V=True, HAS_EXC=True, EVEN=False, **types)
    for H in (32, 128):
        cfg = iterate._tile_config(2048, H, gpu=True, dtype=torch.float32)
        out += [
            ("_tile_step", dict(H=H, BM=cfg["BM"], BD=cfg["BD"], EARLY_EXIT=True, SAVE=True, SAVE_DOT=False, TRAJ=True,
                                FINAL_OUT=False, I32=False, USE_KAPPA=True, **flags), "*fp32", cfg["num_warps"]),
            ("_decode_step", dict(H=H, BM=cfg["BM"], BD=cfg["BD"], EARLY_EXIT=True, TRAJ=True, FINAL_OUT=False,
                                  **flags), "*fp32", cfg["num_warps"]),
        ]
    return out


def compile_all():
    """Child process: compiles each kernel for sm_90 and prints one line per kernel."""
    from benchmarks.kernel_report import signature
    from inl_kernels.triton import iterate

    for name, constexprs, activation_ptr, warps in cases():
        fn = getattr(iterate, name)
        compile_for_sm90(fn, signature(fn, constexprs, activation_ptr), constexprs, num_warps=warps,
                         label=activation_ptr)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU compiles the kernels when it runs them")
def test_every_kernel_compiles_for_sm90():
    pytest.importorskip("triton")
    compile_in_child("tests.triton.test_iterate_compile:compile_all", len(cases()))
