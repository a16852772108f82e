"""The model layer's fixed defects: a Hugging Face load in bf16 keeps the iteration-budget average
(and so the budgets) of our own bf16 cast; save_pretrained writes the pending mu EMA update, as
save_checkpoint does; under DDP the replicas keep one mu, the one a single process computes
from the whole batch; a tied LM head starts near ln V, and computes the documented formula."""
import datetime
import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from inl_llm import INLConfig, build_model, create_model

SEED = int(os.environ.get("INL_TEST_SEED", "0"))
MICRO = dict(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, feedforward_dim=48, max_seq_len=32,
             num_iterations=3, min_iterations=1, controller_hidden=8, min_embedding_rank=8, mu_group_size=8,
             seed=5 + SEED)


# ---- Hugging Face ---------------------------------------------------------------------------

def _hf():
    pytest.importorskip("transformers")
    import inl_llm.hf as hf
    return hf


def test_hf_bf16_load_keeps_the_budget_average_fp32_as_our_cast_does(tmp_path):
    hf = _hf()
    from transformers import AutoModelForCausalLM
    cfg = INLConfig(**{**MICRO, "num_iterations": 8})
    hf.INLForCausalLM(hf.INLLLMConfig.from_inl_config(cfg)).save_pretrained(str(tmp_path))
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.bfloat16).model
    ours = build_model(cfg).to(torch.bfloat16)
    assert loaded.budget.average.dtype == torch.float32
    # every tensor in the dtype and with the value of our own cast (the excitation's gamma and
    # phi included: made fp32, they too follow the dtype the model is built in)
    theirs = {**dict(loaded.named_parameters()), **dict(loaded.named_buffers())}
    for name, tensor in {**dict(ours.named_parameters()), **dict(ours.named_buffers())}.items():
        assert theirs[name].dtype == tensor.dtype, name
        assert torch.equal(theirs[name], tensor), name
    # an average of 3.495 is 3.5 in bf16, which rounds to 4 (+1 slack) instead of 3
    for model in (loaded, ours):
        model.budget.average.fill_(3.0)
        model.budget.update(torch.full((cfg.num_layers,), 3.99))
    assert loaded.iteration_budgets() == ours.iteration_budgets() == [4] * cfg.num_layers
    assert torch.equal(loaded.budget.average, ours.budget.average)


def test_hf_save_pretrained_writes_the_pending_mu_ema_update(tmp_path):
    hf = _hf()
    from transformers import AutoModelForCausalLM
    cfg = INLConfig(**{**MICRO, "mu_ema_rate": 0.5})
    model = hf.INLForCausalLM(hf.INLLLMConfig.from_inl_config(cfg)).train()
    ids = torch.randint(0, 256, (2, 16))
    model(ids, labels=ids).loss.backward()  # a Trainer step: the forward records mean(h)
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert all(layer._mu_target is not None for layer in model.model.integrator_layers())
    model.save_pretrained(str(tmp_path))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    model.eval()
    with torch.no_grad():
        want = model(ids).logits  # applies the pending update first (when save did not)
        got = reloaded(ids).logits
    assert torch.equal(got, want)
    for a, b in zip(model.model.integrator_layers(), reloaded.model.integrator_layers()):
        assert torch.equal(a.equilibrium(), b.equilibrium())
    # the state dict transformers.Trainer may gather before it saves holds the update too
    model.train()
    model(ids, labels=ids).loss.backward()
    state = model.state_dict()
    assert all(layer._mu_target is None for layer in model.model.integrator_layers())
    assert torch.equal(state["model.blocks.0.integrator.mu_local"], model.model.blocks[0].integrator.mu_local)


# ---- DDP ------------------------------------------------------------------------------------

DDP_CASES = {
    "plain": dict(MICRO, mu_ema_rate=0.2),
    # experts get other row counts on each rank (the targets are weighted by them), and some get
    # none on one rank (it still joins the collective, and applies the update pending from before)
    "mixture": dict(MICRO, mu_ema_rate=0.5, mixture_of_integrators=True, num_experts=8, top_k=1,
                    gradient_checkpointing=True),
}
STEPS, BATCH, SEQ = 3, 4, 8


def _batches():
    g = torch.Generator().manual_seed(100 + SEED)
    return [torch.randint(0, 256, (BATCH, SEQ + 1), generator=g) for _ in range(STEPS)]


def _mus(model) -> dict:
    return {n: t.detach().clone() for n, t in model.state_dict().items() if "mu_" in n}


def _train(model, engine, batches, rows):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    for ids in batches:
        ids = ids[rows]
        logits = engine(ids[:, :-1])[0]
        F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad()


def _ddp_rank(rank, world, port, out):
    import torch.distributed as dist
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # a collective one rank issues alone fails within the timeout instead of hanging the suite
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        results = {}
        for name, config in DDP_CASES.items():
            model = build_model(INLConfig(**config))
            engine = torch.nn.parallel.DistributedDataParallel(
                model, find_unused_parameters=model.config.mixture_of_integrators)
            per_rank = BATCH // world
            _train(model, engine, _batches(), slice(rank * per_rank, (rank + 1) * per_rank))
            if not model.config.mixture_of_integrators:  # pending, combined: nothing of this rank's own left
                assert all(layer._mu_target is not None and layer._mu_rows == 0 for layer in model.integrator_layers())
            if rank == 0:  # one rank alone: an eval forward and a state dict issue no collective
                model.eval()
                with torch.no_grad():
                    model(_batches()[0][:1, :SEQ])
                model.state_dict()
            model.apply_mu_ema()
            dist.barrier()
            results[name] = _mus(model)
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_replicas_keep_one_mu_the_single_process_one(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_rank, args=(2, port, str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, config in DDP_CASES.items():
            single = build_model(INLConfig(**config))
            before = _mus(single)
            _train(single, single, _batches(), slice(None))
            single.apply_mu_ema()
            want = _mus(single)
            assert any(not torch.equal(want[k], before[k]) for k in want), name
            for key in want:
                assert torch.equal(ranks[0][name][key], ranks[1][name][key]), (name, key)
                torch.testing.assert_close(ranks[0][name][key], want[key], rtol=0, atol=1e-6, msg=f"{name} {key}")
    finally:
        torch.set_num_threads(threads)


def test_one_process_with_a_process_group_of_one_issues_no_collective(tmp_path, monkeypatch):
    import torch.distributed as dist
    calls = []
    monkeypatch.setattr(dist, "all_reduce", lambda *a, **k: calls.append(a))
    model = build_model(INLConfig(**{**MICRO, "mu_ema_rate": 0.5})).train()
    model(torch.randint(0, 256, (2, 8)))[0].sum().backward()  # no process group
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model(torch.randint(0, 256, (2, 8)))[0].sum().backward()  # world size 1
    finally:
        dist.destroy_process_group()
    assert calls == []


# ---- tied embeddings ------------------------------------------------------------------------

@pytest.mark.parametrize("low_rank", [True, False])
def test_a_tied_model_starts_near_ln_vocab_and_computes_the_documented_head(low_rank):
    model = create_model("tiny", tie_embeddings=True, low_rank_embeddings=low_rank, seed=SEED).eval()
    V, d = model.config.vocab_size, model.config.d_model
    ids = torch.randint(0, 256, (2, 64))
    normed = {}
    model.norm.register_forward_hook(lambda module, args, out: normed.update(x=out))
    with torch.no_grad():
        logits = model(ids[:, :-1])[0]
    loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).item()
    assert abs(loss - math.log(V)) < 1.0, loss
    # README: tied, logits = rms_norm(x)·Eᵀ, E = embed_low·project_upᵀ (or the embedding weight);
    # the final norm's weight starts at 1/d_model
    E = model.embed.embed_low @ model.embed.project_up.t() if low_rank else model.embed.weight
    assert torch.equal(model.norm.weight, torch.full((d,), 1.0 / d))
    torch.testing.assert_close(logits, normed["x"] @ E.t().detach(), rtol=1e-4, atol=1e-5)


def test_an_untied_model_keeps_its_initialisation():
    model = create_model("tiny", seed=SEED)
    assert torch.equal(model.norm.weight, torch.ones(model.config.d_model))
    assert model.lm_head.weight.std().item() == pytest.approx(0.02, rel=0.05)


# ---- pickling ----------------------------------------------------------------------------------

def test_a_model_that_ran_and_trained_pickles_whole():
    """torch.save(model) of a whole model after an inference forward and a training step: the CPU
    iterate's caches keep nothing on the parameters, and the budget's load hook is a module-level
    function (a lambda did not pickle)."""
    import io

    model = build_model(INLConfig(**MICRO))
    ids = torch.randint(0, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(SEED))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(ids)[0].float().logsumexp(-1).mean().backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        want = model(ids)[0]
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    clone = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        assert torch.equal(clone(ids)[0], want)
    clone.load_state_dict(model.state_dict())  # the hook still runs after unpickling
    assert clone.budget._budgets == model.budget._budgets
