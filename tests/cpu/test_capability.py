"""One build for every x86-64 CPU: the kernels are compiled once per instruction set (AVX-512,
AVX2 + FMA, baseline), one path runs at a time, chosen from the CPU's features or pinned by
INL_KERNELS_CPU_CAPABILITY. What is guaranteed across paths, and tested here:

- on each path, the same input gives the same bits on every run and thread count, and a row's
  bits do not depend on its batch (tests/cpu/test_iterate.py runs on every path);
- the paths agree with the float64 reference within the same tolerances, and with each other
  within a few float32 ulp, but not bit for bit: their reciprocals start from different hardware
  estimates (rcp14 with AVX-512, rcpps with AVX2, a division on the baseline; rcpps also differs
  between Intel and AMD), the baseline has no FMA, and the parameter gradients add 16 or 8 lanes.
"""
import os
import platform
import re
import shutil
import subprocess
import sys

import pytest
import torch

from inl_kernels import inl_iterate
from inl_kernels.cpu import unavailable_reason
from tests.iterate_cases import GRAD_NAMES, make_args

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
X86 = platform.machine().lower() in ("x86_64", "amd64")


def run_child(code, **env):
    """Runs `code` in a fresh interpreter with extra environment variables; returns the process."""
    full = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "python"),
                                                       os.environ.get("PYTHONPATH", "")]), **env)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=full, capture_output=True, text=True,
                          timeout=300)


def test_info_names_the_path_in_use():
    from inl_kernels import cpu
    info = cpu.info()
    assert info["capability"] == cpu.capability() and info["capability"] in info["capabilities"]
    assert info["capabilities"] == [p for p in info["built"] if p in info["capabilities"]]
    assert info["vector_width"] == {"avx512": 16, "avx2": 8, "base": 4}.get(info["capability"], info["vector_width"])
    if X86 and os.environ.get("INL_KERNELS_MARCH") is None:
        assert info["built"] == ["avx512", "avx2", "base"]  # every path side by side
        assert "base" in info["capabilities"]
    with pytest.raises(RuntimeError, match="no CPU path called 'sse9'"):
        cpu.set_capability("sse9")
    assert cpu.capability() == info["capability"]  # a failed switch changes nothing


@pytest.mark.skipif(not X86, reason="the x86 paths")
def test_default_build_runs_the_avx2_path_when_forced():
    """What a machine without AVX-512 gets from a default build: the AVX2 path, pinned here by the
    environment variable in a fresh process, computing what the reference computes."""
    from inl_kernels import cpu
    if "avx2" not in cpu.capabilities():
        pytest.skip("this CPU has no AVX2 + FMA")
    code = ("import torch, inl_kernels, inl_kernels.cpu as c\n"
            "from tests.iterate_cases import make_args\n"
            "h, x, kw = make_args(n=40, d=24, H=8, E=2, T=3, dtype=torch.float32)\n"
            "out = inl_kernels.inl_iterate(h, x, **kw, backend='cpu')\n"
            "ref = inl_kernels.inl_iterate(h.double(), x.double(), **{k: (t.double() if torch.is_tensor(t) and "
            "t.is_floating_point() else t) for k, t in kw.items()}, backend='reference')\n"
            "print(c.capability(), c.info()['vector_width'], float((out.double() - ref).abs().max()))\n")
    proc = run_child(code, INL_KERNELS_CPU_CAPABILITY="avx2")
    assert proc.returncode == 0, proc.stderr
    path, width, err = proc.stdout.split()
    assert (path, width) == ("avx2", "8") and float(err) < 1e-5


def test_a_path_the_cpu_cannot_run_is_refused_not_a_crash():
    """Pinning a path that this build lacks (or this CPU cannot run) leaves the cpu backend
    unavailable with the reason; `auto` falls back to the reference, nothing dies of SIGILL."""
    code = ("import torch, inl_kernels\n"
            "from inl_kernels.cpu import unavailable_reason\n"
            "from tests.iterate_cases import make_args\n"
            "h, x, kw = make_args(n=3, d=8, H=4, E=1, T=2, dtype=torch.float32)\n"
            "inl_kernels.inl_iterate(h, x, **kw)\n"
            "print('cpu' in inl_kernels.backends(), unavailable_reason())\n")
    proc = run_child(code, INL_KERNELS_CPU_CAPABILITY="avx1024")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("False INL_KERNELS_CPU_CAPABILITY=avx1024: no CPU path called 'avx1024'")


@pytest.mark.skipif(not X86 or shutil.which("objdump") is None, reason="needs objdump on x86-64")
def test_no_vector_instruction_leaks_out_of_its_path():
    """The SIGILL this guards against: an AVX-512 instruction in code that an AVX2 CPU runs. In the
    built extension, every function that uses an AVX-512 register must belong to inl::avx512, and
    every function with a VEX/EVEX instruction or a BMI one (x86-64-v3) to inl::avx512 or inl::avx2
    (an inline std:: function compiled for one path and picked by the linker would show here)."""
    import inl_kernels._C as ext
    text = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", ext.__file__], capture_output=True,
                          text=True, timeout=300).stdout
    v4 = re.compile(r"%zmm|%k[0-7]\b")
    v3 = re.compile(r"^(v\w+|shlx|shrx|sarx|rorx|andn|bextr|blsi|blsr|blsmsk|lzcnt|tzcnt|pdep|pext|mulx|movbe)\b")
    leaks, function, seen = set(), None, 0
    for line in text.splitlines():
        m = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if m:
            function = m.group(1)
            continue
        if function is None or "\t" not in line:
            continue
        ins = line.split("\t", 1)[1].strip()
        if "inl::avx512::" in function:
            seen += bool(v4.search(ins))
            continue
        if v4.search(ins):
            leaks.add(("AVX-512", function))
        elif v3.match(ins) and "inl::avx2::" not in function:
            leaks.add(("x86-64-v3", function))
    assert seen, "no AVX-512 code found at all: the paths were not built side by side"
    assert not leaks, sorted(leaks)[:20]


def test_paths_agree_within_a_few_ulp():
    """Every path this CPU runs against the others, forward and gradients: within float32 rounding
    (not bit for bit, see the module docstring)."""
    from inl_kernels import cpu
    h, x, kw = make_args(n=70, d=37, H=16, E=3, T=5, dtype=torch.float32)
    results = {}
    before = cpu.capability()
    try:
        for path in cpu.capabilities():
            cpu.set_capability(path)
            with torch.no_grad():
                out, info = inl_iterate(h, x, **kw, return_info=True, backend="cpu")
            leaves = {k: kw[k].clone().requires_grad_(True) for k in GRAD_NAMES}
            hh = h.clone().requires_grad_(True)
            o, i = inl_iterate(hh, x, **dict(kw, **leaves), return_info=True, backend="cpu")
            (o.sum() + i.energy.sum() + i.distance.sum()).backward()
            results[path] = [out, info.v, info.energy, hh.grad] + [leaves[k].grad for k in GRAD_NAMES]
    finally:
        cpu.set_capability(before)
    paths = list(results)
    for other in paths[1:]:
        for a, b in zip(results[paths[0]], results[other]):
            scale = max(1.0, a.abs().max().item())
            torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6 * scale)


def test_switching_the_path_between_forward_and_backward_is_refused():
    """The training forward saves the controller's activations in its path's row blocks (32, 16
    or 8 rows): a backward on another path read them in the wrong layout and returned wrong
    gradients without a word when N and H made the element counts equal. Now an error."""
    from inl_kernels import cpu
    paths = cpu.capabilities()
    if len(paths) < 2:
        pytest.skip("one runnable CPU path")
    before = cpu.capability()
    h, x, kw = make_args(n=64, d=16, H=32, E=2, T=3, dtype=torch.float32)
    x = x.clone().requires_grad_(True)
    try:
        cpu.set_capability(paths[0])
        out = inl_iterate(h, x, **kw, backend="cpu")
        cpu.set_capability(paths[1])
        with pytest.raises(RuntimeError, match="CPU path changed between the iterate's forward"):
            out.sum().backward()
        cpu.set_capability(paths[0])
        out = inl_iterate(h, x, **kw, backend="cpu")
        out.sum().backward()  # on its own path the backward runs
        assert torch.isfinite(x.grad).all()
    finally:
        cpu.set_capability(before)


@pytest.mark.parametrize("call", ["rms_norm weight", "rms_norm residual", "rms_norm_backward grad_y",
                                  "rms_norm_backward grad_s", "swiglu_backward grad", "iterate_backward grad_x"])
def test_the_bindings_refuse_tensors_off_the_cpu(call):
    """A meta tensor handed to the extension directly: an error naming it (the weight, grad_y, the
    swiglu gradient and the iterate's grad_x were read through a null pointer: a segfault)."""
    from inl_kernels.cpu import _C
    meta = lambda t: t.to("meta")  # noqa: E731
    x, w = torch.randn(3, 8), torch.ones(8)
    y, s, rstd = _C.rms_norm_forward(x, w, 1e-6, x.clone())
    with pytest.raises(RuntimeError, match="CPU tensor"):
        if call == "rms_norm weight":
            _C.rms_norm_forward(x, meta(w), 1e-6, None)
        elif call == "rms_norm residual":
            _C.rms_norm_forward(x, w, 1e-6, meta(x))
        elif call == "rms_norm_backward grad_y":
            _C.rms_norm_backward(meta(x), None, x, w, rstd)
        elif call == "rms_norm_backward grad_s":
            _C.rms_norm_backward(x, meta(x), x, w, rstd)
        elif call == "swiglu_backward grad":
            _C.swiglu_backward(meta(x), x, x)
        else:
            from inl_kernels.cpu.iterate import _kernel_weights
            from inl_kernels.common import iterate_bundle
            h, xi, kw = make_args(n=3, d=8, H=4, E=1, T=2, dtype=torch.float32)
            weights, _ = _kernel_weights(*iterate_bundle(h, xi, **kw)[3:], 8, False)
            zeros = torch.zeros(3, 2)
            _C.iterate_backward(h, xi, None, *weights, 0.1, 1.0, 2, meta(xi), xi, zeros, zeros, None, None, None)
