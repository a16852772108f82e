"""Trajectory distillation on a tiny case: alignment, the start from the teacher's weights, the
loss's invariants, a student that moves toward its teacher, and the CLI subcommand."""
import pytest
import torch

import inl_llm
from inl_llm import distill


def teacher_model(**kw):
    return inl_llm.create_model("tiny", d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, feedforward_dim=64,
                                controller_hidden=8, mu_group_size=16, num_iterations=4, max_seq_len=64, **kw)


def tokens(n=4000):
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(0))


def test_alignment():
    assert distill.aligned_steps(2, 4) == [2, 4]
    assert distill.aligned_steps(3, 6) == [2, 4, 6]
    assert distill.aligned_steps(4, 4) == [1, 2, 3, 4]
    assert distill.layer_pairs(2, 4) == [(0, 1), (1, 3)]
    assert distill.layer_pairs(3, 3) == [(0, 0), (1, 1), (2, 2)]
    # a student deeper than its teacher: in order, in range (round(0.5) - 1 was -1: the last layer)
    assert distill.layer_pairs(4, 2) == [(0, 0), (1, 0), (2, 1), (3, 1)]
    for s_layers in range(1, 9):
        for t_layers in range(1, 9):
            teachers = [t for _, t in distill.layer_pairs(s_layers, t_layers)]
            assert teachers == sorted(teachers) and 0 <= teachers[0] and teachers[-1] == t_layers - 1


def test_student_starts_from_the_teacher():
    teacher = teacher_model()
    config = distill.student_config(teacher.config)
    assert config.num_iterations == 2 and config.min_iterations == 2
    student, warm = distill.make_student(teacher, config)
    assert warm and student.iteration_budgets() == [2, 2]
    for (name, p), q in zip(teacher.named_parameters(), student.parameters()):
        assert torch.equal(p, q), name
    smaller, warm = distill.make_student(teacher, distill.student_config(teacher.config, 2, d_model=16,
                                                                         num_heads=2, num_kv_heads=1))
    assert not warm and smaller.config.d_model == 16


def test_loss_is_zero_for_a_copy_and_uses_aligned_steps():
    teacher = teacher_model().eval()
    x = tokens()[:48].view(3, 16)
    dc = distill.DistillConfig(lambda_traj=1.0, alpha_kd=1.0)
    with torch.no_grad():
        t_logits, t_aux, _ = teacher(x, return_trajectories=True)
        same = distill.Distiller(teacher, teacher, dc)((t_logits, t_aux), (t_logits, t_aux), x)
        assert same["kd"].abs().item() < 1e-6 and same["traj"].item() == 0.0
        # a 2-step "student" whose trajectory is the teacher's steps 2 and 4 matches exactly
        half = {"trajectory_x": [tx[..., [0, 2, 4], :] for tx in t_aux["trajectory_x"]]}
        student = distill.make_student(teacher, distill.student_config(teacher.config))[0]
        assert distill.Distiller(teacher, student, dc)((t_logits, t_aux), (t_logits, half), x)["traj"].item() == 0.0
        # and a trajectory off by one step does not
        off = {"trajectory_x": [tx[..., [0, 1, 3], :] for tx in t_aux["trajectory_x"]]}
        assert distill.Distiller(teacher, student, dc)((t_logits, t_aux), (t_logits, off), x)["traj"].item() > 0


def kl_to_teacher(teacher, student, x):
    with torch.no_grad():
        t = torch.log_softmax(teacher(x)[0].float(), -1)
        s = torch.log_softmax(student(x)[0].float(), -1)
    return (t.exp() * (t - s)).sum(-1).mean().item()


@pytest.mark.parametrize("smaller", [False, True])
def test_distillation_moves_the_student_toward_the_teacher(smaller):
    torch.manual_seed(0)
    # a teacher whose steps matter (dt 1) and whose predictions are sharp (a large LM head)
    teacher = teacher_model(dt=1.0)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(50.0)
    teacher.eval()
    overrides = dict(d_model=16, num_heads=2, num_kv_heads=1, feedforward_dim=32) if smaller else {}
    student, _ = distill.make_student(teacher, distill.student_config(teacher.config, 2, **overrides))
    held_out = tokens(8000)[-33 * 4:].view(4, 33)[:, :32]
    before = kl_to_teacher(teacher, student, held_out)
    dc = distill.DistillConfig(steps=25, batch_size=4, seq_len=32, lr=1e-3, warmup_steps=2)
    result = distill.distill(teacher, student, tokens(8000)[:-200], dc, log=lambda _: None)
    assert result["steps"] == 25 and set(result["last_terms"]) == {"kd", "traj", "total"}
    assert kl_to_teacher(teacher, student, held_out) < before


def test_cli_subcommand(tmp_path, capsys):
    from inl_llm.cli import main
    teacher = teacher_model()
    inl_llm.save_checkpoint(teacher, tmp_path / "teacher")
    text = tmp_path / "corpus.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 200)
    out = main(["distill", "--teacher", str(tmp_path / "teacher"), "--data", str(text), "--steps", "3",
                "--batch-size", "2", "--seq-len", "16", "--eval-batches", "1", "--out", str(tmp_path / "student")])
    printed = capsys.readouterr().out
    assert "eval loss: teacher" in printed and "tokens/s" in printed
    assert out["student"].config.num_iterations == 2 and out["started_from_teacher"]
    assert inl_llm.load_checkpoint(tmp_path / "student").config.num_iterations == 2
