"""The whole INL-LLM model side by side in one process: the eager model (every op on the
reference backend), ours (backend "auto": Triton on a GPU, the C++ backend on a CPU) and, with
--compile, `torch.compile` of each. Every implementation of a size and mode is built first and
then timed in interleaved rounds (each round calls each one in turn), so a slow period of a
shared machine hits them alike and their ratios hold.

    python -m benchmarks.bench_model --device cpu --size tiny small --json benchmarks/results/model-cpu.json
    python -m benchmarks.bench_model --device cuda --size medium --dtype bf16 --batch 8 --seq 1024
    python -m benchmarks.bench_model --quick                         # a seconds-long smoke run

Modes (each a row per implementation):
  forward  eval forward of batch × seq tokens, no KV cache (prefill): tokens/s
  train    forward + cross-entropy + backward + AdamW step in train mode: tokens/s, peak memory
  decode   greedy generation at batch 1 after a `prompt`-token prompt, KV cache on: new tokens/s
           (the time of N new tokens minus the time of 2, over N − 2: decode_calls)
  block    one block's training step (forward + backward) on batch × seq tokens: ms, peak memory

Floors: the forward's FLOPs (the matmuls of every projection, the attention scores, the
iterate's controller at its full step count, the LM head) over the GEMM rate measured in the
same interleaved rounds as the rows it judges (`torch.mm` of 2048³ on a CPU, 8192³ bf16 on a
GPU) give the forward's floor, three times that the training step's; the decode floor streams
every parameter byte once per token at the copy bandwidth measured in the same interleaved rounds
as the decode. "floor_frac" = floor / time (1.0 = at the floor).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# as in bench_iterate: the C++ ops keep the thread count the run set, and inductor's compile
# workers do not take the cores from the calls being timed
os.environ.setdefault("INL_KERNELS_ADAPTIVE_THREADS", "0")
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

COLUMNS = ["size", "mode", "impl", "dtype", "tokens", "ms", "tokens_per_s", "vs_reference", "floor_frac",
           "peak_mib", "note"]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def forward_flops(cfg, batch: int, seq: int) -> float:
    """FLOPs of one forward over batch × seq tokens (multiply-add = 2), every integrator running
    its full step count; causal attention counts the visible half of the score matrix."""
    d, L, T, H = cfg.d_model, cfg.num_layers, cfg.num_iterations, cfg.controller_hidden
    kv = cfg.num_kv_heads * cfg.head_dim
    tokens = batch * seq
    per_token_layer = (2 * d * (2 * d + 2 * kv)  # q, o; k, v
                       + 2 * 3 * d * cfg.feedforward_dim  # swiglu
                       + 2 * H * (d + 6 * d * T))  # controller: h layer once, x/v layers and output per step
    attention = L * batch * 2 * 2 * d * seq * (seq + 1) / 2  # q·kᵀ and p·v over the visible keys
    embed = 2 * cfg.embedding_rank * d if cfg.low_rank_embeddings else 0
    head = 2 * d * cfg.vocab_size
    return tokens * (L * per_token_layer + embed + head) + attention


def gemm_call(device, dtype):
    """(call, flops) of one square torch.mm: 2048³ on a CPU, 8192³ on a GPU."""
    n = 8192 if torch.device(device).type == "cuda" else 2048
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device, dtype)
    b = torch.randn(n, n, generator=g).to(device, dtype)
    return (lambda: a @ b), 2 * n**3


def gemm_rate(gemm, device) -> float:
    """FLOP/s of `gemm` (a gemm_call pair), measured now: the rate when no rows are timed beside it."""
    from benchmarks.common import time_fn

    call, flops = gemm
    return flops / (time_fn(call, device=device, warmup=2, repeat=5) / 1e3)


def build(size, backend, device, dtype, **overrides):
    import inl_llm

    model = inl_llm.create_model(size, backend=backend, **overrides)
    return model.to(device=device, dtype=dtype)


def _timed(fn, device, warmup, repeat):
    from benchmarks.common import time_fn

    return time_fn(fn, device=device, warmup=warmup, repeat=repeat)


def forward_call(model, batch, seq, device):
    """An eval forward (prefill) of batch × seq tokens."""
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=device,
                        generator=torch.Generator(device=device).manual_seed(0))
    model.eval()

    def call():
        with torch.no_grad():
            return model(ids)[0]
    return call


def train_call(model, batch, seq, device, autocast_dtype=None):
    """One training step: forward, cross-entropy, backward, AdamW."""
    import torch.nn.functional as F

    ids = torch.randint(0, model.config.vocab_size, (batch, seq + 1), device=device,
                        generator=torch.Generator(device=device).manual_seed(0))
    model.train()
    from inl_llm.train import fused_adamw_runs

    # the optimizer inl_llm.train uses: fused where torch has the kernel (both implementations)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused_adamw_runs(model.parameters()))

    def call():
        with torch.autocast(torch.device(device).type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(ids[:, :-1])[0]
            loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return call


def decode_calls(model, prompt, new_tokens, device, **how):
    """Greedy generation at batch 1 of 2 and of `new_tokens` new tokens (`how`: generate's
    compile / cuda_graph): ms per new token = (t_all − t_two) / (new_tokens − 2), so the
    prefill, the first token and (compiled / captured ways) the step's warm-up cancel."""
    ids = torch.randint(0, model.config.vocab_size, (1, prompt), device=device,
                        generator=torch.Generator(device=device).manual_seed(0))
    model.eval()
    return (lambda: model.generate(ids, 2, do_sample=False, **how),
            lambda: model.generate(ids, new_tokens, do_sample=False, **how))


def bench_block(model, batch, seq, device, warmup, repeat, autocast_dtype=None):
    """One block (the first) forward + backward on batch × seq activations; (ms, peak MiB)."""
    from benchmarks.common import peak_memory_mib

    block = model.blocks[0]
    block.train()
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, seq, model.config.d_model, generator=g).to(device)
    x = x.to(autocast_dtype or next(block.parameters()).dtype).requires_grad_(True)
    steps = model.config.num_iterations

    def call():
        with torch.autocast(torch.device(device).type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            out, _, _ = block(x, steps)
        out.float().square().mean().backward()
        block.zero_grad(set_to_none=True)
        x.grad = None
    ms = _timed(call, device, warmup, repeat)
    return ms, peak_memory_mib(call, device)


def _variants(size, impls, device, dtype, compile_too, huge_pages=False):
    """([(name, model, runner)], [failed rows' (name, exception)]) for every implementation and,
    with compile_too, torch.compile of each: a model that fails to build fails its rows only.
    With huge_pages, every CPU model's weights go on transparent huge pages alike."""
    out, failed = [], []
    if compile_too:
        from inl_kernels import pin_inductor_vec_isa
        pin_inductor_vec_isa()  # a cache written under another vector ISA would run wrong code
    for impl, backend in impls:
        for name, compiled in [(impl, False)] + ([(f"compile({impl})", True)] if compile_too else []):
            try:
                model = build(size, backend, device, dtype)
                if huge_pages and torch.device(device).type == "cpu":
                    from inl_kernels.cpu.pages import huge_pages as to_huge_pages
                    to_huge_pages(model)
                out.append((name, model, torch.compile(model) if compiled else model))
            except Exception as e:  # noqa: BLE001 - one failing implementation must not hide the others
                failed.append((name, e))
    return out, failed


def _time_side_by_side(named_calls, device, warmup, repeat, gemm=None):
    """{name: ms or the exception}: every call timed in interleaved rounds
    (benchmarks.common.interleaved_ms), so a slow period of a shared machine hits every call
    alike. A call that raises (on its first run or any later one) is reported with its exception
    and skipped from then on: one failing call must not hide the others. With `gemm` (a
    (call, flops) pair) the GEMM runs in the same rounds and results["gemm_rate"] is its FLOP/s:
    the floor's denominator measured alongside the rows it judges."""
    from benchmarks.common import interleaved_ms

    if gemm is not None:
        named_calls = list(named_calls) + [("gemm_rate", gemm[0])]
    errors = {}

    def guarded(name, call):
        def run():
            if name not in errors:
                try:
                    call()
                except Exception as e:  # noqa: BLE001
                    errors[name] = e
        return run

    calls = [guarded(name, call) for name, call in named_calls]
    for call in calls:  # the first run (compilation, autotuning) stays out of the warm-up count
        call()
    times = interleaved_ms(calls, max(0, warmup - 1), repeat, rounds=min(5, repeat), device=device)
    results = {name: errors.get(name, ms) for (name, _), ms in zip(named_calls, times)}
    if gemm is not None:
        ms = results.pop("gemm_rate")
        if isinstance(ms, float):
            results["gemm_rate"] = gemm[1] / (ms / 1e3)
    return results


def _failed(e):
    return f"failed: {type(e).__name__}: {str(e)[:200]}"


def _inference_rows(size, args, impls, device, dtype, rate, bandwidth, gemm, warmup, repeat):
    """The forward (prefill) and decode rows of one size: the inference models (cast to the
    benchmark dtype) live only inside this call."""
    rows = []
    tokens = args.batch * args.seq
    variants, failed = _variants(size, impls, device, dtype, args.compile, args.huge_pages == "on")
    for mode in ("forward", "decode"):
        if mode in args.modes:
            rows += [dict(size=size, impl=name, dtype=args.dtype, mode=mode, note=_failed(e)) for name, e in failed]
    if not variants:
        return rows
    cfg = variants[0][1].config
    if "forward" in args.modes:
        timed = _time_side_by_side([(name, forward_call(runner, args.batch, args.seq, device))
                                    for name, _, runner in variants], device, warmup, repeat, gemm)
        rate_now = timed.pop("gemm_rate", rate)
        floor = forward_flops(cfg, args.batch, args.seq) / rate_now * 1e3
        for name, ms in timed.items():
            base = dict(size=size, impl=name, dtype=args.dtype, mode="forward", tokens=tokens)
            rows.append(dict(base, note=_failed(ms)) if isinstance(ms, Exception) else
                        dict(base, ms=ms, tokens_per_s=tokens / ms * 1e3, floor_frac=floor / ms,
                             gemm_gflops=rate_now / 1e9))
    if "decode" in args.modes:
        # a compiled decode is generate(compile=True) (fullgraph, reduce-overhead on CUDA); on
        # CUDA ours also replays a hand-captured CUDA graph
        ways = []
        for name, model, _ in variants:
            ways.append((name, model, dict(compile=True) if name.startswith("compile(") else {}))
            if device == "cuda" and name == "ours":
                ways.append(("ours+cuda_graph", model, dict(cuda_graph=True)))
        weight_bytes = sum(p.numel() * p.element_size() for p in variants[0][1].parameters())
        calls = []
        for way, model, how in ways:
            two, full = decode_calls(model, args.prompt, args.new_tokens, device, **how)
            calls += [((way, "two"), two), ((way, "all"), full)]
        # the copy that gives the floor runs in the same rounds as the decode it judges (as the
        # GEMM does for the forward): a slow stretch of a shared machine moves both
        from benchmarks.common import copy_call

        copy, copy_bytes = copy_call(device, mib=64 if args.quick else 512, huge_pages=args.huge_pages == "on")
        timed = _time_side_by_side(calls + [("copy", copy)], device, warmup, repeat)
        copy_ms = timed.pop("copy")
        bandwidth_now = copy_bytes / (copy_ms / 1e3) / 1e9 if isinstance(copy_ms, float) else bandwidth
        floor = weight_bytes / (bandwidth_now * 1e9) * 1e3
        for way, _, _ in ways:
            base = dict(size=size, impl=way, dtype=args.dtype, mode="decode", tokens=1)
            two, full = timed[(way, "two")], timed[(way, "all")]
            bad = next((t for t in (two, full) if isinstance(t, Exception)), None)
            if bad is not None:
                rows.append(dict(base, note=_failed(bad)))
                continue
            ms = (full - two) / (args.new_tokens - 2)
            rows.append(dict(base, ms=ms, tokens_per_s=1e3 / ms, floor_frac=floor / ms, copy_gbs=bandwidth_now,
                             note=f"prompt {args.prompt}, {args.new_tokens} new tokens, greedy"))
    return rows


def _training_rows(size, args, impls, device, dtype, rate, gemm, warmup, repeat):
    """The training-step and block rows of one size: the models keep fp32 master weights (under
    autocast for bf16/fp16) and live only inside this call."""
    from benchmarks.common import peak_memory_mib

    rows = []
    tokens = args.batch * args.seq
    amp = None if dtype == torch.float32 else dtype
    note = f", autocast {args.dtype}" if amp else ""
    variants, failed = _variants(size, impls, device, torch.float32, args.compile, args.huge_pages == "on")
    if "train" in args.modes:
        rows += [dict(size=size, impl=name, dtype=args.dtype, mode="train", note=_failed(e)) for name, e in failed]
    if not variants:
        return rows
    cfg = variants[0][1].config
    if "train" in args.modes:
        calls = [(name, train_call(runner, args.batch, args.seq, device, amp)) for name, _, runner in variants]
        timed = _time_side_by_side(calls, device, warmup, repeat, gemm)
        rate_now = timed.pop("gemm_rate", rate)
        floor = 3 * forward_flops(cfg, args.batch, args.seq) / rate_now * 1e3
        for name, call in calls:
            ms = timed[name]
            base = dict(size=size, impl=name, dtype=args.dtype, mode="train", tokens=tokens)
            if isinstance(ms, Exception):
                rows.append(dict(base, note=_failed(ms)))
                continue
            try:
                peak = peak_memory_mib(call, device)
            except Exception:  # noqa: BLE001 - the time stands without the memory
                peak = None
            rows.append(dict(base, ms=ms, tokens_per_s=tokens / ms * 1e3, floor_frac=floor / ms,
                             gemm_gflops=rate_now / 1e9, peak_mib=peak, note="fwd+bwd+AdamW" + note))
    if "block" in args.modes:
        for name, model, _ in variants:
            if name.startswith("compile("):
                continue
            base = dict(size=size, impl=name, dtype=args.dtype, mode="block", tokens=tokens)
            try:
                ms, peak = bench_block(model, args.batch, args.seq, device, warmup, repeat, amp)
                rows.append(dict(base, ms=ms, tokens_per_s=tokens / ms * 1e3, peak_mib=peak,
                                 note="one block fwd+bwd" + note))
            except Exception as e:  # noqa: BLE001
                rows.append(dict(base, note=_failed(e)))
    return rows


def run(args):
    """Every implementation of a size and mode is built first, then timed side by side in
    interleaved rounds, so ratios between them hold on a busy machine."""
    from benchmarks.common import copy_bandwidth

    device = args.device
    dtype = DTYPES[args.dtype]
    rows = []
    gemm_dtype = dtype if device == "cuda" else torch.float32
    gemm = gemm_call(device, gemm_dtype)
    rate = gemm_rate(gemm, device)
    bandwidth = copy_bandwidth(device, mib=64 if args.quick else 512, huge_pages=args.huge_pages == "on")
    print(f"GEMM {rate / 1e9:.0f} GFLOP/s, copy {bandwidth:.0f} GB/s")
    warmup, repeat = (1, 2) if args.quick else (args.warmup, args.repeat)
    impls = [("reference", "reference"), ("ours", "auto")]
    for size in args.size:
        if "forward" in args.modes or "decode" in args.modes:
            rows += _inference_rows(size, args, impls, device, dtype, rate, bandwidth, gemm, warmup, repeat)
        if device == "cuda":
            torch.cuda.empty_cache()
        if "train" in args.modes or "block" in args.modes:
            rows += _training_rows(size, args, impls, device, dtype, rate, gemm, warmup, repeat)
        if device == "cuda":
            torch.cuda.empty_cache()
    for row in rows:
        ref = next((r for r in rows if r["size"] == row["size"] and r["mode"] == row["mode"]
                    and r["impl"] == "reference" and r.get("ms")), None)
        if ref is not None and row.get("ms"):
            row["vs_reference"] = ref["ms"] / row["ms"]
    machine = dict(gemm_gflops=rate / 1e9, copy_gbs=bandwidth)
    if device == "cpu":
        from inl_kernels.cpu.pages import thp_mode
        machine.update(huge_pages=args.huge_pages, thp=thp_mode())
    return rows, machine


def main(argv=None):
    from benchmarks.common import add_malloc_argument, apply_malloc

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", nargs="+", default=None, help="named sizes (default: medium on cuda, tiny small on cpu)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bf16 on cuda, fp32 on cpu")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--modes", nargs="+", choices=["forward", "train", "decode", "block"],
                   default=["forward", "train", "decode"])
    p.add_argument("--compile", action="store_true", help="add torch.compile of each model")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--quick", action="store_true", help="tiny model, tiny batch: a smoke run")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--json", help="write the results here (benchmarks/common.py format)")
    p.add_argument("--huge-pages", choices=["on", "off"], default="on",
                   help="on (CPU): every model's weights and the copy that gives the decode floor on "
                        "transparent huge pages alike (inl_kernels.cpu.huge_pages); off: 4 KiB pages")
    add_malloc_argument(p)
    args = p.parse_args(argv)
    apply_malloc(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU here")
    if args.new_tokens < 3 and not args.quick and "decode" in args.modes:
        p.error("--new-tokens must be at least 3 (decode's time is that of N new tokens minus that of 2)")
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    args.size = args.size or (["tiny"] if args.quick else ["medium"] if cuda else ["tiny", "small"])
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    args.batch = args.batch or (1 if args.quick else 8 if cuda else 4)
    args.seq = args.seq or (16 if args.quick else 1024 if cuda else 256)
    if args.quick:
        args.prompt, args.new_tokens = 4, 4
    from benchmarks.common import print_table, write_json

    t0 = time.perf_counter()
    rows, machine = run(args)
    print_table(rows, COLUMNS)
    print(f"({time.perf_counter() - t0:.0f} s)")
    if args.json:
        write_json(args.json, "model", [dict(machine, **r) for r in rows])
    return rows


if __name__ == "__main__":
    main()
