"""Data-parallel training on CPU with gloo, two ranks spawned per test (torch.multiprocessing):
DDP and FSDP2 give the losses of one process with the same global batch; distributed checkpoints
load into another world size and export to the plain checkpoint; a run killed with SIGKILL and
resumed ends where the uninterrupted run ends."""
import importlib
import os
import signal
import socket

import pytest
import torch
import torch.multiprocessing as mp

from inl_llm import INLConfig, IntegratorLoss, build_model, load_checkpoint
from inl_llm.checkpoint import TRAIN_DIR, WEIGHTS, save_training_checkpoint
from inl_llm.data import load_stdlib, split
from inl_llm.train import TrainConfig, train

train_module = importlib.import_module("inl_llm.train")  # the attribute inl_llm.train is the function

# the default feature set (shared controller, hierarchical learnable mu, sparse excitation,
# dynamic alpha, budgets) at a size two ranks train in seconds
CONFIG = dict(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, feedforward_dim=48, max_seq_len=32,
              num_iterations=3, min_iterations=1, controller_hidden=8, min_embedding_rank=8, mu_group_size=8, seed=5)
THREADS = 1  # every process, here and in the ranks: the same BLAS blocking everywhere


def tc(**overrides) -> TrainConfig:
    base = dict(steps=6, batch_size=4, seq_len=16, warmup_steps=2, lr=1e-2, eval_every=3, eval_batches=1,
                data_shards=2, preset="balanced", cycle_unit="steps", cycle_scale=0.1, progress=False)
    return TrainConfig(**{**base, **overrides})


def corpus():
    return split(load_stdlib(max_bytes=60_000), 0.1)


class TaskLossOnly(IntegratorLoss):
    """Cross-entropy alone: linear in the rows, so micro-batches of any grouping add up to the
    whole batch's gradient (IntegratorLoss's L_mean is not: its batch statistics see the grouping)."""

    def forward(self, logits, targets, aux, epoch=0):
        task = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        return {"L_task": task, "total": task}


def full_state(model) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def run_training(out_dir, parallel="none", resume_from=None, kill_after=None, precision="fp32",
                 activation_checkpointing=False, task_loss_only=False, model_overrides=None, **tc_overrides):
    """One training run (in this process, or on every rank). Checkpoints go to out_dir/stepN;
    with kill_after=N the process SIGKILLs itself right after writing step N's. Returns the step
    terms, the final weights (gathered) and rank 0's memory report."""
    from inl_llm.distributed import parallelize
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    real_save = save_training_checkpoint

    def save_per_step(model, directory, optimizer, state, extra=None, export_weights=True):
        real_save(model, os.path.join(out_dir, f"step{state['step']}"), optimizer, state, extra, export_weights)
        if state["step"] == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    train_module.save_training_checkpoint = save_per_step
    try:
        model = build_model(INLConfig(**{**CONFIG, **(model_overrides or {})}))
        engine = parallelize(model, parallel, precision=precision, activation_checkpointing=activation_checkpointing)
        config = tc(checkpoint_dir=str(out_dir), precision=precision, **tc_overrides)
        result = train(engine, *corpus(), config, loss_fn=TaskLossOnly() if task_loss_only else None,
                       log=lambda _: None, resume_from=resume_from)
    finally:
        train_module.save_training_checkpoint = real_save
        torch.set_num_threads(threads)
    return {"terms": result["step_terms"], "state": full_state(model), "memory": result["memory"],
            "history": result["history"]}


def _rank_main(rank, world, port, out_dir, kwargs):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    from inl_llm.distributed import init_from_env
    init_from_env("cpu")
    try:
        result = run_training(out_dir, **kwargs)
        if rank == 0:
            torch.save(result, os.path.join(out_dir, "result.pt"))
    finally:
        dist.destroy_process_group()


def on_two_ranks(out_dir, expect_kill=False, **kwargs) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.makedirs(out_dir, exist_ok=True)
    if expect_kill:
        with pytest.raises(mp.ProcessExitedException, match="SIGKILL"):
            mp.spawn(_rank_main, args=(2, port, str(out_dir), kwargs), nprocs=2)
        return {}
    mp.spawn(_rank_main, args=(2, port, str(out_dir), kwargs), nprocs=2)
    return torch.load(os.path.join(out_dir, "result.pt"), weights_only=False)


def losses(result):
    return torch.tensor([t["total"] for t in result["terms"]], dtype=torch.float64)


def assert_states_close(a: dict, b: dict, rtol: float):
    """Every floating tensor within rtol of the other, relative to its largest entry."""
    assert a.keys() == b.keys()
    for key in a:
        if a[key].is_floating_point():
            scale = max(a[key].abs().max().item(), 1e-6)
            assert (a[key] - b[key]).abs().max().item() <= rtol * scale, key
        else:
            assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The single-process run every two-rank run is compared with: same global batch (the two
    data shards' windows), 6 steps, a training checkpoint after step 3."""
    out = tmp_path_factory.mktemp("one")
    return out, run_training(out, checkpoint_every=3)


@pytest.fixture(scope="module")
def fsdp_two_ranks(tmp_path_factory):
    """The same run on two FSDP2 ranks, with a sharded checkpoint after step 3."""
    out = tmp_path_factory.mktemp("fsdp")
    return out, on_two_ranks(out, parallel="fsdp", checkpoint_every=3)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_give_the_losses_of_one_process(one_process, fsdp_two_ranks, tmp_path, parallel):
    """Default config (shared controller, learnable hierarchical mu) under FSDP2 per block + root."""
    _, single = one_process
    both = fsdp_two_ranks[1] if parallel == "fsdp" else on_two_ranks(tmp_path, parallel=parallel)
    torch.testing.assert_close(losses(both), losses(single), rtol=1e-5, atol=0)
    assert losses(both)[0] != losses(both)[5]  # it trained
    # evaluations (every rank reads its share of the windows) and the budgets they set agree too
    assert [h["budgets"] for h in both["history"]] == [h["budgets"] for h in single["history"]]
    torch.testing.assert_close(torch.tensor([h["loss"] for h in both["history"]]),
                               torch.tensor([h["loss"] for h in single["history"]]), rtol=1e-5, atol=0)
    assert_states_close(both["state"], single["state"], rtol=1e-4)
    if parallel == "fsdp":  # each rank holds half of every sharded parameter and of its optimizer state
        full = sum(v.numel() * v.element_size() for k, v in single["state"].items() if "budget" not in k)
        assert both["memory"]["params"] < 0.6 * full


def test_a_two_rank_fsdp_checkpoint_resumes_on_one_process_and_exports(fsdp_two_ranks, tmp_path):
    """2 ranks -> 1: the sharded DCP checkpoint of step 3 resumes in one process (world 1 reads
    both data shards) and ends where the two-rank run ends; its gathered model.safetensors and
    its DCP shards each load as a plain model holding the ranks' weights."""
    import shutil
    out, both = fsdp_two_ranks
    step3 = out / "step3"
    assert sorted(p.name for p in (step3 / TRAIN_DIR).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]

    with pytest.warns(UserWarning, match="saved by 2 ranks and is resumed on 1: the per-rank RNG"):
        resumed = run_training(tmp_path / "resumed", resume_from=str(step3))
    torch.testing.assert_close(losses(resumed), losses(both)[3:], rtol=1e-5, atol=0)
    assert_states_close(resumed["state"], both["state"], rtol=1e-5)

    final = load_checkpoint(out / "step6")  # model.safetensors, gathered from the shards
    assert_states_close(final.state_dict(), both["state"], rtol=0)
    shutil.copytree(out / "step6", tmp_path / "sharded_only")
    (tmp_path / "sharded_only" / WEIGHTS).unlink()
    (tmp_path / "sharded_only" / "manifest.json").unlink()
    from_shards = load_checkpoint(tmp_path / "sharded_only")  # the DCP shards read into one process
    assert_states_close(from_shards.state_dict(), both["state"], rtol=0)


def test_a_one_process_checkpoint_resumes_on_two_fsdp_ranks(one_process, tmp_path):
    """1 -> 2: the single process's step-3 checkpoint, resumed on two FSDP ranks, ends where the
    single process ends."""
    out, single = one_process
    resumed = on_two_ranks(tmp_path, parallel="fsdp", resume_from=str(out / "step3"))
    torch.testing.assert_close(losses(resumed), losses(single)[3:], rtol=1e-5, atol=0)
    assert_states_close(resumed["state"], single["state"], rtol=1e-5)


def test_killed_and_resumed_on_two_ranks_matches_the_straight_run(fsdp_two_ranks, tmp_path):
    """6 steps straight against 3 steps, SIGKILL of both ranks, resume, 3 more: within 1e-6."""
    straight = fsdp_two_ranks[1]
    on_two_ranks(tmp_path / "killed", expect_kill=True, parallel="fsdp", checkpoint_every=3, kill_after=3)
    resumed = on_two_ranks(tmp_path / "resumed", parallel="fsdp",
                           resume_from=str(tmp_path / "killed" / "step3"))
    torch.testing.assert_close(losses(resumed), losses(straight)[3:], rtol=1e-6, atol=0)
    assert_states_close(resumed["state"], straight["state"], rtol=1e-6)
    assert [h["step"] for h in resumed["history"]] == [0, 3, 6]  # the history carries over


@pytest.fixture(scope="module")
def task_loss_run(tmp_path_factory):
    return run_training(tmp_path_factory.mktemp("task"), steps=4, task_loss_only=True)


def test_gradient_accumulation_and_activation_checkpointing_under_fsdp(task_loss_run, tmp_path):
    """One process × 4 micro-batches, and two FSDP ranks × 2 micro-batches with activation
    checkpointing, equal one process with the whole batch (a loss linear in the rows)."""
    single = task_loss_run
    accumulated = run_training(tmp_path / "acc", steps=4, task_loss_only=True, grad_accum_steps=4)
    torch.testing.assert_close(losses(accumulated), losses(single), rtol=1e-5, atol=0)
    both = on_two_ranks(tmp_path / "two", parallel="fsdp", steps=4, task_loss_only=True, grad_accum_steps=2,
                        activation_checkpointing=True)
    torch.testing.assert_close(losses(both), losses(single), rtol=1e-5, atol=0)


def test_micro_batches_with_the_integrator_loss_group_as_two_ranks_do(tmp_path):
    """IntegratorLoss's L_mean takes batch statistics over a micro-batch, so one process must
    group a step's windows into micro-batches as two ranks do: micro-batch m = the m-th slice of
    every shard's windows (it took shard 0's windows whole, then shard 1's: 2.9 % off in loss)."""
    from inl_llm.data import WindowSampler
    from inl_llm.train import _micro_batches

    one = WindowSampler(torch.arange(400), 8, batch_size=8, num_shards=2)  # one process, both shards
    groups = [rows.tolist() for rows in _micro_batches(one, 2)]
    assert groups == [[0, 1, 4, 5], [2, 3, 6, 7]]  # each shard's first half, then each shard's second
    ranks = [WindowSampler(torch.arange(400), 8, batch_size=8, num_shards=2, rank=r, world_size=2) for r in (0, 1)]
    x_one = one.batch(3)[0]
    for m, rows in enumerate(_micro_batches(one, 2)):
        on_ranks = torch.cat([r.batch(3)[0][_micro_batches(r, 2)[m]] for r in ranks])
        assert torch.equal(x_one[rows], on_ranks)
    single = run_training(tmp_path / "one", steps=4, grad_accum_steps=2)
    both = on_two_ranks(tmp_path / "two", parallel="ddp", steps=4, grad_accum_steps=2)
    torch.testing.assert_close(losses(both), losses(single), rtol=1e-5, atol=0)
    assert_states_close(both["state"], single["state"], rtol=1e-4)


def test_a_mixture_under_ddp_gives_the_losses_of_one_process(tmp_path):
    """A mixture's experts get different rows on different ranks: IntegratorLoss lists every
    expert on every rank (zero rows where it got none) and takes every term and the router balance
    over all ranks' rows. Before, the ranks issued different collectives (gloo aborted when an
    expert had rows on one rank only) or, when they happened to match, paired one expert's rows
    with another's (5 % off in loss)."""
    mixture = dict(mixture_of_integrators=True, num_experts=4, top_k=2)
    single = run_training(tmp_path / "one", model_overrides=mixture)
    both = on_two_ranks(tmp_path / "two", parallel="ddp", model_overrides=mixture)
    torch.testing.assert_close(losses(both), losses(single), rtol=1e-5, atol=0)
    assert_states_close(both["state"], single["state"], rtol=1e-4)
    # 8 experts, top-1, 4 rows a rank: experts with rows on one rank only, every step
    sparse = dict(mixture_of_integrators=True, num_experts=8, top_k=1)
    kw = dict(model_overrides=sparse, batch_size=2, seq_len=4, steps=3, eval_every=100)
    single = run_training(tmp_path / "one8", **kw)
    both = on_two_ranks(tmp_path / "two8", parallel="ddp", **kw)
    torch.testing.assert_close(losses(both), losses(single), rtol=1e-4, atol=0)


def test_the_fsdp_bf16_policy_computes_in_bf16_and_keeps_fp32_weights(task_loss_run, tmp_path):
    single = task_loss_run
    bf16 = on_two_ranks(tmp_path / "bf16", parallel="fsdp", steps=4, task_loss_only=True, precision="bf16")
    assert all(v.dtype == torch.float32 for v in bf16["state"].values() if v.is_floating_point())  # fp32 masters
    torch.testing.assert_close(losses(bf16), losses(single), rtol=2e-2, atol=0)
    assert not torch.equal(losses(bf16), losses(single))  # it did compute in bf16


def test_one_process_resume_after_sigkill_is_bit_exact(tmp_path):
    """N = 6 steps straight == 3 steps + SIGKILL + resume + 3 steps, bit for bit: weights,
    optimizer-driven updates, budgets, losses."""
    import multiprocessing
    straight = run_training(tmp_path / "straight")
    ctx = multiprocessing.get_context("spawn")
    child = ctx.Process(target=run_training, args=(str(tmp_path / "killed"),),
                        kwargs=dict(checkpoint_every=3, kill_after=3))
    child.start()
    child.join(timeout=300)
    assert child.exitcode == -signal.SIGKILL
    resumed = run_training(tmp_path / "resumed", resume_from=str(tmp_path / "killed" / "step3"))
    assert [t["total"] for t in resumed["terms"]] == [t["total"] for t in straight["terms"]][3:]
    assert_states_close(resumed["state"], straight["state"], rtol=0)
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in straight["history"]]


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads thread states from /proc")
def test_gloo_workers_are_found_and_drained_before_exit(tmp_path):
    """The exit drain must see gloo's worker threads (or it would wait for nothing) and report them
    asleep once a collective has finished; pytorch/pytorch#190489 is the abort it prevents."""
    import datetime

    import torch.distributed as dist

    from inl_llm.distributed import _gloo_worker_states, wait_for_gloo_workers

    before = len(_gloo_worker_states())
    store = dist.FileStore(str(tmp_path / "store"), 1)
    pg = dist.ProcessGroupGloo(store, 0, 1, datetime.timedelta(seconds=30))
    try:
        t = torch.arange(4.0)
        pg.allreduce([t]).wait()
        assert torch.equal(t, torch.arange(4.0))
        assert len(_gloo_worker_states()) >= before + 1
        assert wait_for_gloo_workers(timeout=10.0)
    finally:
        del pg
    assert len(_gloo_worker_states()) == before  # the group's destructor joined its workers


def test_the_gloo_drain_waits_for_busy_workers_and_gives_up_at_its_timeout(monkeypatch):
    """wait_for_gloo_workers returns only after three quiet polls in a row, and False when a
    worker stays busy past the timeout (an exit is delayed at most that long)."""
    import time

    from inl_llm import distributed

    seen = iter(["R", "S", "R", "S", "S", "S"])  # busy, idle, busy again, then idle for good
    polls = []

    def states():
        polls.append(1)
        return [next(seen, "S")]
    monkeypatch.setattr(distributed, "_gloo_worker_states", states)
    assert distributed.wait_for_gloo_workers(timeout=10.0, poll=0.001)
    assert len(polls) == 6  # the quiet run restarted after the second "R"
    monkeypatch.setattr(distributed, "_gloo_worker_states", lambda: ["S", "R"])
    start = time.monotonic()
    assert not distributed.wait_for_gloo_workers(timeout=0.05, poll=0.001)
    assert time.monotonic() - start < 2.0
