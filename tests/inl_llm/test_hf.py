"""The Hugging Face model (optional extra): Auto-class registration, save_pretrained ->
from_pretrained, transformers' greedy generate against ours, labels -> loss and a few steps of
transformers.Trainer, and conversion between our checkpoint directory and a transformers one.
Skipped when transformers is not installed; the core package must import without it."""
import subprocess
import sys

import pytest
import torch

from inl_llm import INLConfig, build_model, load_checkpoint, save_checkpoint

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers.Trainer needs it

import inl_llm.hf as hf  # noqa: E402

CONFIG = dict(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, feedforward_dim=48, max_seq_len=32,
              controller_hidden=8, min_embedding_rank=8, mu_group_size=8, num_iterations=5, min_iterations=1,
              tol=0.3, seed=3)
PROMPT = torch.tensor([[256, 100, 101, 102, 32], [256, 105, 109, 112, 111]])


def trained_model(**overrides):
    """Our model with every parameter moved off its initial value and budgets off their start."""
    model = build_model(INLConfig(**{**CONFIG, **overrides}))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    model(ids)[0].square().mean().backward()
    opt.step()
    model.budget.update(torch.tensor([1.0, 3.0]))
    return model.eval()


def test_the_core_package_imports_without_transformers():
    code = ("import sys; sys.modules['transformers'] = None; import inl_llm, inl_llm.cli, inl_llm.distributed; "
            "print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_registered_with_the_auto_classes(tmp_path):
    config = transformers.AutoConfig.for_model("inl_llm", **CONFIG)
    assert isinstance(config, hf.INLLLMConfig) and config.to_inl_config() == INLConfig(**CONFIG)
    model = transformers.AutoModelForCausalLM.from_config(config)
    assert isinstance(model, hf.INLForCausalLM) and isinstance(model, transformers.GenerationMixin)
    # a new model's parameters are those build_model draws from the seed
    reference = build_model(INLConfig(**CONFIG))
    assert all(torch.equal(a, b) for a, b in zip(model.model.state_dict().values(), reference.state_dict().values()))
    with pytest.raises(ValueError, match="dt must lie in"):
        hf.INLLLMConfig(**{**CONFIG, "dt": -1.0})


@pytest.mark.parametrize("overrides", [{}, {"mixture_of_integrators": True, "num_experts": 3, "top_k": 2},
                                       {"shared_controller": False, "low_rank_embeddings": False}])
def test_save_pretrained_then_from_pretrained_gives_identical_logits(tmp_path, overrides):
    model = hf.INLForCausalLM(hf.INLLLMConfig.from_inl_config(INLConfig(**{**CONFIG, **overrides})))
    model.model = trained_model(**overrides)
    model.save_pretrained(str(tmp_path))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert loaded.config.to_inl_config() == model.model.config
    assert loaded.model.iteration_budgets() == model.model.iteration_budgets() == [4, 5]  # averages [3, 4] + slack
    with torch.no_grad():
        assert torch.equal(loaded(PROMPT).logits, model.eval()(PROMPT).logits)
    if model.model.controller is not None:  # stored once, shared again after loading
        assert all(layer.controller is loaded.model.controller for layer in loaded.model.integrator_layers())


def test_transformers_greedy_generate_gives_our_tokens():
    model = hf.INLForCausalLM(hf.INLLLMConfig(**CONFIG))
    model.model = trained_model()
    no_eos = transformers.GenerationConfig(eos_token_id=None, pad_token_id=258)
    greedy = model.model.generate(PROMPT, 20, do_sample=False)
    theirs = model.generate(PROMPT, max_new_tokens=20, do_sample=False, generation_config=no_eos)
    assert theirs.shape == (2, 25)
    assert torch.equal(theirs, greedy)
    # with the EOS id (transformers stops a row there and pads it; ours repeats EOS)
    ours = model.model.generate(PROMPT, 20, do_sample=False, eos_token_id=257)
    theirs = model.generate(PROMPT, max_new_tokens=20, do_sample=False)
    assert torch.equal(theirs.where(theirs != 258, 257), ours[:, :theirs.shape[1]])
    # without a cache (the whole sequence every step): the same tokens
    uncached = model.generate(PROMPT, max_new_tokens=5, do_sample=False, use_cache=False, generation_config=no_eos)
    assert torch.equal(uncached, greedy[:, :10])


def test_left_padded_prompts_generate_as_ours():
    model = hf.INLForCausalLM(hf.INLLLMConfig(**CONFIG))
    model.model = trained_model()
    ids = torch.tensor([[258, 258, 256, 100, 101], [256, 105, 109, 112, 111]])
    mask = (ids != 258).long()
    ours = model.model.generate(ids, 8, do_sample=False, attention_mask=mask)
    theirs = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                            generation_config=transformers.GenerationConfig(eos_token_id=None, pad_token_id=258))
    assert torch.equal(theirs, ours)
    # the padded row continues as its prompt alone does
    alone = model.model.generate(ids[:1, 2:], 8, do_sample=False)
    assert torch.equal(theirs[0, 5:], alone[0, 3:])


def test_labels_give_the_shifted_loss_and_the_trainer_trains(tmp_path):
    model = hf.INLForCausalLM(hf.INLLLMConfig(**CONFIG))
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, 5] = -100
    out = model(ids, labels=labels)
    logits = out.logits.double()
    keep = labels[:, 1:] != -100
    by_hand = -torch.log_softmax(logits[:, :-1], -1).gather(-1, labels[:, 1:].clamp(min=0)[..., None])[..., 0]
    torch.testing.assert_close(out.loss.double(), by_hand[keep].mean(), rtol=1e-5, atol=0)

    stream = torch.randint(0, 256, (8, 24), generator=torch.Generator().manual_seed(2))
    dataset = [{"input_ids": row, "labels": row} for row in stream]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4,
                                          learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to=[],
                                          use_cpu=True, disable_tqdm=True, seed=0)
    before = model.model.lm_head.weight.detach().clone()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert not torch.equal(before, model.model.lm_head.weight)


def test_conversion_both_ways(tmp_path):
    model = trained_model()
    save_checkpoint(model, tmp_path / "ours")
    hf.to_hf(tmp_path / "ours", tmp_path / "hf")
    assert hf.is_hf_directory(tmp_path / "hf") and not hf.is_hf_directory(tmp_path / "ours")
    via_hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    hf.from_hf(tmp_path / "hf", tmp_path / "back")
    back = load_checkpoint(tmp_path / "back").eval()
    with torch.no_grad():
        expected = model(PROMPT)[0]
        assert torch.equal(via_hf(PROMPT).logits, expected)
        assert torch.equal(back(PROMPT)[0], expected)
    assert back.config == model.config and back.iteration_budgets() == model.iteration_budgets()


def test_cli_convert_both_ways(tmp_path, capsys):
    from inl_llm.cli import main
    model = trained_model()
    save_checkpoint(model, tmp_path / "ours")
    main(["convert", str(tmp_path / "ours"), str(tmp_path / "hf")])
    main(["convert", str(tmp_path / "hf"), str(tmp_path / "back")])
    printed = capsys.readouterr().out
    assert "-> Hugging Face model" in printed and "Hugging Face model" in printed.splitlines()[-1]
    with torch.no_grad():
        assert torch.equal(load_checkpoint(tmp_path / "back").eval()(PROMPT)[0], model(PROMPT)[0])
