"""Eager inference calls the C++ kernels without their torch.library op's dispatch
(common.eager_direct): the same function on the same arguments, so the same bits as the op;
and everywhere the op's machinery matters (a gradient, the profiler, a dispatch or function
mode, a functorch transform, a tensor subclass, torch.compile) the op runs as before."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import inl_kernels
from inl_kernels.common import eager_direct
from inl_kernels.cpu import unavailable_reason
from tests.iterate_cases import converging_args, make_args

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))


class _Passthrough(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class _Sub(torch.Tensor):
    pass


def test_eager_direct_only_in_plain_eager_inference():
    x = torch.randn(3)
    w = torch.nn.Parameter(torch.randn(3))
    assert not eager_direct(x, w)  # w wants a gradient
    assert not eager_direct(x, (w, None))  # also inside a tuple (IterateParams)
    with torch.no_grad():
        assert eager_direct(x, w, None, (w, x))
        assert not eager_direct(x.as_subclass(_Sub))
        with torch.profiler.profile():
            assert not eager_direct(x)
        with _Passthrough():
            assert not eager_direct(x)
        assert torch.vmap(lambda t: torch.tensor(eager_direct(t)))(x.view(3, 1)).sum() == 0
    with torch.inference_mode():
        assert eager_direct(x, w)


def _forbid(monkeypatch, module, op_name):
    """Makes the registered op fail if called: the direct path must not need it."""
    def boom(*args, **kwargs):
        raise AssertionError(f"{op_name} called")
    monkeypatch.setattr(module, op_name, boom)


def _no_direct(monkeypatch, module):
    monkeypatch.setattr(module, "eager_direct", lambda *values: False)


def _through_op_and_direct(monkeypatch, mod, op_name, call):
    """call() without gradients twice: through the registered op (direct path off), then directly
    (the op made to fail if called)."""
    with torch.no_grad():
        with monkeypatch.context() as m:
            _no_direct(m, mod)
            through_op = call()
        with monkeypatch.context() as m:
            _forbid(m, mod, op_name)
            direct = call()
    return through_op, direct


def _same_bits(a, b):
    if isinstance(a, (tuple, list)):
        assert type(a) is type(b) and len(a) == len(b)
        for p, q in zip(a, b):
            _same_bits(p, q)
        return
    if a is None or not isinstance(a, torch.Tensor):
        assert a == b
        return
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a, b) or (a.isnan() == b.isnan()).all() and torch.equal(a.nan_to_num(), b.nan_to_num())


def _iterate_call(early_exit, trajectory, dtype):
    h, x, kw = (converging_args(dtype=dtype, seed=3) if early_exit else make_args(dtype=dtype, seed=3))
    extra = dict(tol=1e-3, min_iterations=2) if early_exit else {}
    return lambda: inl_kernels.inl_iterate(h, x, backend="cpu", return_info=True, return_trajectory=trajectory,
                                           **kw, **extra)


@pytest.mark.parametrize("early_exit,trajectory", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_iterate_direct_equals_op(monkeypatch, early_exit, trajectory, dtype):
    from inl_kernels.cpu import iterate as mod
    call = _iterate_call(early_exit, trajectory, dtype)
    through_op, direct = _through_op_and_direct(monkeypatch, mod, "cpu_iterate_op", call)
    _same_bits(tuple(direct[1]) + (direct[0],), tuple(through_op[1]) + (through_op[0],))


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rms_norm_direct_equals_op(monkeypatch, residual, dtype):
    from inl_kernels.cpu import rms_norm as mod
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 37, generator=g).to(dtype)
    w = torch.randn(37, generator=g).to(dtype)
    r = torch.randn(3, 37, generator=g).to(dtype) if residual else None
    call = lambda: inl_kernels.rms_norm(x, w, 1e-5, residual=r, backend="cpu")  # noqa: E731
    through_op, direct = _through_op_and_direct(monkeypatch, mod, "cpu_rms_norm_op", call)
    _same_bits(direct, through_op)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_direct_equals_op(monkeypatch, dtype):
    from inl_kernels.cpu import swiglu as mod
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 3, 24, generator=g).to(dtype)
    ws = [(torch.randn(*s, generator=g) / 6).to(dtype) for s in ((40, 24), (40, 24), (24, 40))]
    call = lambda: inl_kernels.swiglu(x, *ws, backend="cpu")  # noqa: E731
    through_op, direct = _through_op_and_direct(monkeypatch, mod, "cpu_silu_mul_op", call)
    _same_bits(direct, through_op)


def test_gradients_and_the_profiler_keep_the_op(monkeypatch):
    """With a gradient wanted, or under the profiler, the registered op runs (and shows in the
    trace by name, with the public op's range around it)."""
    from inl_kernels.cpu import rms_norm as mod
    calls = []
    op = mod.cpu_rms_norm_op

    def counting(*args):
        calls.append(1)
        return op(*args)
    monkeypatch.setattr(mod, "cpu_rms_norm_op", counting)
    x = torch.randn(2, 8, requires_grad=True)
    w = torch.ones(8)
    inl_kernels.rms_norm(x, w, backend="cpu").sum().backward()
    assert len(calls) == 1 and x.grad is not None
    with torch.no_grad(), torch.profiler.profile() as prof:
        inl_kernels.rms_norm(x, w, backend="cpu")
    assert len(calls) == 2
    names = {e.name for e in prof.events()}
    assert {"inl::rms_norm", "inl::cpu_rms_norm"} <= names
    with torch.no_grad():
        inl_kernels.rms_norm(x, w, backend="cpu")
    assert len(calls) == 2  # plain eager inference: direct


@pytest.mark.usefixtures("one_thread")
def test_model_generation_unchanged_by_the_direct_path(monkeypatch):
    """A whole greedy generation through the C++ backend gives the same tokens and logits with
    and without the direct calls."""
    import inl_llm
    from inl_kernels.cpu import iterate, rms_norm, swiglu
    from inl_llm import lean_decode
    torch.manual_seed(0)
    model = inl_llm.create_model("tiny", backend="cpu").eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        direct = inl_llm.generate(model, ids, max_new_tokens=6, do_sample=False)
        logits_direct = model(ids)[0]
        with monkeypatch.context() as m:
            for mod in (iterate, rms_norm, swiglu):
                _no_direct(m, mod)
            # every decode step through the model's forward too (the lean step would call direct)
            m.setattr(lean_decode.LeanDecodeStep, "build", classmethod(lambda cls, model, cache: None))
            through_op = inl_llm.generate(model, ids, max_new_tokens=6, do_sample=False)
            logits_op = model(ids)[0]
    assert torch.equal(direct, through_op)
    assert torch.equal(logits_direct, logits_op)


def test_jit_trace_records_the_op_not_its_empty_outputs():
    """torch.jit.trace sees ops only: under tracing the backends keep their registered ops, so the
    traced function computes (the direct call would leave only the outputs' allocation)."""
    g = torch.Generator().manual_seed(7)
    x, w = torch.randn(3, 16, generator=g), torch.randn(16, generator=g)
    with torch.no_grad():
        assert eager_direct(x, w)
        traced = torch.jit.trace(lambda a, b: inl_kernels.rms_norm(a, b, backend="cpu"), (x, w), check_trace=False)
        x2 = torch.randn(3, 16, generator=g)
        torch.testing.assert_close(traced(x2, w), inl_kernels.rms_norm(x2, w, backend="reference"))


def test_forward_mode_ad_keeps_the_op():
    """Inside a forward-AD level a tangent may ride on any input: the direct path is off, so a
    dual input is never silently stripped of its tangent."""
    import torch.autograd.forward_ad as fwAD
    x = torch.randn(2, 8)
    with torch.no_grad():
        assert eager_direct(x)
        with fwAD.dual_level():
            assert not eager_direct(x)


def test_direct_calls_answers_true_inside_and_restores_after():
    from inl_kernels.common import direct_calls
    w = torch.nn.Parameter(torch.randn(3))
    assert not eager_direct(w)  # grad mode on and w wants a gradient
    with direct_calls():
        assert eager_direct(w)
        with direct_calls():
            assert eager_direct(w)
        assert eager_direct(w)  # the inner block leaves the outer one's answer
    assert not eager_direct(w)
    with pytest.raises(KeyError):
        with direct_calls():
            raise KeyError
    assert not eager_direct(w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("early_exit", [False, True])
def test_prepared_inference_gives_the_bits_of_iterate(dtype, early_exit):
    """cpu.iterate.prepared_inference folds and packs once and then calls the kernel as iterate()
    does: the same x_T, velocity, step counts and statistics, call after call."""
    from inl_kernels import IterateParams, _validate as check
    from inl_kernels.common import direct_calls
    from inl_kernels.cpu import iterate as mod
    h, x, kw = (converging_args(dtype=dtype, seed=4) if early_exit else make_args(dtype=dtype, seed=4, with_v=False))
    extra = dict(tol=1e-3, min_iterations=2) if early_exit else dict(tol=None, min_iterations=3)
    names = ("w_h", "b_h", "w_x", "b_x", "w_v", "b_v", "w_o", "b_o", "mod_scale", "mod_bias", "mu", "exc_index",
             "gamma", "phi")
    params = IterateParams(*(kw[k] for k in names))
    settings = check.iterate_args(h, x, None, params, kw["amplitude"], kw["dt"], kw["kappa"], kw["num_iterations"],
                                  extra["tol"], extra["min_iterations"], True, False)
    with torch.no_grad():
        want = mod.iterate(h, x, None, params, settings)
        run = mod.prepared_inference(params, settings, x.shape[1])
        with direct_calls():
            for _ in range(2):
                got = run(h, x)
                _same_bits((got[0],) + tuple(got[1]), (want[0],) + tuple(want[1]))
    if early_exit:
        assert len(set(want[1].iterations.tolist())) > 1
