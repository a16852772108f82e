"""Triton GQA attention against the reference, forward and backward.

Without a GPU the kernels run through the Triton interpreter with 16×16 tiles, so the shapes
below cross tile borders (S = 21, 33, 37, 40), cover GQA ratios 1, 4 and MQA, decode with
Sq < Skv (queries at the end of the keys) and the split-KV decode path. The interpreter's
bf16 dot is wrong, so bf16 is checked on a GPU only (`cuda` marker).
"""
import math

import pytest
import torch

from inl_kernels import gqa_attention, rope, rope_tables
from inl_kernels.triton import attention as tri_attention
from tests.triton.sm90 import compile_for_sm90, compile_in_child

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
interpreter_only = pytest.mark.skipif(GPU, reason="float64 runs through the interpreter only")


def make_inputs(B, Hq, Hkv, Sq, Skv, D, dtype=torch.float32, seed=0, layout="bshd", device=DEVICE):
    """q, k, v with requires_grad. layout="bshd" gives the transposed views of [B, S, H, D]
    projections that the model passes (unit stride in the last dim only)."""
    g = torch.Generator().manual_seed(seed)

    def make(H, S):
        if layout == "bshd":
            t = torch.randn(B, S, H, D, generator=g, dtype=torch.float64).to(dtype).to(device).transpose(1, 2)
        else:
            t = torch.randn(B, H, S, D, generator=g, dtype=torch.float64).to(dtype).to(device)
        return t.requires_grad_()

    return make(Hq, Sq), make(Hkv, Skv), make(Hkv, Skv)


def run(backend, q, k, v, do, **kw):
    """(out, dq, dk, dv) of one backend, gradients of <out, do>."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = gqa_attention(q, k, v, backend=backend, **kw)
    out.backward(do)
    return out.detach(), q.grad, k.grad, v.grad


def assert_all_close(got, want, tol):
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


CASES = [  # B, Hq, Hkv, Sq, Skv, D
    (2, 4, 4, 37, 37, 16),  # GQA ratio 1, S not a multiple of the tile
    (2, 4, 1, 37, 37, 16),  # MQA
    (1, 8, 2, 21, 21, 32),  # GQA ratio 4
    (2, 4, 1, 5, 40, 16),  # a few queries against a longer cache (offset 35)
    (1, 4, 4, 1, 40, 32),  # decode, one query
    (1, 8, 2, 1, 33, 16),  # decode, GQA 4
    (1, 2, 1, 17, 17, 64),  # head dim 64
    (1, 2, 2, 1, 1, 16),  # a single position
]


@pytest.mark.parametrize("use_rope", [False, True], ids=["norope", "rope"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}_Hq{}_Hkv{}_Sq{}_Skv{}_D{}".format(*c))
def test_matches_reference_fp32(case, causal, use_rope):
    B, Hq, Hkv, Sq, Skv, D = case
    q, k, v = make_inputs(*case)
    do = torch.randn(B, Hq, Sq, D, device=DEVICE)
    kw = dict(causal=causal, rope=rope_tables(Skv + 3, D, device=DEVICE) if use_rope else None)
    assert_all_close(run("triton", q, k, v, do, **kw), run("reference", q, k, v, do, **kw), 2e-5)


@pytest.mark.parametrize("D,use_rope", [(15, False), (2, True), (40, True)])
def test_head_dims_that_are_not_powers_of_two(D, use_rope):
    q, k, v = make_inputs(1, 4, 2, 19, 19, D, layout="bhsd")
    do = torch.randn(1, 4, 19, D, device=DEVICE)
    kw = dict(causal=True, rope=rope_tables(19, D, device=DEVICE) if use_rope else None, scale=0.37)
    assert_all_close(run("triton", q, k, v, do, **kw), run("reference", q, k, v, do, **kw), 2e-5)


@pytest.mark.parametrize("Sq", [1, 4, 20])
@pytest.mark.parametrize("num_splits", [1, 2, 3, 50])
def test_split_kv_decode(Sq, num_splits):
    """The split-KV path (partials per key range, combined by a second kernel) against the
    reference. With Sq = 20 (causal) the last key range holds no key that the first rows see."""
    B, Hq, Hkv, Skv, D = 2, 8, 2, 45, 32
    q, k, v = make_inputs(B, Hq, Hkv, Sq, Skv, D, seed=Sq)
    cos, sin = rope_tables(Skv, D, device=DEVICE)
    q2, k2, v2 = (t.detach().requires_grad_() for t in (q, k, v))
    out = tri_attention.attention(q2, k2, v2, True, None, (cos, sin), num_splits=num_splits)
    do = torch.randn_like(out)
    out.backward(do)
    want = run("reference", q, k, v, do, causal=True, rope=(cos, sin))
    assert_all_close((out.detach(), q2.grad, k2.grad, v2.grad), want, 2e-5)


# the interpreter (numpy) warns about exp2 overflowing on masked-out scores, which are then discarded
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("causal,num_splits", [(True, None), (True, 3), (False, None)])
def test_scores_far_below_zero(causal, num_splits):
    """Softmax is shift invariant: scores around -360 (2^-520: zero in fp32 unless every
    exponent is taken against the true running max, and a padded key scoring 0 would overflow)
    give the reference's answer, also when a key range holds no visible key for some rows
    (split-KV, Sq = 20) and when the last key tile is partly padding (Skv = 45)."""
    q, k, v = make_inputs(1, 4, 2, 20, 45, 32, seed=10)
    with torch.no_grad():
        q += 8
        k -= 8
    q2, k2, v2 = (t.detach().requires_grad_() for t in (q, k, v))
    out = tri_attention.attention(q2, k2, v2, causal, None, None, num_splits=num_splits)
    do = torch.randn_like(out)
    out.backward(do)
    want = run("reference", q, k, v, do, causal=causal)
    # scores of magnitude 360 carry fp32 rounding of ~4e-5 into the exponentials
    assert_all_close((out.detach(), q2.grad, k2.grad, v2.grad), want, 1e-3)


def test_decode_equals_the_last_rows_of_the_full_sequence():
    """Queries at the end of the keys: attending the last Sq queries against the whole cache
    gives the last Sq rows of the full causal attention (rope positions included)."""
    q, k, v = make_inputs(1, 8, 2, 29, 29, 16, seed=3)
    cos, sin = rope_tables(32, 16, device=DEVICE)
    with torch.no_grad():
        full = gqa_attention(q, k, v, rope=(cos, sin), backend="triton")
        for Sq in (1, 3, 17):
            dec = gqa_attention(q[:, :, -Sq:], k, v, rope=(cos, sin), backend="triton")
            torch.testing.assert_close(dec, full[:, :, -Sq:], rtol=2e-6, atol=2e-6)


def test_rope_fused_equals_rope_applied_outside():
    """rope=(cos, sin) inside the op equals the RoPE op followed by attention without rope,
    forward and backward (the backward rotates dq, dk back to the unrotated inputs)."""
    q, k, v = make_inputs(2, 4, 2, 13, 30, 32, seed=4)
    cos, sin = rope_tables(40, 32, device=DEVICE)
    do = torch.randn(2, 4, 13, 32, device=DEVICE)
    fused = run("triton", q, k, v, do, rope=(cos, sin))

    q2, k2, v2 = (t.detach().requires_grad_() for t in (q, k, v))
    # the keys sit at 0..Skv-1 and the queries at Skv-Sq..Skv-1
    _, rk = rope(k2, k2, cos, sin, 0, backend="triton")
    rq, _ = rope(q2, q2[:, :2, :, :], cos, sin, 30 - 13, backend="triton")
    out = gqa_attention(rq, rk, v2, backend="triton")
    out.backward(do)
    assert_all_close(fused, (out.detach(), q2.grad, k2.grad, v2.grad), 2e-5)


def test_deterministic():
    """No atomics anywhere: the same inputs give the same bits, forward and backward."""
    q, k, v = make_inputs(1, 8, 2, 23, 23, 16, seed=5)
    do = torch.randn(1, 8, 23, 16, device=DEVICE)
    kw = dict(rope=rope_tables(23, 16, device=DEVICE))
    first, second = run("triton", q, k, v, do, **kw), run("triton", q, k, v, do, **kw)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_fp16_error_within_the_references_own():
    """fp16 inputs: the kernel's error against an fp64 computation is at most twice the
    reference's own fp16 error (plus a rounding unit), forward and backward."""
    q, k, v = make_inputs(1, 4, 1, 27, 27, 32, dtype=torch.float16, seed=6)
    cos, sin = rope_tables(27, 32, device=DEVICE)
    do = torch.randn(1, 4, 27, 32, device=DEVICE).half()
    got = run("triton", q, k, v, do, rope=(cos, sin))
    ref = run("reference", q, k, v, do, rope=(cos, sin))
    truth = run("reference", q.double(), k.double(), v.double(), do.double(),
                rope=(cos.double(), sin.double()))
    for name, a, r, t in zip(("out", "dq", "dk", "dv"), got, ref, truth):
        assert a.dtype == torch.float16
        err, ref_err = (a.double() - t).abs().max().item(), (r.double() - t).abs().max().item()
        assert err <= 2 * ref_err + 1e-3, f"{name}: {err} vs reference {ref_err}"


@interpreter_only
@pytest.mark.parametrize("case,causal", [((1, 4, 2, 7, 19, 8), True), ((2, 3, 1, 18, 18, 31), False),
                                         ((1, 6, 3, 1, 37, 16), True)])
def test_fp64_tight(case, causal):
    B, Hq, Hkv, Sq, Skv, D = case
    q, k, v = make_inputs(*case, dtype=torch.float64, layout="bhsd", seed=7)
    do = torch.randn(B, Hq, Sq, D, dtype=torch.float64)
    kw = dict(causal=causal, rope=rope_tables(Skv, D, dtype=torch.float64) if D % 2 == 0 else None)
    assert_all_close(run("triton", q, k, v, do, **kw), run("reference", q, k, v, do, **kw), 1e-11)


@interpreter_only
def test_gradcheck():
    g = torch.Generator().manual_seed(8)
    q = torch.randn(1, 4, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    cos, sin = rope_tables(8, 4, dtype=torch.float64)
    fn = lambda a, b, c: gqa_attention(a, b, c, rope=(cos, sin), backend="triton")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)


@pytest.mark.parametrize("B,Sq,Skv", [(0, 3, 3), (1, 0, 4), (1, 0, 0)])
def test_empty_inputs(B, Sq, Skv):
    q, k, v = make_inputs(B, 2, 1, Sq, Skv, 8)
    out = gqa_attention(q, k, v, backend="triton")
    out.sum().backward()
    assert out.shape == (B, 2, Sq, 8) and not k.grad.any() and not v.grad.any()


def test_what_the_kernel_cannot_run_is_refused_with_a_reason():
    q = torch.randn(1, 1, 2, 258, device=DEVICE)
    with pytest.raises(ValueError, match="head dims above 256"):
        gqa_attention(q, q, q, backend="triton")
    q = torch.randn(1, 1, 2, 8, device=DEVICE)
    cos, sin = rope_tables(4, 8, device=DEVICE)
    with pytest.raises(ValueError, match="rope tables"):
        gqa_attention(q, q, q, rope=(cos.requires_grad_(), sin), backend="triton")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", [(2, 8, 2, 300, 300, 64), (1, 8, 1, 257, 257, 128), (2, 8, 2, 1, 1000, 128),
                                  (1, 4, 4, 7, 515, 64)])
def test_gpu_low_precision(case, dtype):
    """bf16/fp16 on a GPU (dots in the input dtype): error against fp64 within a small multiple
    of the reference's own low-precision error."""
    B, Hq, Hkv, Sq, Skv, D = case
    q, k, v = make_inputs(*case, dtype=dtype, seed=9)
    cos, sin = rope_tables(Skv, D, device="cuda")
    do = torch.randn(B, Hq, Sq, D, device="cuda").to(dtype)
    got = run("triton", q, k, v, do, rope=(cos, sin))
    ref = run("reference", q, k, v, do, rope=(cos, sin))
    truth = run("reference", q.double(), k.double(), v.double(), do.double(), rope=(cos.double(), sin.double()))
    for name, a, r, t in zip(("out", "dq", "dk", "dv"), got, ref, truth):
        err, ref_err = (a.double() - t).abs().max().item(), (r.double() - t).abs().max().item()
        assert err <= 3 * ref_err + 1e-2 * math.sqrt(D / 64), f"{name}: {err} vs reference {ref_err}"


def compile_cases():
    """Child process: compiles every attention kernel for sm_90 (H100) with the launcher's own
    bf16 tile configs, for both sides of each constexpr branch, and prints one line per kernel."""
    import triton.language as tl

    gpu = type("Device", (), {"type": "cuda"})()
    fp32_ptrs = ("LSE", "DELTA", "COS", "SIN", "O_PART", "M_PART", "L_PART")
    bf16_ptrs = ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")
    for D, causal, use_rope, ranges in ((128, True, True, True), (64, False, False, False)):
        half, bh, bd = D // 2, max(16, D // 2), D
        flags = dict(D=D, HALF=half, BLOCK_H=bh, BLOCK_D=bd, CAUSAL=causal, ROPE=use_rope, HAS_LENS=ranges,
                     HAS_STARTS=ranges, DOT=tl.bfloat16, ACC=tl.float32)
        bm, bn, warps, stages = tri_attention._config(D, gpu, torch.bfloat16)
        bbm, bbn, bwarps, bstages = tri_attention._config(D, gpu, torch.bfloat16, backward=True)
        cases = [
            (tri_attention._attn_forward, dict(BLOCK_M=bm, BLOCK_N=bn, SPLIT=False, **flags), warps, stages),
            (tri_attention._attn_forward, dict(BLOCK_M=16, BLOCK_N=bn, SPLIT=True, **flags), warps, stages),
            (tri_attention._attn_combine, dict(D=D, BLOCK_M=16, BLOCK_D=bd, ACC=tl.float32), 4, 1),
            (tri_attention._attn_delta, dict(D=D, BLOCK_M=bbm, BLOCK_D=bd, ACC=tl.float32), 4, 1),
            (tri_attention._attn_backward_dq, dict(BLOCK_M=bbm, BLOCK_N=bbn, **flags), bwarps, bstages),
            (tri_attention._attn_backward_dkdv, dict(BLOCK_M=bbm, BLOCK_N=bbn, **flags), bwarps, bstages),
        ]
        for fn, constexprs, num_warps, num_stages in cases:
            sig = {}
            for name in fn.arg_names:
                if name in constexprs:
                    sig[name] = "constexpr"
                elif name in fp32_ptrs:
                    sig[name] = "*fp32"
                elif name in bf16_ptrs:
                    sig[name] = "*bf16"
                elif name in ("LENS", "STARTS"):
                    sig[name] = "*i32"
                else:
                    sig[name] = "fp32" if "scale" in name else "i32"
            compile_for_sm90(fn, sig, constexprs, num_warps, num_stages, label=D)


@pytest.mark.skipif(GPU, reason="a GPU compiles the kernels when it runs them")
def test_kernels_compile_for_sm90():
    """See tests/triton/sm90.py."""
    compile_in_child("tests.triton.test_attention:compile_cases", 12)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("case", [
    # B, Hq, Hkv, Sq, Skv (buffer), kv_lens, kv_starts
    (2, 4, 2, 1, 40, [17, 33], None),  # static-cache decode: one query, rows filled to different lengths
    (2, 8, 2, 3, 40, [17, 40], [0, 5]),  # a few queries, a left-padded row
    (2, 4, 2, 20, 20, None, [0, 7]),  # left-padded prefill: row 1's first 7 queries see nothing
    (1, 4, 1, 2, 37, [21], [19]),  # padding up to the queries themselves
], ids=lambda c: "B{}_Hq{}_Hkv{}_Sq{}_Skv{}_lens{}_starts{}".format(*c))
def test_key_ranges_match_reference(case, causal):
    """kv_lens / kv_starts (a static KV cache's filled length, left padding) on the tile and the
    split-KV paths, forward and backward, with RoPE counted from each row's start."""
    B, Hq, Hkv, Sq, Skv, lens, starts = case
    q, k, v = make_inputs(B, Hq, Hkv, Sq, Skv, 16, layout="bhsd")
    do = torch.randn(B, Hq, Sq, 16, device=DEVICE)
    kw = dict(causal=causal, rope=rope_tables(Skv, 16, device=DEVICE),
              kv_lens=None if lens is None else torch.tensor(lens, device=DEVICE),
              kv_starts=None if starts is None else torch.tensor(starts, device=DEVICE))
    got, want = run("triton", q, k, v, do, **kw), run("reference", q, k, v, do, **kw)
    assert all(torch.isfinite(t).all() for t in got)
    assert_all_close(got, want, 2e-5)


def test_key_ranges_are_the_row_alone():
    """The reference's own invariant: a left-padded row, or a row in a larger static buffer,
    computes exactly what the row computes alone (fp64: bit-for-bit is not promised, 1e-12 is)."""
    torch.manual_seed(3)
    B, Hq, Hkv, S, D, pad, extra = 2, 4, 2, 9, 8, 4, 6
    q, k, v = (torch.randn(B, H, S, D, dtype=torch.float64) for H in (Hq, Hkv, Hkv))
    tables = rope_tables(S + pad + extra, D, dtype=torch.float64)
    alone = gqa_attention(q, k, v, rope=tables, backend="reference")
    zeros = lambda H, n: torch.zeros(B, H, n, D, dtype=torch.float64)  # noqa: E731
    padded = gqa_attention(torch.cat((zeros(Hq, pad), q), 2), torch.cat((zeros(Hkv, pad), k), 2),
                           torch.cat((zeros(Hkv, pad), v), 2), rope=tables, backend="reference",
                           kv_starts=torch.full((B,), pad))
    torch.testing.assert_close(padded[:, :, pad:], alone, rtol=1e-12, atol=1e-12)
    assert torch.equal(padded[:, :, :pad], zeros(Hq, pad))  # queries that see nothing return zeros
    buffered = gqa_attention(q[:, :, -2:], torch.cat((k, torch.randn(B, Hkv, extra, D, dtype=torch.float64)), 2),
                             torch.cat((v, torch.randn(B, Hkv, extra, D, dtype=torch.float64)), 2), rope=tables,
                             backend="reference", kv_lens=torch.full((B,), S))
    torch.testing.assert_close(buffered, alone[:, :, -2:], rtol=1e-12, atol=1e-12)


def test_key_range_arguments():
    q, k = torch.randn(2, 4, 3, 8), torch.randn(2, 2, 10, 8)
    with pytest.raises(ValueError, match=r"kv_lens must have shape \[2\]"):
        gqa_attention(q, k, k, kv_lens=torch.tensor([5]))
    with pytest.raises(TypeError, match="kv_starts must have dtype"):
        gqa_attention(q, k, k, kv_starts=torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"kv_lens values must lie in \[Sq, Skv\]"):
        gqa_attention(q, k, k, kv_lens=torch.tensor([2, 10]))
    with pytest.raises(ValueError, match=r"kv_starts values must lie in \[0, 10\]"):
        gqa_attention(q, k, k, kv_starts=torch.tensor([-1, 0]))
