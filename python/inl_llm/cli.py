"""`python -m inl_llm train | generate | demo | export | distill`.

demo (the main job): trains `tiny` on the Python standard library's own source for about two
minutes, evaluating as it goes, saves a checkpoint, reloads it, generates a sample and prints
the iterations each layer used (early exit) while generating.

train runs one process, or every rank of a torchrun job:
    torchrun --nproc_per_node 2 -m inl_llm train --parallel fsdp --size small --out ckpt
and `--resume ckpt` continues a training checkpoint exactly (or starts a new run from the
weights of a plain checkpoint).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

import inl_kernels

from . import data
from .checkpoint import TRAIN_STATE, export_checkpoint, load_checkpoint, load_weights, read_config, resolve_checkpoint
from .config import RUNTIME_FIELDS, SIZES, INLConfig
from .data import ByteTokenizer
from .distributed import PARALLEL_MODES, init_from_env, parallelize
from .model import build_model, create_model
from .train import PRECISIONS, TrainConfig, evaluate, train


def _fail(message: str):
    raise SystemExit(f"error: {message}")


def _device(name: str) -> torch.device:
    """--device: auto, cpu, cuda or cuda:N, checked against what this machine has."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        _fail(f"--device {name!r} is not a device ({e})")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            _fail(f"--device {name}: CUDA is not available on this machine (torch {torch.__version__} "
                  f"{'has CUDA ' + torch.version.cuda if torch.version.cuda else 'is a CPU-only build'}, "
                  f"{torch.cuda.device_count()} GPUs visible); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            _fail(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s)")
    elif device.type != "cpu":
        _fail(f"--device {name}: only auto, cpu and cuda[:N] are supported")
    return device


def _printable(text: str) -> str:
    """Control and other non-printable characters as escapes (newlines and tabs kept), so a
    sample cannot drive the terminal."""
    return "".join(c if c.isprintable() or c in "\n\t" else c.encode("unicode_escape").decode("ascii") for c in text)


def _overrides(pairs) -> dict:
    """--set key=value pairs; values are read as JSON when they parse (numbers, true, null)."""
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set expects key=value, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _environment() -> str:
    return (f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"backends: {', '.join(inl_kernels.backends())}")


def _describe(model) -> str:
    c = model.config
    return (f"{model.num_params():,} parameters: d_model {c.d_model}, {c.num_layers} layers, {c.num_heads} heads "
            f"({c.num_kv_heads} K/V), up to {c.num_iterations} integrator steps per layer, early exit at "
            f"tol {c.tol if c.adaptive_stopping else 'off'}")


def _print_iterations(model):
    stats = model.get_inference_stats()
    for i, (avg, budget) in enumerate(zip(stats["avg_iterations_per_layer"], stats["max_iterations_per_layer"])):
        shown = f"{avg:.2f}" if avg is not None else "-"
        print(f"  layer {i}: {shown} of {budget} steps on average")


def _resume_config(checkpoint: str, size, overrides: dict, say) -> INLConfig:
    """The checkpoint's config with the runtime overrides applied (each printed). An
    architecture change (--size or --set of a field outside RUNTIME_FIELDS that differs from the
    checkpoint) is refused: the checkpoint's weights only fit its own architecture."""
    saved = read_config(checkpoint)[0].to_dict()
    unknown = sorted(set(overrides) - set(saved))
    if unknown:
        _fail(f"--set {unknown}: not config fields (fields: {', '.join(saved)})")
    # what the flags ask for: the named size with the --set fields over it
    asked = [(f"--size {size}", k, v) for k, v in (SIZES[size].items() if size else ()) if k not in overrides]
    asked += [(f"--set {k}={json.dumps(v)}", k, v) for k, v in overrides.items()]
    changes = [f"{flag}: the checkpoint has {k}={saved[k]!r}" for flag, k, v in asked
               if k not in RUNTIME_FIELDS and saved[k] != v]
    if changes:
        _fail(f"--resume {checkpoint} keeps the checkpoint's architecture, and these would change it:\n  "
              + "\n  ".join(changes) + f"\n(runtime fields may be changed: {', '.join(sorted(RUNTIME_FIELDS))}; "
              f"to train another architecture, start a new run without --resume)")
    runtime = {k: v for flag, k, v in asked if k in RUNTIME_FIELDS}
    for key, value in runtime.items():
        if saved[key] != value:
            say(f"runtime override: {key} {saved[key]!r} -> {value!r}")
    try:
        return INLConfig.from_dict({**saved, **runtime})
    except (TypeError, ValueError) as e:
        _fail(f"--set: {e}")


def cmd_train(args) -> dict:
    if args.parallel == "none" and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        _fail("launched by torchrun with several ranks but --parallel none: pass --parallel ddp or fsdp")
    _device(args.device)  # a clear error before anything starts
    rank, world, device = init_from_env(args.device)
    say = print if rank == 0 else (lambda *a, **k: None)
    overrides = _overrides(args.set)
    resume_from = None
    if args.resume:
        config = _resume_config(args.resume, args.size, overrides, say)
        model = build_model(config)
        if (resolve_checkpoint(args.resume) / TRAIN_STATE).exists():
            resume_from = args.resume  # train() restores everything
        else:
            load_weights(model, args.resume)
            say(f"{args.resume} holds weights only: a new run starts from them at step 0")
    else:
        try:
            config = INLConfig.from_name(args.size or "tiny", **overrides)
        except (TypeError, ValueError) as e:
            _fail(f"--set: {e}")
        model = build_model(config)
    model = model.to(device)
    tokens = data.load_corpus(args.data, max_bytes=args.max_bytes)
    train_tokens, eval_tokens = data.split(tokens, args.eval_fraction)
    parallel = f", {args.parallel} over {world} ranks" if args.parallel != "none" else ""
    say(f"{_environment()}{parallel}\nmodel: {_describe(model)}\ndata: {args.data}, {len(train_tokens):,} train and "
        f"{len(eval_tokens):,} eval tokens")
    engine = parallelize(model, args.parallel, precision=args.precision,
                         activation_checkpointing=args.activation_checkpointing)
    tc = TrainConfig(steps=args.steps, time_budget=args.time_budget, batch_size=args.batch_size, seq_len=args.seq_len,
                     lr=args.lr, min_lr=args.lr / 10, warmup_steps=args.warmup, grad_accum_steps=args.grad_accum,
                     data_shards=args.data_shards, precision=args.precision, eval_every=args.eval_every,
                     eval_interval_s=args.eval_interval_s, eval_batches=args.eval_batches,
                     preset=None if args.preset == "none" else args.preset, cycle_unit=args.cycle_unit,
                     cycle_scale=args.cycle_scale, checkpoint_dir=args.out, checkpoint_every=args.checkpoint_every,
                     export_weights=not args.sharded_checkpoints, seed=args.seed,
                     progress=not args.no_progress)
    result = train(engine, train_tokens, eval_tokens, tc, resume_from=resume_from)
    first, last = result["history"][0], result["history"][-1]
    say(f"eval loss {first['loss']:.3f} -> {last['loss']:.3f} after {result['steps']} steps "
        f"in {result['elapsed']:.0f} s" + (f"; checkpoint: {args.out}" if args.out else ""))
    if world > 1:
        reports = [None] * world
        torch.distributed.all_gather_object(reports, result["memory"])
        mib = lambda b: f"{b / 2 ** 20:.1f}"  # noqa: E731
        for r, rep in enumerate(reports):
            if rep is not None:
                say(f"rank {r} memory (MiB): parameters {mib(rep['params'])}, gradients {mib(rep['grads'])}, "
                    f"optimizer {mib(rep['optimizer'])}, resident {mib(rep['rss'] or 0)} "
                    f"(peak {mib(rep['peak_rss'])})")
        result["memory_per_rank"] = reports
        torch.distributed.destroy_process_group()
    return {"model": model, **result}


def cmd_convert(args):
    """Between our checkpoint directory and a Hugging Face one (the [hf] extra), either way."""
    try:
        from . import hf
    except ImportError as e:
        _fail(f"convert needs transformers (pip install -e \".[hf]\"): {e}")
    if hf.is_hf_directory(args.source):
        path = hf.from_hf(args.source, args.destination)
        print(f"Hugging Face model {args.source} -> checkpoint {path}")
    else:
        path = hf.to_hf(args.source, args.destination)
        print(f"checkpoint {args.source} -> Hugging Face model {path}")
    return path


def cmd_export(args):
    path = export_checkpoint(args.checkpoint, args.out)
    print(f"{args.checkpoint} -> {path} ({', '.join(sorted(os.listdir(path)))})")
    return path


def cmd_generate(args, model=None):
    device = _device(args.device)
    if model is None:
        model = load_checkpoint(args.checkpoint, device=device)
    tok = ByteTokenizer()
    ids = tok.encode(args.prompt, bos=True)[None].to(device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    model.reset_inference_stats()
    start = time.perf_counter()
    out = model.generate(ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                         repetition_penalty=args.repetition_penalty, do_sample=not args.greedy,
                         eos_token_id=tok.eos_id, use_cache=not args.no_cache, generator=generator)
    elapsed = time.perf_counter() - start
    new = out.shape[1] - ids.shape[1]
    print("-" * 72)
    print(_printable(args.prompt + tok.decode(out[0, ids.shape[1]:])))
    print("-" * 72)
    print(f"{new} tokens in {elapsed:.2f} s ({new / max(elapsed, 1e-9):.1f} tokens/s); iterations per layer "
          f"while generating (early exit):")
    _print_iterations(model)
    return out


def _early_exit_probe(model, eval_tokens, tol: float, batches: int):
    """Eval loss and steps per layer with every integrator's early exit at `tol` (min 1 step),
    against the configured setting: what early exit buys and costs on this model."""
    saved = [(layer.tol, layer.min_iterations) for layer in model.integrator_layers()]
    base = evaluate(model, eval_tokens, 16, 128, batches, update_budgets=False)
    for layer in model.integrator_layers():
        layer.tol, layer.min_iterations = tol, 1
    loose = evaluate(model, eval_tokens, 16, 128, batches, update_budgets=False)
    for layer, (t, m) in zip(model.integrator_layers(), saved):
        layer.tol, layer.min_iterations = t, m
    fmt = lambda r: " ".join(f"{i:.2f}" for i in r["iterations"])  # noqa: E731
    print(f"early exit at tol={model.config.tol}: eval loss {base['loss']:.3f}, steps per layer [{fmt(base)}]")
    print(f"early exit at tol={tol}:  eval loss {loose['loss']:.3f}, steps per layer [{fmt(loose)}]")


def cmd_demo(args):
    torch.manual_seed(args.seed)
    print(f"INL-LLM demo: train `tiny` for about {args.seconds:.0f} s on the Python standard library's own source "
          f"files (no download)\n{_environment()}")
    start = time.perf_counter()
    tokens = data.load_stdlib(max_bytes=args.max_bytes)
    train_tokens, eval_tokens = data.split(tokens, 0.05)
    print(f"data: {len(data.stdlib_files())} stdlib files available, {len(tokens) / 1e6:.1f} M byte tokens read "
          f"({len(train_tokens):,} train / {len(eval_tokens):,} eval)")
    model = create_model("tiny")
    print(f"model: {_describe(model)}")
    tc = TrainConfig(steps=10 ** 9, time_budget=args.seconds, batch_size=16, seq_len=128, lr=3e-3, min_lr=3e-4,
                     warmup_steps=20, eval_interval_s=max(args.seconds / 6, 1.0), eval_batches=args.eval_batches,
                     preset="balanced", cycle_unit="steps", cycle_scale=2.0, checkpoint_dir=args.out,
                     seed=args.seed, progress=not args.no_progress)
    result = train(model, train_tokens, eval_tokens, tc)
    first, last = result["history"][0], result["history"][-1]
    print(f"\neval loss fell from {first['loss']:.3f} to {last['loss']:.3f} nats/byte in {result['steps']} steps "
          f"({result['elapsed']:.0f} s)")

    reloaded = load_checkpoint(args.out)
    probe = eval_tokens[:65][None]
    model.eval()
    reloaded.eval()
    with torch.no_grad():
        same = torch.equal(model(probe)[0], reloaded(probe)[0])
    files = ", ".join(sorted(os.listdir(args.out)))
    print(f"checkpoint: {args.out} ({files}); reloaded model gives {'identical' if same else 'DIFFERENT'} logits")
    if read_config(args.out)[0] != reloaded.config:
        print("warning: the reloaded config differs from the saved one")

    # plain sampling with a nucleus: at these losses a lower temperature falls into runs of indentation
    gen_args = argparse.Namespace(prompt=args.prompt, max_new_tokens=args.tokens, temperature=1.0, top_k=None,
                                  top_p=0.95, repetition_penalty=1.0, greedy=False, seed=args.seed, no_cache=False,
                                  device="cpu")
    print(f"\nsample from the reloaded model (temperature 1.0, top-p 0.95), prompt {args.prompt!r}:")
    cmd_generate(gen_args, model=reloaded)
    stats = reloaded.get_inference_stats()
    if all(a == b for a, b in zip(stats["avg_iterations_per_layer"], stats["max_iterations_per_layer"])):
        print(f"  (no row's step ‖x' − x‖ fell below tol={reloaded.config.tol} within its budget: these "
              f"integrators have not settled yet)")
    _early_exit_probe(reloaded, eval_tokens, args.loose_tol, args.eval_batches)
    print(f"\ndemo finished in {time.perf_counter() - start:.0f} s")
    return {"model": model, "reloaded": reloaded, "identical": same, **result}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m inl_llm", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train tiny for ~2 minutes, save, reload, generate (the main job)")
    demo.add_argument("--seconds", type=float, default=120.0, help="training time budget")
    demo.add_argument("--out", default="checkpoints/demo", help="checkpoint directory")
    demo.add_argument("--max-bytes", type=int, default=4_000_000, help="how much stdlib source to read")
    demo.add_argument("--prompt", default="def ")
    demo.add_argument("--tokens", type=int, default=200, help="bytes to generate")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--loose-tol", type=float, default=0.5, help="a looser early-exit tolerance to compare")
    demo.add_argument("--eval-batches", type=int, default=8, help="batches of 16 × 128 bytes per evaluation")
    demo.add_argument("--no-progress", action="store_true", help="no tqdm bar")

    tr = sub.add_parser("train", help="train a model (cycle scheduler + IntegratorLoss); under torchrun on every rank")
    tr.add_argument("--size", default=None, choices=list(SIZES), help="named size (default tiny)")
    tr.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field (repeatable)")
    tr.add_argument("--resume", metavar="CHECKPOINT",
                    help="continue a training checkpoint exactly, or start from a plain checkpoint's weights")
    tr.add_argument("--parallel", default="none", choices=PARALLEL_MODES,
                    help="data parallelism under torchrun: ddp or fsdp (FSDP2)")
    tr.add_argument("--precision", default="fp32", choices=PRECISIONS,
                    help="bf16: FSDP's mixed-precision policy (bf16 compute, fp32 reduce), else autocast")
    tr.add_argument("--activation-checkpointing", action="store_true", help="recompute each block in the backward")
    tr.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step on each rank")
    tr.add_argument("--data-shards", type=int, default=None,
                    help="shards of the train stream (default: the world size); a run resumes on any world size "
                         "that divides it")
    tr.add_argument("--sharded-checkpoints", action="store_true",
                    help="periodic checkpoints hold only the sharded training state (no gathered "
                         "model.safetensors; the final one has it)")
    tr.add_argument("--data", default="stdlib", help='"stdlib", a .txt file or directory, or a .parquet file')
    tr.add_argument("--max-bytes", type=int, default=None)
    tr.add_argument("--eval-fraction", type=float, default=0.05)
    tr.add_argument("--steps", type=int, default=1000)
    tr.add_argument("--time-budget", type=float, default=None, help="seconds")
    tr.add_argument("--batch-size", type=int, default=16)
    tr.add_argument("--seq-len", type=int, default=128)
    tr.add_argument("--lr", type=float, default=3e-3)
    tr.add_argument("--warmup", type=int, default=20)
    tr.add_argument("--eval-every", type=int, default=100)
    tr.add_argument("--eval-interval-s", type=float, default=None, help="evaluate by wall clock instead")
    tr.add_argument("--eval-batches", type=int, default=8)
    tr.add_argument("--preset", default="balanced", choices=["conservative", "balanced", "aggressive", "none"])
    tr.add_argument("--cycle-unit", default="steps", choices=["steps", "epochs"])
    tr.add_argument("--cycle-scale", type=float, default=1.0)
    tr.add_argument("--out", default=None, help="checkpoint directory")
    tr.add_argument("--checkpoint-every", type=int, default=None)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--device", default="auto")
    tr.add_argument("--no-progress", action="store_true")

    ex = sub.add_parser("export", help="a checkpoint's weights (e.g. a sharded training checkpoint) as a plain "
                                       "checkpoint directory with model.safetensors")
    ex.add_argument("--checkpoint", required=True)
    ex.add_argument("--out", required=True)

    cv = sub.add_parser("convert", help="checkpoint <-> Hugging Face model directory (needs the [hf] extra); the "
                                        "direction follows the source")
    cv.add_argument("source")
    cv.add_argument("destination")

    gen = sub.add_parser("generate", help="sample from a checkpoint")
    gen.add_argument("--checkpoint", required=True)
    gen.add_argument("--prompt", default="def ")
    gen.add_argument("--max-new-tokens", type=int, default=200)
    gen.add_argument("--temperature", type=float, default=0.8)
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--top-p", type=float, default=0.95)
    gen.add_argument("--repetition-penalty", type=float, default=1.0)
    gen.add_argument("--greedy", action="store_true")
    gen.add_argument("--no-cache", action="store_true")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--device", default="auto")

    from . import distill  # trajectory distillation (python/inl_llm/distill.py)
    distill.add_subcommand(sub)
    return parser


def _process_setup():
    """What the CLI does to the process it owns before any work: glibc keeps freed memory for the
    next step (inl_kernels.cpu.keep_freed_memory: a CPU forward of `small` ~15 % faster, no page
    fault per large buffer) unless INL_KERNELS_KEEP_FREED_MEMORY=0."""
    from inl_kernels.cpu.memory import keep_unless_disabled
    keep_unless_disabled()


def main(argv=None):
    args = build_parser().parse_args(argv)
    _process_setup()
    if args.command == "distill":
        from .distill import cmd_distill
        return cmd_distill(args)
    return {"demo": cmd_demo, "train": cmd_train, "generate": cmd_generate, "export": cmd_export,
            "convert": cmd_convert}[args.command](args)


if __name__ == "__main__":
    main()
