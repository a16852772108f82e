"""Training on the embedded corpus, the scheduler's wiring, and the CLI."""
import importlib
import subprocess
import sys

import pytest
import torch

from inl_llm import INLConfig, IntegratorLoss, build_model, load_checkpoint
from inl_llm.cli import main
from inl_llm.data import load_stdlib, split
from inl_llm.scheduler import create_cycle_scheduler
from inl_llm.train import TrainConfig, lr_at, train


def small(**overrides):
    base = dict(d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, feedforward_dim=128, num_iterations=2,
                min_iterations=1, controller_hidden=16, max_seq_len=64, seed=0)
    return build_model(INLConfig(**{**base, **overrides}))


@pytest.fixture(scope="module")
def corpus():
    return split(load_stdlib(max_bytes=300_000), 0.1)


def test_training_on_the_stdlib_lowers_eval_loss(corpus, tmp_path):
    model = small()
    tc = TrainConfig(steps=40, batch_size=8, seq_len=64, warmup_steps=10, eval_every=40, eval_batches=4,
                     checkpoint_dir=str(tmp_path / "ck"), progress=False)
    result = train(model, *corpus, tc, log=lambda _: None)
    first, last = result["history"][0]["loss"], result["history"][-1]["loss"]
    assert first == pytest.approx(torch.log(torch.tensor(259.0)).item(), abs=0.3)  # untrained: near uniform
    assert last < first - 1.5, (first, last)
    assert result["steps"] == 40 and [h["step"] for h in result["history"]] == [0, 40]
    assert set(result["last_terms"]) == {"L_task", "L_mean", "L_speed", "L_energy", "total"}
    # the final checkpoint holds the trained model, at the configured (inference) excitation
    loaded = load_checkpoint(tmp_path / "ck")
    ids = corpus[1][:40][None]
    model.eval()
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(model(ids)[0], loaded(ids)[0])


def test_every_checkpoint_holds_the_mu_of_the_steps_before_it(corpus, tmp_path, monkeypatch):
    """With the EMA at rate 1 (flat mu), the mu a checkpoint holds is exactly the batch mean of
    block 0's attention output in the last training forward before the save."""
    from inl_llm.checkpoint import save_training_checkpoint
    train_module = importlib.import_module("inl_llm.train")  # the name inl_llm.train is the function

    model = small(mu_ema_rate=1.0, hierarchical_mu=False)
    targets = []
    hook = model.blocks[0].attn.register_forward_hook(
        lambda m, i, out: targets.append(out[0].detach().reshape(-1, 64).mean(0)) if m.training else None)
    saved = []

    def save_and_read(model, directory, optimizer, train_state, extra=None, export_weights=True):
        path = save_training_checkpoint(model, tmp_path / f"step{extra['step']}", optimizer, train_state, extra,
                                        export_weights)
        saved.append((extra["step"], load_checkpoint(path).blocks[0].integrator.equilibrium().detach()))
        return path

    monkeypatch.setattr(train_module, "save_training_checkpoint", save_and_read)
    tc = TrainConfig(steps=3, batch_size=2, seq_len=16, warmup_steps=1, eval_every=100, eval_batches=1,
                     checkpoint_dir=str(tmp_path / "ck"), checkpoint_every=2, progress=False)
    train(model, *corpus, tc, log=lambda _: None)
    hook.remove()
    assert [step for step, _ in saved] == [2, 3]  # every 2 steps, then the final save
    torch.testing.assert_close(saved[0][1], targets[1])  # the second step's forward
    torch.testing.assert_close(saved[1][1], targets[2])


class RecordingLoss(IntegratorLoss):
    def __init__(self):
        super().__init__()
        self.phases = []

    def set_phase(self, is_exploration, lambda_mean=None, lambda_energy=None):
        super().set_phase(is_exploration, lambda_mean, lambda_energy)
        self.phases.append((is_exploration, lambda_mean, lambda_energy))


def test_scheduler_sets_excitation_and_loss_weights_every_step(corpus):
    model = small()
    amplitudes = []
    layer = next(model.integrator_layers())
    hook = layer.register_forward_pre_hook(lambda m, args: amplitudes.append(m.excitation_amplitude) if m.training
                                           else None)
    loss = RecordingLoss()
    tc = TrainConfig(steps=12, batch_size=2, seq_len=16, eval_every=100, eval_batches=1, preset="balanced",
                     cycle_unit="steps", cycle_scale=0.2, progress=False)
    train(model, *corpus, tc, loss_fn=loss, log=lambda _: None)
    hook.remove()
    sched = create_cycle_scheduler("balanced", unit="steps", scale=0.2)  # warmup 2, equilibrium 2, exploration 4
    expected = [sched.phase(t) for t in range(12)]
    assert amplitudes == [p.excitation_amplitude for p in expected]
    assert loss.phases == [(p.is_exploration, p.lambda_mean, p.lambda_energy) for p in expected]
    assert 0.05 in amplitudes and 0.0 in amplitudes
    assert layer.excitation_amplitude == model.config.excitation_amplitude  # restored for inference


def test_learning_rate_schedule():
    tc = TrainConfig(steps=110, lr=1.0, min_lr=0.1, warmup_steps=10)
    assert lr_at(tc, 0, 0) == pytest.approx(0.1)
    assert lr_at(tc, 9, 0) == pytest.approx(1.0)
    assert lr_at(tc, 60, 0) == pytest.approx(0.55)  # halfway through the cosine
    assert lr_at(tc, 110, 0) == pytest.approx(0.1)
    timed = TrainConfig(steps=10 ** 9, lr=1.0, min_lr=0.1, warmup_steps=10, time_budget=100.0)
    assert lr_at(timed, 20, 50.0) == pytest.approx(0.55)  # a time budget drives the decay


def test_cli_train_generate_demo(tmp_path, capsys):
    ck = tmp_path / "ck"
    main(["train", "--size", "tiny", "--set", "d_model=32", "--set", "num_layers=1", "--set", "max_seq_len=32",
          "--max-bytes", "60000", "--steps", "3", "--batch-size", "2", "--seq-len", "16", "--eval-every", "2",
          "--eval-batches", "1", "--out", str(ck), "--no-progress", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "eval loss" in out and load_checkpoint(ck).config.d_model == 32
    main(["generate", "--checkpoint", str(ck), "--prompt", "import ", "--max-new-tokens", "5", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "import " in out and "layer 0:" in out

    result = main(["demo", "--seconds", "1", "--max-bytes", "200000", "--tokens", "8", "--out", str(tmp_path / "demo"),
                   "--eval-batches", "1", "--no-progress"])
    out = capsys.readouterr().out
    assert result["identical"]
    for text in ("eval loss fell from", "identical logits", "sample from the reloaded model", "layer 3:",
                 "early exit at tol=0.5"):
        assert text in out, text


def test_python_dash_m_entry_point():
    done = subprocess.run([sys.executable, "-m", "inl_llm", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "demo" in done.stdout


def test_optimizer_is_torchs_fused_adamw_where_it_runs():
    """optimizer_for picks torch's fused AdamW for CPU (and CUDA) floating-point parameters; fed
    the same gradients, three of its steps land where three steps of the default per-tensor
    AdamW land (the same update, other rounding: within a few fp32 ulps of the weights). The
    same gradients: two models' own gradients would drift apart through their forwards."""
    from inl_llm.train import fused_adamw_runs, optimizer_for

    cfg = INLConfig.from_name("tiny", vocab_size=64, num_layers=2)
    torch.manual_seed(0)
    fused_model, plain_model = build_model(cfg), build_model(cfg)
    plain_model.load_state_dict(fused_model.state_dict())
    start = [p.detach().clone() for p in fused_model.parameters()]
    tc = TrainConfig(lr=1e-2, weight_decay=0.1)
    fused = optimizer_for(fused_model, tc)
    assert [g["fused"] for g in fused.param_groups] == [True, True]
    plain = torch.optim.AdamW([{"params": [p for p in plain_model.parameters() if p.dim() >= 2], "weight_decay": 0.1},
                               {"params": [p for p in plain_model.parameters() if p.dim() < 2], "weight_decay": 0.0}],
                              lr=1e-2, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        for a, b in zip(fused_model.parameters(), plain_model.parameters()):
            a.grad = torch.randn(a.shape, generator=g)
            b.grad = a.grad.clone()
        fused.step()
        plain.step()
    for (name, a), b in zip(fused_model.named_parameters(), plain_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    # the weights did move (by ~lr a step): the comparison is not of two untouched models
    assert all(not torch.allclose(a, b, rtol=0, atol=1e-3) for a, b in zip(start, fused_model.parameters()))

    assert not fused_adamw_runs([])
    assert not fused_adamw_runs([torch.zeros(2, dtype=torch.int64)])
    assert not fused_adamw_runs([torch.zeros(2, device="meta")])
