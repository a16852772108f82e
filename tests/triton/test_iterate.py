"""The Triton iterate held to the eager reference run in fp64, under the interpreter on a CPU
(small shapes) and natively on a GPU (bf16, marked cuda): forward (both paths, forced on small
shapes with `_path`), early exit, invariants, and the backward (every gradient, gradcheck,
determinism, a short training run). Blocks smaller than d keep the masked tail of the last
d-block in play."""
import pytest
import torch

import inl_kernels
from inl_kernels import inl_iterate
from inl_kernels.common import iterate_bundle
from tests.iterate_cases import (CONVERGE_TOL, GRAD_NAMES, NAN_CASES, call_backend, cast, converging_args, make_args,
                                 nan_case, reference_iterate)

triton_iterate = pytest.importorskip("inl_kernels.triton.iterate")

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
PATHS = ("tile", "decode")
SMALL = dict(BM=16, BD=16)  # blocks smaller than d: several d-blocks and a masked tail


def rel_err(out, ref):
    """max |out - ref| / max |ref|: the error relative to the size of the result."""
    out, ref = out.double().cpu(), ref.double().cpu()
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def run_triton(h, x, kw, dtype, path, config=SMALL, **extra):
    c = cast(kw, dtype, DEVICE)
    return call_backend(triton_iterate.iterate, h.to(DEVICE, dtype), x.to(DEVICE, dtype), **c, **extra, _path=path,
                                  _config=config)


def assert_matches_fp64(h, x, kw, dtype, path, tol, config=SMALL, **extra):
    ref_x, ref = reference_iterate(h, x, **kw, **extra)
    out_x, out = run_triton(h, x, kw, dtype, path, config, **extra)
    assert out_x.dtype == dtype and out.v.dtype == dtype
    assert out.energy.dtype == out.distance.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert out.iterations.dtype == torch.int32
    for name, got, want in (("x", out_x, ref_x), ("v", out.v, ref.v), ("energy", out.energy, ref.energy),
                            ("distance", out.distance, ref.distance)):
        err = rel_err(got, want)
        assert err <= tol, f"{name}: max rel err {err:.3g} > {tol:g}"
    assert out.iterations.tolist() == ref.iterations.tolist()
    return out_x, out


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", [
    dict(),                                  # everything on, v given
    dict(kappa=None),                        # dynamic alpha off
    dict(with_v=False),                      # v = zeros
    dict(E=0),                               # no excitation
    dict(E=1),
    dict(amplitude=0.0),
    dict(T=1),
    dict(n=1),
    dict(n=19, d=37),                        # rows across tiles, d = 2·16 + 5
    dict(n=3, d=5, E=5),                     # d smaller than one block, every dim excited
    dict(H=32, d=24),
])
def test_fp32_matches_fp64_reference(case, path):
    args = dict(n=6, d=20, H=16, E=3, T=4)
    args.update(case)
    h, x, kw = make_args(**args)
    assert_matches_fp64(h, x, kw, torch.float32, path, tol=1e-5)


@pytest.mark.parametrize("path", PATHS)
def test_default_blocks(path):
    """The launcher's own block choice (no _config), d = 150: not a multiple of any block."""
    h, x, kw = make_args(n=5, d=150, H=16, E=4, T=3)
    assert_matches_fp64(h, x, kw, torch.float32, path, tol=1e-5, config=None)


def test_whole_blocks_drop_the_masks():
    """Shapes that divide into whole blocks (n a multiple of BM, d of BD·NB) run the kernels
    without masks (EVEN), as the benchmark shapes do on a GPU: forward on both paths (same bits)
    and gradients, against fp64, at the launcher's own blocks."""
    h, x, kw = make_args(n=32, d=64, H=16, E=4, T=3)
    tile_x, tile = assert_matches_fp64(h, x, kw, torch.float32, "tile", tol=1e-5, config=None)
    decode_x, decode = assert_matches_fp64(h, x, kw, torch.float32, "decode", tol=1e-5, config=None)
    assert torch.equal(tile_x, decode_x) and torch.equal(tile.v, decode.v)
    want, _ = grads_of(reference_iterate, h, x, kw, torch.float64)
    got, _ = grads_of(triton_fn(None), h, x, kw, torch.float32)
    assert_grads_match(got, want, tol=1e-4)


@pytest.mark.parametrize("path", PATHS)
def test_fp64(path):
    h, x, kw = make_args(n=4, d=20, H=16, E=2, T=3)
    assert_matches_fp64(h, x, kw, torch.float64, path, tol=1e-12)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype, path):
    """fp16 dots run in the interpreter; bf16 dots cannot (the interpreter multiplies bits), so
    there bf16 runs fp32 dots on bf16-rounded inputs: either way the state stays fp32."""
    h, x, kw = make_args(n=6, d=20, H=16, E=3, T=4)
    ref_x, _ = reference_iterate(h, x, **kw)
    out_x, _ = run_triton(h, x, kw, dtype, path)
    tol = {torch.float16: 5e-3, torch.bfloat16: 2e-2}[dtype]
    assert rel_err(out_x, ref_x) <= tol


def test_fp32_weights_under_half_activations():
    h, x, kw = make_args(n=6, d=20, H=16, E=3, T=3)
    ref_x, _ = reference_iterate(h, x, **kw)
    kw16 = cast(kw, torch.float32, DEVICE)
    kw16["v"] = kw["v"].to(DEVICE, torch.float16)
    out_x = inl_iterate(h.to(DEVICE, torch.float16), x.to(DEVICE, torch.float16), **kw16, backend="triton")
    assert out_x.dtype == torch.float16
    assert rel_err(out_x, ref_x) <= 5e-3


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("min_iterations", [0, 3])
def test_early_exit_counts_and_frozen_rows(path, min_iterations):
    h, x, kw = converging_args()  # rows stop at steps 4 .. never
    extra = dict(tol=CONVERGE_TOL, min_iterations=min_iterations, return_trajectory=True)
    ref_x, ref = reference_iterate(h, x, **kw, **extra)
    assert len(set(ref.iterations.tolist())) >= 3
    out_x, out = run_triton(h, x, kw, torch.float32, path, **extra)
    assert out.iterations.tolist() == ref.iterations.tolist()
    for name, got, want in (("x", out_x, ref_x), ("v", out.v, ref.v), ("energy", out.energy, ref.energy),
                            ("distance", out.distance, ref.distance),
                            ("trajectory_x", out.trajectory_x, ref.trajectory_x),
                            ("trajectory_v", out.trajectory_v, ref.trajectory_v)):
        assert rel_err(got, want) <= 1e-5, name
    for n, count in enumerate(out.iterations.tolist()):  # a frozen row repeats itself, bit for bit
        for t in range(count, kw["num_iterations"]):
            assert torch.equal(out.trajectory_x[n, t + 1], out.trajectory_x[n, count])
            assert out.energy[n, t] == out.energy[n, count - 1]
            assert out.distance[n, t] == out.distance[n, count - 1]
    torch.testing.assert_close(out.trajectory_x[:, -1], out_x, rtol=0, atol=0)


@pytest.mark.parametrize("path", PATHS)
def test_trajectory(path):
    h, x, kw = make_args(n=5, d=20, H=16, E=2, T=3)
    _, ref = reference_iterate(h, x, **kw, return_trajectory=True)
    out_x, out = run_triton(h, x, kw, torch.float32, path, return_trajectory=True)
    assert out.trajectory_x.shape == (5, 4, 20)
    assert rel_err(out.trajectory_x, ref.trajectory_x) <= 1e-5
    assert rel_err(out.trajectory_v, ref.trajectory_v) <= 1e-5
    torch.testing.assert_close(out.trajectory_x[:, -1], out_x, rtol=0, atol=0)


def assert_same_bits(a, b, atol=None):
    """Bit for bit on a GPU, where our kernels fix every operation's order. Under the interpreter
    a tl.dot is a numpy matmul whose blocking and rounding depend on the CPU's BLAS and on the
    operand shapes (an AMD AVX2 and an Intel AVX-512 machine differ by about one ulp between a
    16-row and a 32-row tile), so there the same claim is held to `atol` (default: 4 ulp of the
    values' scale): the tightest bound that is a property of our code and not of the machine."""
    if GPU:
        assert torch.equal(a, b)
    elif a.is_floating_point():
        if atol is None:
            atol = 4 * torch.finfo(b.dtype).eps * float(b.abs().max().clamp(min=torch.finfo(b.dtype).tiny))
        torch.testing.assert_close(a, b, rtol=0, atol=atol)
    else:
        assert torch.equal(a, b)  # step counts


def assert_same_rows(out_x, out, ref_x, ref):
    """`assert_same_bits` for an iterate's outputs. Under the interpreter the ulps come from the
    dots, whose results are of the state's size, and reach v through a difference of such terms
    (a converged v is ~1e-3 of them): x and v are held to 4 ulp of the state's scale, the
    statistics to what that allows them (energy = mean v², distance = mean |x - mu|). Measured
    with numpy's BLAS on its AVX2 kernels (OPENBLAS_CORETYPE=Haswell): v 5.3 ulp of its own scale."""
    eps = torch.finfo(ref_x.dtype).eps
    delta = 4 * eps * float(torch.maximum(ref_x.abs().max(), ref.v.abs().max()))
    assert_same_bits(out_x, ref_x, delta)
    assert_same_bits(out.v, ref.v, delta)
    top = float(ref.energy.abs().max())  # mean |v| <= sqrt(mean v²): |d energy| <= 2·sqrt(energy)·dv + dv²
    assert_same_bits(out.energy, ref.energy, 2 * top**0.5 * delta + delta**2 + 4 * eps * top)
    if out.distance is not None:
        assert_same_bits(out.distance, ref.distance, delta + 4 * eps * float(ref.distance.abs().max()))
    assert_same_bits(out.iterations, ref.iterations)


@pytest.mark.parametrize("path", PATHS)
def test_batch_invariance_and_determinism(path):
    """A row's bits and count do not depend on the run (exactly, on any machine) or on the rest
    of the batch (`assert_same_bits`)."""
    h, x, kw = converging_args(n=20)
    kw = cast(kw, torch.float32, DEVICE)
    h, x = h.to(DEVICE, torch.float32), x.to(DEVICE, torch.float32)

    def run(rows):
        return call_backend(triton_iterate.iterate, h[rows], x[rows], **kw, tol=CONVERGE_TOL, min_iterations=0,
                            _path=path, _config=SMALL)

    full_x, full = run(slice(None))
    again_x, again = run(slice(None))
    for a, b in ((full_x, again_x), (full.v, again.v), (full.energy, again.energy),
                 (full.distance, again.distance), (full.iterations, again.iterations)):
        assert torch.equal(a, b)
    for rows in ([0], [19], [3, 17], list(range(1, 20, 3)), list(range(19, -1, -1))):
        sub_x, sub = run(rows)
        assert_same_rows(sub_x, sub, full_x[rows], full._replace(v=full.v[rows], energy=full.energy[rows],
                                                                    distance=full.distance[rows],
                                                                    iterations=full.iterations[rows]))


def test_both_paths_give_the_same_bits():
    """Both paths add every row reduction's per-block shares in the same column order, so a row
    has the same bits whichever path its batch size picks (SPEC: batch invariance, bit for bit
    on a GPU; `assert_same_bits` under the interpreter), with the default block sizes and with
    tile blocks of another height."""
    h, x, kw = converging_args(n=40, d=70)
    kw = cast(kw, torch.float32, DEVICE)
    h, x = h.to(DEVICE, torch.float32), x.to(DEVICE, torch.float32)
    runs = [call_backend(triton_iterate.iterate, h, x, **kw, tol=CONVERGE_TOL, min_iterations=0, _path=path,
                         _config=config)
            for path, config in (("tile", None), ("decode", None), ("tile", dict(BM=32)))]
    (ref_x, ref), others = runs[0], runs[1:]
    for out_x, out in others:
        assert_same_rows(out_x, out, ref_x, ref)
    # and through the public op, on either side of the path switch
    small = inl_iterate(h[:5], x[:5], **kw, tol=CONVERGE_TOL, min_iterations=0, backend="triton")
    big_h = torch.cat([h] * (triton_iterate.DECODE_MAX_ROWS // 40 + 1))
    big_x = torch.cat([x] * (triton_iterate.DECODE_MAX_ROWS // 40 + 1))
    big = inl_iterate(big_h, big_x, **kw, tol=CONVERGE_TOL, min_iterations=0, backend="triton")
    assert big_h.shape[0] > triton_iterate.DECODE_MAX_ROWS
    assert_same_bits(small, big[:5])


def test_fp32_gpu_blocks_at_small_hidden():
    """fp32 at H <= 32 runs 128-row, 8-column blocks over 8 warps on a GPU, the tile path with a
    register cap (`_tile_config`; at H = 128 64 × 8 blocks over 8 warps): the dispatch picks
    them there, the cap changes no result, and both paths at those blocks give the same bits
    and the fp64 reference's values (d = 70: a masked last block)."""
    for H in (16, 32):
        cfg = triton_iterate._tile_config(2048, H, gpu=True, dtype=torch.float32)
        assert (cfg["BM"], cfg["BD"], cfg["num_warps"], cfg["maxnreg"]) == (128, 8, 8, 128)
        assert triton_iterate._decode_config(2048, H, gpu=True, dtype=torch.float32)["BM"] == 128
    assert "maxnreg" not in triton_iterate._tile_config(2048, 64, gpu=True, dtype=torch.float32)
    wide = triton_iterate._tile_config(2048, 128, gpu=True, dtype=torch.float32)  # fp32 H = 128: 64 × 8, 8 warps
    assert (wide["BM"], wide["BD"], wide["num_warps"], "maxnreg" in wide) == (64, 8, 8, False)
    assert triton_iterate._tile_config(2048, 32, gpu=True)["BM"] == 64  # bf16 keeps its blocks
    h, x, kw = converging_args(n=40, d=70)
    stop = dict(tol=CONVERGE_TOL, min_iterations=0)
    blocks = dict(BM=128, BD=8, num_warps=8)
    ref_x, ref = reference_iterate(h, x, **kw, **stop)
    tile_x, tile = run_triton(h, x, kw, torch.float32, "tile", dict(blocks, maxnreg=128), **stop)
    for got, want in ((tile_x, ref_x), (tile.v, ref.v), (tile.energy, ref.energy), (tile.distance, ref.distance)):
        assert rel_err(got, want) <= 1e-5
    assert tile.iterations.tolist() == ref.iterations.tolist()
    assert 1 < len(set(tile.iterations.tolist()))  # rows stopped at different steps
    assert_same_rows(*run_triton(h, x, kw, torch.float32, "decode", blocks, **stop), tile_x, tile)
    assert_same_rows(*run_triton(h, x, kw, torch.float32, "tile", blocks, **stop), tile_x, tile)


def test_traced_launches_leave_the_register_cap_out():
    """`_traced`: true under the fake and functional modes torch.compile traces with, false for
    a real launch, where the cap goes to Triton."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch._subclasses.functional_tensor import FunctionalTensorMode

    assert not triton_iterate._traced()
    with FakeTensorMode():
        assert triton_iterate._traced()
    with FunctionalTensorMode():
        assert triton_iterate._traced()


def test_compaction_lists_running_rows_in_order():
    """`_compact_rows` lists the rows whose flag is set, in row order, and counts them (across
    several chunks of its prefix sum): what the next step's tiles are formed from."""
    g = torch.Generator().manual_seed(3)
    for n in (1, 37, 2500):
        flags = (torch.rand(n, generator=g) < 0.4).to(torch.int32)
        row_list = torch.full((n,), -1, dtype=torch.int32)
        count = torch.full((1,), -1, dtype=torch.int32)
        triton_iterate._compact_rows[(1,)](flags, row_list, count, n, CHUNK=1024)
        want = flags.nonzero().flatten().to(torch.int32)
        assert count.item() == want.numel()
        assert torch.equal(row_list[:want.numel()], want)


def test_tile_step_touches_only_listed_rows():
    """With early exit the tile step works on the listed rows only: rows off the list (the
    converged ones) keep their state, statistics and count bit for bit, so a converged row costs
    nothing after its last step."""
    h, x, kw = converging_args(n=21, d=24)
    c = cast(kw, torch.float32, DEVICE)
    h, x = h.to(DEVICE, torch.float32), x.to(DEVICE, torch.float32)
    n, d = x.shape
    T = kw["num_iterations"]
    H = c["w_h"].shape[0]
    _, _, _, params, settings = iterate_bundle(h, x, **c)
    table, bias, mod = triton_iterate.fold_parameters(params, settings, d, torch.float32)
    ctx, pre = torch.empty(n, H), torch.empty(n, H)
    sq = torch.empty(n)
    cfg = triton_iterate._tile_config(d, H)
    BM, BD = cfg["BM"], cfg["BD"]
    triton_iterate._fwd_prologue[(triton_iterate.triton.cdiv(n, BM), 1)](
        h, x, x, c["w_h"], c["w_x"], c["w_v"], bias, c["mu"], ctx, pre, sq, x, x, n, d, T, 1, 0.0,
        H=H, BM=BM, BD=BD, HAS_V=False, TRAJ=False, SINGLE=True, EVEN=False, DOT=triton_iterate.tl.float32,
        PREC="ieee", ACC=triton_iterate.tl.float32)
    listed = torch.tensor([1, 4, 5, 11, 20], dtype=torch.int32)
    row_list = torch.cat([listed, torch.full((n - len(listed),), -1, dtype=torch.int32)])
    count = torch.tensor([len(listed)], dtype=torch.int32)
    running = torch.ones(n, dtype=torch.int32)
    xs, vs = torch.full((n, d), 7.0), torch.full((n, d), 8.0)
    energy, distance = torch.full((n, T), 9.0), torch.full((n, T), 9.0)
    iterations = torch.full((n,), T, dtype=torch.int32)
    f32 = triton_iterate.tl.float32
    triton_iterate._tile_step[(triton_iterate.triton.cdiv(n, BM),)](
        x, x, xs, vs, xs, vs, c["w_x"], c["w_v"], c["w_o"], c["b_o"], mod, c["mu"], table, ctx, pre, sq,
        row_list, count, running, energy, distance, iterations, energy, energy, energy, xs, xs,
        0, n, d, T, zero=0.0, dt=float(c["dt"]), kappa=0.0, tol=1e9, min_iterations=0,
        H=H, BM=BM, BD=BD, HAS_V=False, HAS_EXC=table is not None, USE_KAPPA=False, EARLY_EXIT=True, SAVE=False,
        SAVE_DOT=False, TRAJ=False, FINAL_OUT=False, EVEN=False, I32=True, DOT=f32, PREC="ieee", ACC=f32)
    others = torch.ones(n, dtype=torch.bool)
    others[listed.long()] = False
    assert (xs[others] == 7.0).all() and (vs[others] == 8.0).all() and (energy[others] == 9.0).all()
    assert (iterations[others] == T).all() and (running[others] == 1).all()
    assert not (xs[listed.long()] == 7.0).any()
    assert (iterations[listed.long()] == 1).all() and (running[listed.long()] == 0).all()  # tol = 1e9: all stop


@pytest.mark.parametrize("path", PATHS)
def test_half_precision_early_exit(path):
    """Early exit in fp16: rows that stop before the last step reach the outputs through the
    copy of the stopped rows, the others through the last step; both paths give the same bits
    and counts, and stay near the fp64 reference."""
    h, x, kw = converging_args(n=19, d=24)
    extra = dict(tol=CONVERGE_TOL, min_iterations=0)
    ref_x, ref = reference_iterate(h, x, **kw, **extra)
    out_x, out = run_triton(h, x, kw, torch.float16, path, config=None, **extra)
    other_x, other = run_triton(h, x, kw, torch.float16, "decode" if path == "tile" else "tile", config=None,
                                **extra)
    assert torch.equal(out_x, other_x) and torch.equal(out.v, other.v)
    assert torch.equal(out.iterations, other.iterations)
    assert len(set(out.iterations.tolist())) >= 3 and out.iterations.min() < kw["num_iterations"]
    assert rel_err(out_x, ref_x) <= 5e-3 and rel_err(out.v, ref.v) <= 2e-2  # v is small here: fp16 ulps


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", NAN_CASES, ids=lambda c: str(c))
def test_nan_propagates_like_the_reference(path, case):
    """A NaN input gives NaN exactly where the reference gives it (relu(NaN) is NaN), and the
    same values elsewhere: a fused kernel must not turn a diverged input into finite numbers."""
    h, x, kw = nan_case(*case)
    ref_x, ref = reference_iterate(h.double(), x.double(), **cast(kw, torch.float64))
    out_x, out = run_triton(h, x, kw, torch.float32, path)
    assert torch.isnan(ref_x).any()
    for got, want in ((out_x, ref_x), (out.v, ref.v), (out.energy, ref.energy), (out.distance, ref.distance)):
        assert torch.equal(torch.isnan(got.cpu()), torch.isnan(want))
        torch.testing.assert_close(got.cpu().double(), want, rtol=1e-5, atol=1e-5, equal_nan=True)


def test_public_dispatch():
    h, x, kw = make_args(n=4, d=20, H=16, E=2, T=2, dtype=torch.float32, device=DEVICE)
    out = inl_iterate(h, x, **kw, backend="triton")
    torch.testing.assert_close(out, inl_iterate(h, x, **kw, backend="reference"), rtol=1e-5, atol=1e-6)
    h, x, kw = make_args(n=4, d=20, H=8, E=2, T=2, dtype=torch.float32, device=DEVICE)
    with pytest.raises(ValueError, match="H=8"):
        inl_iterate(h, x, **kw, backend="triton")
    if not torch.cuda.is_available():
        h, x, kw = make_args(n=2, d=20, H=16, E=2, T=2, dtype=torch.float64)
        inl_iterate(h, x, **kw, backend="triton")  # fp64 runs under the interpreter
    if DEVICE == "cuda":
        # auto picks triton for CUDA tensors (same bits as naming it), the reference where it cannot run
        h, x, kw = make_args(n=4, d=20, H=16, E=2, T=2, dtype=torch.float32, device=DEVICE)
        assert torch.equal(inl_kernels.inl_iterate(h, x, **kw), inl_iterate(h, x, **kw, backend="triton"))
        h, x, kw = make_args(n=4, d=20, H=8, E=2, T=2, dtype=torch.float32, device=DEVICE)
        assert torch.equal(inl_kernels.inl_iterate(h, x, **kw), inl_iterate(h, x, **kw, backend="reference"))


@pytest.mark.cuda
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", [dict(), dict(kappa=None, with_v=False), dict(n=1, T=1, E=1),
                                  dict(n=300, d=200, H=64, E=20, T=5), dict(n=40, d=300, H=128, T=3)])
def test_bf16_on_gpu(case, path):
    args = dict(n=6, d=20, H=16, E=3, T=4)
    args.update(case)
    h, x, kw = make_args(**args)
    ref_x, ref = reference_iterate(h, x, **kw)
    out_x, out = run_triton(h, x, kw, torch.bfloat16, path, config=None)
    assert rel_err(out_x, ref_x) <= 2e-2 and rel_err(out.v, ref.v) <= 2e-2
    assert rel_err(out.energy, ref.energy) <= 2e-2 and rel_err(out.distance, ref.distance) <= 2e-2


@pytest.mark.cuda
def test_auto_picks_triton_on_gpu():
    h, x, kw = make_args(n=8, d=64, H=16, E=3, T=3, dtype=torch.bfloat16, device="cuda")
    out = inl_iterate(h, x, **kw, backend="auto")
    torch.testing.assert_close(out, inl_iterate(h, x, **kw, backend="triton"), rtol=0, atol=0)



# ---------------------------------------------------------------------------------------------
# backward


def grads_of(fn, h, x, kw, dtype, upstream=("x", "v", "energy", "distance"), seed=1):
    """Gradients of every differentiable input of `fn` for a random linear loss on the outputs
    named in `upstream`. Inputs are cast to `dtype` (leaves), so grads come back in it."""
    names = ("h", "x") + (("v",) if kw.get("v") is not None else ()) + GRAD_NAMES
    leaves = {k: (dict(h=h, x=x)[k] if k in ("h", "x") else kw[k]).detach().to(DEVICE, dtype).requires_grad_(True)
              for k in names}
    args = cast(kw, dtype, DEVICE)
    args.update({k: leaves[k] for k in names if k not in ("h", "x")})
    out, info = fn(leaves["h"], leaves["x"], **args)
    g = torch.Generator().manual_seed(seed)
    outputs = dict(x=out, v=info.v, energy=info.energy, distance=info.distance)
    loss = sum((outputs[k].double() * torch.randn(outputs[k].shape, generator=g, dtype=torch.float64).to(DEVICE)).sum()
               for k in upstream)
    loss.backward()
    return {k: leaves[k].grad for k in names}, out


def assert_grads_match(got, want, tol):
    assert got.keys() == want.keys()
    for k in want:
        if want[k] is None:  # e.g. gamma, phi without excited dims
            assert got[k] is None or not got[k].any(), k
            continue
        assert got[k] is not None, f"no gradient for {k}"
        err = rel_err(got[k], want[k])
        assert err <= tol, f"d/d{k}: max rel err {err:.3g} > {tol:g}"


def triton_fn(config=SMALL):
    return lambda h, x, **kw: call_backend(triton_iterate.iterate, h, x, **kw, _config=config)


@pytest.mark.parametrize("case", [
    dict(),
    dict(kappa=None),
    dict(with_v=False),
    dict(E=0),
    dict(E=1),
    dict(amplitude=0.0),
    dict(T=1),
    dict(n=1),
    dict(n=19, d=37),
    dict(n=3, d=5, E=5),
    dict(H=32, d=24, T=2),
])
def test_gradients_match_fp64_reference(case):
    args = dict(n=6, d=20, H=16, E=3, T=3)
    args.update(case)
    h, x, kw = make_args(**args)
    want, _ = grads_of(reference_iterate, h, x, kw, torch.float64)
    got, _ = grads_of(triton_fn(), h, x, kw, torch.float32)
    assert got["x"].dtype == torch.float32
    assert_grads_match(got, want, tol=1e-4)


@pytest.mark.parametrize("upstream", [("x",), ("v",), ("energy",), ("distance",), ("energy", "distance")])
def test_gradients_of_each_output_alone(upstream):
    """Unused outputs reach the backward as None; the statistics alone train the whole
    controller (IntegratorLoss needs no trajectory)."""
    h, x, kw = make_args(n=5, d=20, H=16, E=2, T=3)
    want, _ = grads_of(reference_iterate, h, x, kw, torch.float64, upstream=upstream)
    got, _ = grads_of(triton_fn(), h, x, kw, torch.float32, upstream=upstream)
    assert_grads_match(got, want, tol=1e-4)


def test_gradients_with_default_blocks_and_row_splits():
    """The launcher's own blocks, and phase 2 with its rows split three ways."""
    h, x, kw = make_args(n=40, d=45, H=16, E=4, T=2)
    want, _ = grads_of(reference_iterate, h, x, kw, torch.float64)
    assert_grads_match(grads_of(triton_fn(None), h, x, kw, torch.float32)[0], want, tol=1e-4)
    split = grads_of(triton_fn(dict(BM=16, BD=16, SPLITS=3)), h, x, kw, torch.float32)[0]
    assert_grads_match(split, want, tol=1e-4)


def test_backward_is_deterministic():
    h, x, kw = make_args(n=20, d=20, H=16, E=3, T=3)
    config = dict(BM=16, BD=16, SPLITS=2)
    first, out1 = grads_of(triton_fn(config), h, x, kw, torch.float32)
    second, out2 = grads_of(triton_fn(config), h, x, kw, torch.float32)
    assert torch.equal(out1, out2)
    for k in first:
        assert torch.equal(first[k], second[k]), k


def spy_on_launches(monkeypatch):
    """[(kernel name, launch keyword arguments)] of every Triton launch the iterate makes."""
    calls = []
    real = triton_iterate.wrap_triton

    def spy(kernel):
        launcher = real(kernel)

        class Grid:
            def __getitem__(self, grid):
                run = launcher[grid]

                def launch(*args, **kwargs):
                    calls.append((kernel.fn.__name__, kwargs))
                    return run(*args, **kwargs)
                return launch
        return Grid()
    monkeypatch.setattr(triton_iterate, "wrap_triton", spy)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("BD,d", [(16, 45), (32, 80), (8, 37)])
def test_deferred_dl_dc_gives_the_same_bits(dtype, BD, d, monkeypatch):
    """Phase 1's DEFER (the four dL/dz blocks parked, the dL/dc dots run once per DC columns,
    the accumulator kept in memory between chunks) and REREAD (c_t and gpre_{t+1} read again per
    block) run the same dots in the same order as the accumulator held in registers: the same
    bits, whether the chunk is one block, two (d = 45 over 16-column blocks, d = 80 over 32:
    a partial last chunk) or all of d; and the held run matches fp64. 32-column blocks are
    what the GPU's bf16/fp16 H = 128 configuration takes, 8-column blocks fp32's at H = 64."""
    if BD == 8 and dtype != torch.float32:
        pytest.skip("8-column blocks are fp32's (a tf32 dot's K; 16-bit dots take 16)")
    h, x, kw = make_args(n=37, d=d, H=16, E=3, T=3)
    base = dict(BM=16, BD=BD, SPLITS=2)
    launches = spy_on_launches(monkeypatch)

    def phase1():  # the switches the last backward's phase 1 ran with
        rows = [k for name, k in launches if name == "_bwd_rows"]
        return rows[-1]["DEFER"], rows[-1]["DC"], rows[-1]["REREAD"]

    held, out = grads_of(triton_fn(dict(base, DEFER=False, REREAD=False)), h, x, kw, dtype)
    assert phase1()[::2] == (False, False)
    for extra in (dict(DC=BD), dict(DC=2 * BD), dict(DC=64, REREAD=True), dict(DC=128, REREAD=True),
                  dict(DEFER=False, REREAD=True)):
        got, out2 = grads_of(triton_fn(dict(dict(base, DEFER=True), **extra)), h, x, kw, dtype)
        want = dict(dict(DEFER=True, REREAD=False), **extra)
        assert phase1()[0] == want["DEFER"] and phase1()[2] == want["REREAD"], (phase1(), extra)
        assert "DC" not in extra or phase1()[1] == min(extra["DC"], 1 << (d - 1).bit_length())  # at most all of d
        assert torch.equal(out, out2)
        for k in held:
            assert (held[k] is None) == (got[k] is None), k
            assert held[k] is None or torch.equal(held[k], got[k]), (k, extra)
    if dtype == torch.float32:
        assert_grads_match(held, grads_of(reference_iterate, h, x, kw, torch.float64)[0], tol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_second_backward_repeats_or_refuses(dtype):
    """backward(retain_graph=True) twice: fp32 keeps its saved tensors and gives the same bits
    again; bf16/fp16 store the gradient carry in the forward's saved state pair, so the second
    backward is refused by autograd's version check rather than reading gradients as states."""
    h, x, kw = make_args(n=6, d=20, H=16, E=2, T=2)
    leaf = h.detach().to(DEVICE, dtype).requires_grad_(True)
    args = cast(kw, dtype, DEVICE)
    out, info = call_backend(triton_iterate.iterate, leaf, x.to(DEVICE, dtype), **args, _config=SMALL)
    loss = out.float().square().sum() + info.energy.sum()
    first, = torch.autograd.grad(loss, leaf, retain_graph=True)
    ref_leaf = h.detach().double().requires_grad_(True)
    ref_out, ref_info = reference_iterate(ref_leaf, x, **kw)
    want, = torch.autograd.grad(ref_out.square().sum() + ref_info.energy.sum(), ref_leaf)
    assert rel_err(first, want) <= (1e-4 if dtype == torch.float32 else 5e-2)
    if dtype == torch.float32:
        second, = torch.autograd.grad(loss, leaf)
        assert torch.equal(first, second)
    else:
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            torch.autograd.grad(loss, leaf)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gradients_under_create_graph_refuse_a_double_backward(dtype):
    """create_graph=True gives the first-order gradients (the reference's values) but they refuse
    to be differentiated, with a message, rather than acting as constants (dh, dx, dv live in the
    state pair's storage: views autograd would treat as leaves, so a gradient penalty through
    the iterate would silently add nothing)."""
    h, x, kw = make_args(n=6, d=20, H=16, E=2, T=2)
    leaf = h.detach().to(DEVICE, dtype).requires_grad_(True)
    out, _ = call_backend(triton_iterate.iterate, leaf, x.to(DEVICE, dtype), **cast(kw, dtype, DEVICE), _config=SMALL)
    g, = torch.autograd.grad(out.float().square().sum(), leaf, create_graph=True)
    ref_leaf = h.detach().double().requires_grad_(True)
    want, = torch.autograd.grad(reference_iterate(ref_leaf, x, **kw)[0].square().sum(), ref_leaf)
    assert rel_err(g.detach(), want) <= (1e-4 if dtype == torch.float32 else 5e-2)
    assert g.requires_grad
    with pytest.raises(RuntimeError, match="not differentiable"):
        g.square().sum().backward()


def test_the_backward_op_can_be_functionalized():
    """Its schema (mutated state pair, a fixed tuple of outputs) is one that auto_functionalize
    takes, so graphs that keep the Triton ops opaque (export) can hold it."""
    from torch._higher_order_ops.auto_functionalize import can_auto_functionalize

    assert can_auto_functionalize(torch.ops.inl.triton_iterate_backward.default)


def test_forward_under_grad_matches_no_grad_forward():
    """The training forward (tile path, saving c and rms) computes the same bits as inference."""
    h, x, kw = make_args(n=7, d=20, H=16, E=3, T=3, dtype=torch.float32, device=DEVICE)
    plain, plain_info = call_backend(triton_iterate.iterate, h, x, **kw, _path="tile", _config=SMALL)
    leaf = h.clone().requires_grad_(True)
    out, info = call_backend(triton_iterate.iterate, leaf, x, **kw, tol=1.0, _config=SMALL)  # tol ignored under grad
    assert info.iterations.tolist() == [3] * 7
    assert torch.equal(out.detach(), plain) and torch.equal(info.v.detach(), plain_info.v)
    assert torch.equal(info.energy.detach(), plain_info.energy)


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp64 kernels run only under the interpreter")
def test_gradcheck_fp64():
    h, x, kw = make_args(n=3, d=20, H=16, E=2, T=2)
    names = ("h", "x", "v") + GRAD_NAMES
    inputs = tuple((dict(h=h, x=x)[k] if k in ("h", "x") else kw[k]).clone().requires_grad_(True) for k in names)

    def fn(*vals):
        args = dict(kw, **dict(zip(names, vals)))
        out, info = call_backend(triton_iterate.iterate, args.pop("h"), args.pop("x"), **args, _config=SMALL)
        return out, info.v, info.energy, info.distance

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


def test_half_activations_with_fp32_weights_get_grads_in_their_dtypes():
    h, x, kw = make_args(n=5, d=20, H=16, E=2, T=2)
    want, _ = grads_of(reference_iterate, h, x, kw, torch.float64)
    names = ("h", "x", "v") + GRAD_NAMES
    leaves = {k: (dict(h=h, x=x)[k] if k in ("h", "x") else kw[k]).detach().to(
        DEVICE, torch.float16 if k in ("h", "x", "v") else torch.float32).requires_grad_(True) for k in names}
    args = dict(kw, **{k: leaves[k] for k in names if k not in ("h", "x")})
    out = call_backend(triton_iterate.iterate, leaves["h"], leaves["x"], **args, _config=SMALL)[0]
    g = torch.Generator().manual_seed(1)
    (out.double() * torch.randn(out.shape, generator=g, dtype=torch.float64).to(DEVICE)).sum().backward()
    assert leaves["x"].grad.dtype == torch.float16 and leaves["w_o"].grad.dtype == torch.float32
    want, _ = grads_of(reference_iterate, h, x, kw, torch.float64, upstream=("x",))
    for k in ("h", "x", "w_o", "mu", "mod_scale"):
        assert rel_err(leaves[k].grad, want[k]) <= 2e-2, k


def test_trajectory_under_grad_runs_on_the_reference():
    """The kernels do not differentiate a returned trajectory: naming the triton backend says so,
    and auto takes the reference, whose gradients it then gives bit for bit."""
    h, x, kw = make_args(n=3, d=20, H=16, E=2, T=2, dtype=torch.float32, device=DEVICE)
    h.requires_grad_(True)
    with pytest.raises(ValueError, match="triton.*trajectory"):
        inl_iterate(h, x, **kw, backend="triton", return_trajectory=True)
    out, info = call_backend(triton_iterate.supports, h, x, **kw, return_trajectory=True), None
    assert "trajectory" in out
    _, info = inl_iterate(h, x, **kw, return_trajectory=True)
    info.trajectory_x.sum().backward()
    ref_h = h.detach().clone().requires_grad_(True)
    inl_iterate(ref_h, x, **kw, backend="reference", return_trajectory=True)[1].trajectory_x.sum().backward()
    torch.testing.assert_close(h.grad, ref_h.grad, rtol=0, atol=0)


def pre_activations(h, x, kw):
    """The controller pre-activations h·w_hᵀ + b_h + x_t·w_xᵀ + b_x + v_t·w_vᵀ + b_v of every row
    and step [N, T, H], from the reference's fp64 trajectory."""
    _, info = reference_iterate(h, x, **kw, return_trajectory=True)
    steps = []
    for t in range(kw["num_iterations"]):
        x_t, v_t = info.trajectory_x[:, t], info.trajectory_v[:, t]
        steps.append(h @ kw["w_h"].T + kw["b_h"] + x_t @ kw["w_x"].T + kw["b_x"] + v_t @ kw["w_v"].T + kw["b_v"])
    return torch.stack(steps, 1)


def kink_free_args(margin=0.2, **case):
    """make_args with every controller pre-activation at least `margin` away from relu's kink at
    0 in every row and step (checked on the fp64 reference), for gradients in half precision.

    The gradient of relu jumps at 0: a pre-activation within rounding distance of 0 (bf16 moves
    these by ~5e-3 at d = 200) takes the other side of the kink in a half-precision run than in
    the fp64 reference, and that row's dL/dpre gains or loses the unit's whole dL/dc. With
    n = 300, d = 200, H = 64, T = 5 some of the 96 000 pre-activations always land that close:
    the eager reference itself, run in bf16, then differs from fp64 by 0.39 (max rel) in dL/dh,
    exactly what the Triton kernels gave on an H200. So the input layers are scaled down and the
    combined bias pushed to ±1: each unit is on or off for the whole run (the relu mask still
    zeroes half of them), and precision is what the test measures."""
    h, x, kw = make_args(**case)
    g = torch.Generator().manual_seed(7)
    sign = torch.where(torch.rand(kw["b_h"].shape, generator=g, dtype=torch.float64) < 0.5, -1.0, 1.0)
    kw = dict(kw, w_h=kw["w_h"] * 0.2, w_x=kw["w_x"] * 0.2, w_v=kw["w_v"] * 0.2,
              b_h=sign * (1.0 + kw["b_h"].abs()), b_x=kw["b_x"] * 0.1, b_v=kw["b_v"] * 0.1)
    closest = pre_activations(h, x, kw).abs().min().item()
    assert closest > margin, f"a pre-activation comes within {closest:.3g} of relu's kink"
    return h, x, kw


def test_half_gradients_at_gpu_block_sizes():
    """fp16 gradients (fp16 tl.dot runs in the interpreter) with the block sizes a GPU launches
    at H = 64 (BM = BD = 32) and phase 2's rows split, against fp64: the interpreter twin of the
    bf16 GPU test, on kink-free arguments (see kink_free_args: with the original arguments this
    test fails exactly as the GPU one did, and so does the eager reference in half precision)."""
    h, x, kw = kink_free_args(n=37, d=45, H=64, E=5, T=3)
    want, _ = grads_of(reference_iterate, h, x, kw, torch.float64)
    got, _ = grads_of(triton_fn(dict(BM=32, BD=32, SPLITS=2)), h, x, kw, torch.float16)
    assert_grads_match(got, want, tol=5e-3)


GPU_GRADIENT_CASES = [dict(), dict(kappa=None, with_v=False), dict(n=300, d=200, H=64, E=20, T=5)]


@pytest.mark.parametrize("case", GPU_GRADIENT_CASES)
def test_gpu_gradient_cases_stay_off_relu_kinks(case):
    """The bf16 GPU gradient test's arguments keep every pre-activation far from relu's kink
    (fp64 reference only, so it runs here): the check that would have flagged the n = 300 case,
    whose plain make_args put a pre-activation 1.5e-4 from 0, before a GPU ran it."""
    h, x, kw = kink_free_args(**dict(dict(n=6, d=20, H=16, E=3, T=4), **case))
    plain_h, plain_x, plain_kw = make_args(**dict(dict(n=6, d=20, H=16, E=3, T=4), **case))
    assert pre_activations(h, x, kw).abs().min() > 0.2
    if case.get("n", 6) >= 300:  # the failing case: plain arguments sit on a kink
        assert pre_activations(plain_h, plain_x, plain_kw).abs().min() < 1e-3


@pytest.mark.cuda
@pytest.mark.parametrize("case", GPU_GRADIENT_CASES)
def test_bf16_gradients_on_gpu(case):
    args = dict(n=6, d=20, H=16, E=3, T=4)
    args.update(case)
    h, x, kw = kink_free_args(**args)
    want, _ = grads_of(reference_iterate, h, x, kw, torch.float64)
    got, _ = grads_of(triton_fn(None), h, x, kw, torch.bfloat16)
    assert_grads_match(got, want, tol=3e-2)


@pytest.mark.cuda
def test_small_model_trains_like_the_reference():
    """Two tiny models, identical but for the iterate's backend, trained 20 steps on the same
    batches: the loss curves agree (bf16 kernels vs fp32 eager)."""
    from inl_kernels.modules import Controller, IntegratorLayer

    def model(backend):
        torch.manual_seed(0)
        d = 64
        controller = Controller(d, hidden=32)
        layers = torch.nn.ModuleList(IntegratorLayer(d, controller, num_iterations=4, backend=backend)
                                     for _ in range(2))
        return torch.nn.ModuleDict(dict(embed=torch.nn.Linear(16, d), layers=layers,
                                        head=torch.nn.Linear(d, 8))).cuda()

    def train(backend, dtype):
        net = model(backend)
        opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
        g = torch.Generator(device="cuda").manual_seed(1)
        losses = []
        for _ in range(20):
            inp = torch.randn(96, 16, device="cuda", generator=g)
            target = torch.randint(0, 8, (96,), device="cuda", generator=g)
            with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
                x = net["embed"](inp)
                for layer in net["layers"]:
                    out, info = layer(x.to(dtype), x.to(dtype), return_info=True)
                    x = x + out.float()
                loss = torch.nn.functional.cross_entropy(net["head"](x).float(), target)
                loss = loss + 0.01 * (info.energy.mean() + info.distance.mean())
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return torch.tensor(losses)

    ref = train("reference", torch.float32)
    ours = train("triton", torch.float32)
    torch.testing.assert_close(ours, ref, rtol=1e-3, atol=1e-3)
    assert ref[-1] < ref[0]
    ours_bf16 = train("triton", torch.bfloat16)
    torch.testing.assert_close(ours_bf16, ref, rtol=5e-2, atol=5e-2)
