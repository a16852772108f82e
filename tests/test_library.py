"""Our ops as first-class PyTorch ops: every compiled kernel is a torch.library op that passes
`torch.library.opcheck` (schema, fake tensors, autograd registration, AOT dispatch), and the
model traces without a graph break, compiles with fullgraph=True to the eager result (logits and
every gradient), and exports with torch.export."""
import pytest
import torch

import inl_kernels
import inl_llm
from tests.iterate_cases import make_args

CPU = pytest.mark.skipif("cpu" not in inl_kernels.backends(), reason="the C++ extension is not built")


def folded(h, x, kw, dtype=torch.float32, requires_grad=False):
    """The cpu_iterate op's tensor arguments for make_args()' case."""
    from inl_kernels.common import fold_parameters, iterate_bundle

    _, _, v, params, settings = iterate_bundle(h, x, **kw)
    f = fold_parameters(params, settings, x.shape[1], torch.float32)
    tensors = [h, x, v, params.w_h, params.w_x, params.w_v, params.w_o, f.bias, params.b_o, f.mod, params.mu, f.table]
    tensors = [None if t is None else t.detach().to(dtype if i < 3 else torch.float32).requires_grad_(requires_grad)
               for i, t in enumerate(tensors)]
    return tensors, settings


@CPU
@pytest.mark.parametrize("case", ["inference", "early_exit", "trajectory", "training", "no_v_no_table"])
def test_opcheck_cpu_iterate(case):
    from inl_kernels.cpu.iterate import cpu_iterate_op

    h, x, kw = make_args(n=5, d=12, H=8, E=0 if case == "no_v_no_table" else 2, T=3, dtype=torch.float32,
                         with_v=case != "no_v_no_table")
    tensors, s = folded(h, x, kw, requires_grad=case == "training")
    tol = 1e-2 if case == "early_exit" else None
    args = (*tensors, s.dt, s.kappa, s.num_iterations, tol, 1, case == "trajectory", case == "training")
    torch.library.opcheck(cpu_iterate_op, args)


@CPU
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_cpu_rms_norm(residual, dtype):
    from inl_kernels.cpu.rms_norm import cpu_rms_norm_op

    x = torch.randn(4, 3, 16).to(dtype).requires_grad_(True)
    w = torch.randn(16).to(dtype).requires_grad_(True)
    r = torch.randn(4, 3, 16).to(dtype).requires_grad_(True) if residual else None
    torch.library.opcheck(cpu_rms_norm_op, (x, w, 1e-6, r))


def _model(backend):
    torch.manual_seed(0)
    return inl_llm.create_model("tiny", backend=backend, num_layers=2)  # two blocks trace as well as four


def _loss(model, ids):
    return model(ids)[0].float().logsumexp(-1).mean()


BACKENDS = ["reference"] + (["auto"] if "cpu" in inl_kernels.backends() else [])


@pytest.mark.parametrize("backend", BACKENDS)
def test_model_traces_without_graph_breaks(backend):
    model = _model(backend)
    ids = torch.randint(0, 259, (2, 9))
    model.train()
    train = torch._dynamo.explain(lambda ids: _loss(model, ids))(ids)
    model.eval()
    with torch.no_grad():
        evaluate = torch._dynamo.explain(lambda ids: model(ids)[0])(ids)
    for what, e in (("training step", train), ("eval forward", evaluate)):
        assert e.graph_break_count == 0 and e.graph_count == 1, (what, [str(b.reason) for b in e.break_reasons])


def _trained_side_by_side(model, compiled, ids):
    """(loss, {parameter name: gradient}) of one training step of `model`, then of `compiled`."""
    model.train()
    grads = []
    for m in (model, compiled):
        loss = _loss(m, ids)
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
        model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("backend", BACKENDS)
def test_fullgraph_compile_gives_the_eager_result(backend):
    """aot_eager runs the traced forward and backward graphs without inductor's fusions, so the
    only difference from eager would be a wrong fake function or autograd formula: the results
    must be equal bit for bit."""
    model = _model(backend)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    ids = torch.randint(0, 259, (2, 9))
    (l0, g0), (l1, g1) = _trained_side_by_side(model, compiled, ids)
    assert torch.equal(l0, l1)
    assert g0.keys() == g1.keys() and len(g0) == len(list(model.parameters()))
    for name in g0:
        assert torch.equal(g0[name], g1[name]), name
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids)[0], compiled(ids)[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_inductor_compiled_training_follows_eager(backend):
    """What users run: torch.compile with inductor's code generation, forward and backward. Its
    fusions reorder sums, so within fp32 rounding of eager, judged per parameter against its
    largest gradient. (The reference's iterate once had its gradients 1-5 % off under inductor:
    its per-step index_add of the excitation, compiled wrong, which aot_eager above cannot see;
    here that showed as 14x this bound.)"""
    model = _model(backend)
    inl_kernels.pin_inductor_vec_isa()
    compiled = torch.compile(model, fullgraph=True)
    ids = torch.randint(0, 259, (2, 9))
    (l0, g0), (l1, g1) = _trained_side_by_side(model, compiled, ids)
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-5)
    assert g0.keys() == g1.keys() and len(g0) == len(list(model.parameters()))
    for name in g0:
        scale = g0[name].abs().max().item()
        err = (g1[name] - g0[name]).abs().max().item()
        assert err <= 1e-5 * scale + 1e-8, (name, err, scale)  # ~50x what either backend shows


@pytest.mark.skipif("cpu" not in inl_kernels.backends(), reason="the C++ extension is not built")
def test_inductor_compile_of_our_model_matches_eager():
    """With inductor's code generation around our ops (what users run): within fp32 rounding."""
    model = _model("auto")
    compiled = torch.compile(model, fullgraph=True)
    ids = torch.randint(0, 259, (2, 9))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids)[0], model(ids)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_compiled_training_through_the_triton_ops(dtype):
    """On a GPU the auto backend runs the Triton ops, the iterate's training path included
    (inl::triton_iterate_train / _backward): the tiny model's training step traces without a
    graph break, aot_eager gives the eager bits, and inductor (which traces into the kernels)
    the eager values within rounding."""
    torch.manual_seed(0)
    model = inl_llm.create_model("tiny", backend="auto", num_layers=2).cuda().train()
    ids = torch.randint(0, 259, (2, 40), device="cuda")

    def loss_of(m):
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            return _loss(m, ids)

    explained = torch._dynamo.explain(loss_of)(model)
    assert explained.graph_break_count == 0, [str(b.reason) for b in explained.break_reasons]
    results = {}
    for name, m in (("eager", model), ("aot_eager", torch.compile(model, fullgraph=True, backend="aot_eager")),
                    ("inductor", torch.compile(model, fullgraph=True))):
        loss = loss_of(m)
        loss.backward()
        results[name] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
        model.zero_grad(set_to_none=True)
    (l0, g0), (l1, g1), (l2, g2) = results["eager"], results["aot_eager"], results["inductor"]
    assert torch.equal(l0, l1) and all(torch.equal(g0[n], g1[n]) for n in g0)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(l2, l0, rtol=tol, atol=tol)
    for n in g0:
        scale = g0[n].abs().max().clamp_min(1e-12)
        assert ((g2[n] - g0[n]).abs().max() / scale).item() <= tol, n


class _Logits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(ids)[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_export_captures_the_eval_forward(backend):
    model = _model(backend).eval()
    ids = torch.randint(0, 259, (2, 9))
    with torch.no_grad():
        exported = torch.export.export(_Logits(model), (ids,))
        targets = {str(n.target) for n in exported.graph.nodes}
        if backend == "auto":  # the compiled kernels stay single ops in the graph
            assert {"inl.cpu_iterate.default", "inl.cpu_rms_norm.default"} <= targets, targets
        other = torch.randint(0, 259, (2, 9))
        assert torch.equal(exported.module()(other), model(other)[0])


# ---- the Triton ops (torch.library.triton_op) ---------------------------------------------------
# Under the interpreter (no GPU) a Triton kernel runs as numpy code and cannot take fake tensors,
# so there opcheck drives the schema and autograd-registration checks; on a GPU every check runs.
GPU = torch.cuda.is_available()
TRITON_CHECKS = None if GPU else ("test_schema", "test_autograd_registration")
DEVICE = "cuda" if GPU else "cpu"


def _triton_cases():
    from inl_kernels import rope_tables
    from inl_kernels.triton.attention import triton_attention_op
    from inl_kernels.triton.iterate import triton_iterate_op
    from inl_kernels.triton.rms_norm import triton_rms_norm_op
    from inl_kernels.triton.rope import triton_rope_op

    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).to(DEVICE).requires_grad_(True)  # noqa: E731
    cos, sin = rope_tables(24, 16, device=DEVICE)
    lens = torch.tensor([17, 24], device=DEVICE)
    return [
        ("rms_norm", triton_rms_norm_op, (r(5, 3, 16), r(16), 1e-6, None)),
        ("rms_norm+residual", triton_rms_norm_op, (r(5, 16), r(16), 1e-6, r(5, 16))),
        ("rope", triton_rope_op, (r(2, 4, 7, 16), r(2, 2, 7, 16), cos, sin, 3, False)),
        ("attention", triton_attention_op, (r(2, 4, 9, 16), r(2, 2, 9, 16), r(2, 2, 9, 16), cos, sin, None, None,
                                            True, 0.25, 0)),
        ("attention decode", triton_attention_op, (r(2, 4, 1, 16), r(2, 2, 24, 16), r(2, 2, 24, 16), None, None,
                                                   lens, None, True, 0.25, 0)),
        ("iterate", triton_iterate_op, _iterate_op_args(tol=None)),
        ("iterate early exit", triton_iterate_op, _iterate_op_args(tol=1e-2)),
        # the GPU's fp32 blocks at H <= 32, register cap included (a launch option a traced
        # launch leaves out: iterate._traced)
        ("iterate capped", triton_iterate_op, _iterate_op_args(tol=1e-2, path="tile",
                                                               config="BD=8,BM=128,maxnreg=128,num_warps=8")),
    ]


def _iterate_op_args(tol, path="", config=""):
    """The inference op's arguments (no gradients: it has no autograd formula; training runs the
    autograd.Function)."""
    h, x, kw = make_args(n=5, d=12, H=16, E=2, T=3, dtype=torch.float32, device=DEVICE)
    tensors, s = folded(h, x, kw)
    h, x, v, w_h, w_x, w_v, w_o, bias, b_o, mod, mu, table = tensors
    return (h, x, v, w_h, w_x, w_v, w_o, b_o, bias, mod, mu, table, s.dt, s.kappa, s.num_iterations, tol, 1, False,
            path, config)


def _iterate_train_args(dtype):
    """The training op's arguments (leaves that require grad) and, from one run of it, the
    backward op's: for bf16 the saved state pair is real and the backward overwrites it."""
    from inl_kernels.triton.iterate import triton_iterate_train_op

    h, x, kw = make_args(n=5, d=12, H=16, E=2, T=3, dtype=dtype, device=DEVICE)
    tensors, s = folded(h, x, kw, dtype=dtype)
    h, x, v, w_h, w_x, w_v, w_o, bias, b_o, mod, mu, table = tensors
    train = (h, x, v, w_h, w_x, w_v, w_o, b_o, bias, mod, mu, table, s.dt, s.kappa, s.num_iterations, "")
    leaves = tuple(t.detach().requires_grad_(True) if isinstance(t, torch.Tensor) else t for t in train)
    with torch.no_grad():
        out = triton_iterate_train_op(*train)
    g = torch.Generator().manual_seed(1)
    upstream = [torch.randn(t.shape, generator=g).to(DEVICE, t.dtype) for t in out[:4]]
    backward = (h, x, v, w_h, w_x, w_v, w_o, b_o, mod, mu, table, *out[5:], *upstream, s.dt, s.kappa,
                s.num_iterations, "", True)
    return leaves, backward


def _opcheck(op, args):
    torch.library.opcheck(op, args, test_utils=TRITON_CHECKS) if TRITON_CHECKS else torch.library.opcheck(op, args)


@pytest.mark.parametrize("index", range(8), ids=["rms_norm", "rms_norm+residual", "rope", "attention",
                                                 "attention decode", "iterate", "iterate early exit",
                                                 "iterate capped"])
def test_opcheck_triton_ops(index):
    pytest.importorskip("triton")
    _, op, args = _triton_cases()[index]
    _opcheck(op, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_triton_iterate_training_ops(dtype):
    """The training forward and its backward op, which overwrites the saved bf16 state pair
    (declared in its schema: mutates_args)."""
    pytest.importorskip("triton")
    from inl_kernels.triton.iterate import triton_iterate_backward_op, triton_iterate_train_op

    train, backward = _iterate_train_args(dtype)
    _opcheck(triton_iterate_train_op, train)
    _opcheck(triton_iterate_backward_op, backward)


def test_every_compiled_kernel_is_a_registered_op():
    """The op names a trace or an exported graph shows: one per kernel entry, under `inl`."""
    import importlib

    names = set()
    for backend in inl_kernels.backends():
        if backend == "triton":
            for op in ("attention", "iterate", "rms_norm", "rope"):
                importlib.import_module(f"inl_kernels.triton.{op}")
            names |= {"triton_attention", "triton_attention_backward", "triton_iterate", "triton_iterate_train",
                      "triton_iterate_backward", "triton_rms_norm",
                      "triton_rms_norm_backward", "triton_rope"}
        if backend == "cpu":
            names |= {"cpu_iterate", "cpu_iterate_backward", "cpu_rms_norm", "cpu_rms_norm_backward", "cpu_rope",
                      "cpu_silu_mul", "cpu_silu_mul_backward", "cpu_swiglu_rows", "cpu_attention_prefill",
                      "cpu_attention_prefill_train", "cpu_attention_prefill_backward"}
    for name in names:
        assert hasattr(torch.ops.inl, name), name


@pytest.mark.parametrize("backend", [b for b in inl_kernels.BACKENDS if b in inl_kernels.backends()])
def test_model_runs_on_every_named_backend(backend):
    """A model built with a backend name runs the ops that backend has kernels for and lets auto
    pick the rest (the cpu backend has no embedding kernel, the triton backend none on CPU tensors
    for swiglu): every available name runs, and gives the reference's logits."""
    model = inl_llm.create_model("tiny", backend=backend, num_layers=1).eval()
    reference = inl_llm.create_model("tiny", backend="reference", num_layers=1).eval()
    ids = torch.randint(0, 259, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[0], reference(ids)[0], rtol=1e-4, atol=1e-4)


def _transform_cases():
    from inl_kernels.reference.rope import rope_tables
    from tests.iterate_cases import make_args

    g = torch.Generator().manual_seed(0)
    h, x, kw = make_args(n=4, d=8, H=4, E=2, T=3, dtype=torch.float32)
    w = torch.randn(8, generator=g)
    wg, wu, wd = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g), torch.randn(8, 6, generator=g)
    cos, sin = rope_tables(16, 4, 10000.0)
    q, k, v = (torch.randn(1, 2, 3, 4, generator=g) for _ in range(3))
    F = inl_kernels
    return {  # op -> (function of one input and a backend, the input)
        "rms_norm": (lambda a, be: F.rms_norm(a, w, backend=be), x),
        "swiglu": (lambda a, be: F.swiglu(a, wg, wu, wd, backend=be), x),
        "iterate": (lambda a, be: F.inl_iterate(h, a, **kw, backend=be), x),
        "rope": (lambda a, be: F.rope(a, k, cos, sin, 2, backend=be)[0], q),
        "attention": (lambda a, be: F.gqa_attention(a, k, v, rope=(cos, sin), backend=be), q),
        "decode attention": (lambda a, be: F.gqa_attention(a[:, :, :1], k, v, rope=(cos, sin), backend=be), q),
    }


@pytest.mark.parametrize("op", ["rms_norm", "swiglu", "iterate", "rope", "attention", "decode attention"])
def test_forward_mode_ad_and_torch_func_run_on_the_reference(op):
    """The fused ops register a reverse-mode backward only: under forward-mode AD (torch.func.jvp,
    torch.autograd.forward_ad) they gave a zero tangent without a word, and torch.func.grad refused
    them. `auto` now runs such calls on the reference (same values, bit for bit, as asking for it),
    and naming a fused backend is a ValueError that says why."""
    import torch.autograd.forward_ad as fwAD
    from torch.func import grad, jvp, vmap

    fn, a = _transform_cases()[op]
    tangent = torch.randn_like(a)
    want = jvp(lambda t: fn(t, "reference"), (a,), (tangent,))
    got = jvp(lambda t: fn(t, "auto"), (a,), (tangent,))
    assert want[1].abs().max() > 0
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    with fwAD.dual_level():
        dual = fwAD.unpack_dual(fn(fwAD.make_dual(a, tangent), "auto")).tangent
    assert dual is not None and torch.equal(dual, want[1])
    weights = torch.randn_like(fn(a, "reference"))
    g_want = grad(lambda t: (fn(t, "reference") * weights).sum())(a)
    assert torch.equal(grad(lambda t: (fn(t, "auto") * weights).sum())(a), g_want)
    if op == "rms_norm":  # vmap over a batch of inputs
        batch = torch.stack([a, 2 * a])
        assert torch.equal(vmap(lambda t: fn(t, "auto"))(batch), vmap(lambda t: fn(t, "reference"))(batch))
    if "cpu" in inl_kernels.backends():
        with pytest.raises(ValueError, match="forward-mode AD"):
            jvp(lambda t: fn(t, "cpu"), (a,), (tangent,))
        # plain eager calls still take the fused kernel
        from inl_kernels._dispatch import resolve
        assert resolve("rms_norm", "auto", "cpu", a[..., :8].reshape(-1, 8), torch.ones(8), 1e-6, None).__module__ \
            .startswith("inl_kernels.cpu")
