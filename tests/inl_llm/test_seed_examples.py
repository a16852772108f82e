"""Every Python code example of the seed documents (../shared/seeds/*.txt), run against this
package: the code as the document prints it, with only its import lines changed (the documents
import from files of the original's first layout: `integrator_language_model_optimized`,
`optimizations`, ...; here `inl_llm.models`, `inl_llm.core`, `inl_llm.optimizations`) and sizes
too big for 2 CPU cores shrunk (marked `# shrunk`). Names an example uses without defining
(`tokenizer`, `input_ids`, `h`, `dataloader`, ...) are given to it, the way the surrounding text
assumes them.

The examples that cannot run carry the error they raise and why (README, "Compatibility with the
original package", lists them): pseudo-code formulas, placeholder arguments, a preset that does
not exist — they fail in the original package the same way."""
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "examples"


def byte_tokenizer():
    sys.path.insert(0, str(EXAMPLES_DIR))
    try:
        from byte_tokenizer import AutoTokenizer
    finally:
        sys.path.remove(str(EXAMPLES_DIR))
    return AutoTokenizer.from_pretrained("gpt2")


def given(**extra):
    """The names the surrounding text assumes, seeded."""
    g = torch.Generator().manual_seed(0)
    names = dict(tokenizer=byte_tokenizer(), input_ids=torch.randint(0, 256, (2, 12), generator=g))
    names.update(extra)
    return names


def states(width, rows=4):
    g = torch.Generator().manual_seed(1)
    return dict(h=torch.randn(rows, width, generator=g), x=torch.randn(rows, width, generator=g),
                v=torch.randn(rows, width, generator=g), t=3)


class Loader(list):
    """A dataloader of (inputs, targets) batches."""


def regression_data():
    g = torch.Generator().manual_seed(2)
    return Loader([(torch.randn(4, 512, generator=g), 5.0 + torch.randn(4, 1, generator=g))])


def lm_data():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 256, (2, 17), generator=g)
    return Loader([(ids[:, :-1], ids[:, 1:])])


# ---- the examples ------------------------------------------------------------------------------
# (id: document and first line of the code block, code, names given, check or expected error)

def check_lm(ns, name="model"):
    model = ns[name]
    assert model.get_num_params() == sum(p.numel() for p in model.parameters())


EXAMPLES = []


def example(doc_line, code, names=None, check=None, raises=None):
    # examples that build a named-size model (vocabulary 50,000) or train for 160 epochs take
    # seconds each on 2 cores
    slow = "create_" in code or "get_total_epochs()" in code
    EXAMPLES.append(pytest.param(code, names or {}, check, raises, id=doc_line,
                                 marks=[pytest.mark.slow] if slow else []))


example("000:39", """
from inl_llm.models import create_optimized_model

model = create_optimized_model(
    size='small',  # shrunk from 'medium'  # or 'large', '3B', '7B', '13B'
    vocab_size=50000,
    enable_all_optimizations=True  # Enables Level 1 optimizations
)
""", check=check_lm)

example("000:61", """
from inl_llm.models import create_ultra_optimized_model

model = create_ultra_optimized_model(
    size='small',  # shrunk from '7B'
    vocab_size=50000
)
""", check=check_lm)


def check_000_140(ns):
    # epoch 99 = warmup 10 + 2 cycles of 30 + 29: the third cycle's exploration phase
    assert ns["phase_info"]["phase_name"] == "exploration" and ns["epoch"] == 99
    assert ns["loss_fn"].exploration_phase is True


example("000:140", """
from inl_llm.models import create_optimized_model
from inl_llm.core import IntegratorLoss
from inl_llm.core import create_cycle_scheduler
import torch.optim as optim

# Create model
model = create_optimized_model(size='small', vocab_size=50000)

# Setup training
loss_fn = IntegratorLoss(variance_weighted=True)
optimizer = optim.AdamW(model.parameters(), lr=3e-4)
scheduler = create_cycle_scheduler(preset='balanced')

# Train loop
for epoch in range(100):
    phase_info = scheduler.step(epoch)
    loss_fn.set_exploration_phase(phase_info['is_exploration'])

    # ... training code ...
""", check=check_000_140)


def check_000_164(ns):
    assert ns["output"].shape == (1, 11 + 100)
    stats = ns["stats"]
    assert set(stats) == {f"layer_{i}_avg_iterations" for i in range(6)}
    assert all(1 <= a <= 5 for a in stats.values())


example("000:164", """
from inl_llm.models import create_optimized_model

model = create_optimized_model(size='small', vocab_size=50000)  # shrunk from 'medium'
model.eval()

# Generate text
prompt = tokenizer.encode("Hello world", return_tensors='pt')
output = model.generate(
    prompt,
    max_new_tokens=100,
    temperature=0.8,
    top_p=0.9
)

# Check inference stats (adaptive early stopping)
stats = model.get_inference_stats()
print(f"Average iterations per layer: {stats}")
# Expected: ~5-7 iterations (vs 10 max)
""", check=check_000_164)

example("000:187", """
from inl_llm.models import create_ultra_optimized_model

# Create 7B model with ALL optimizations
model = create_ultra_optimized_model(size='small', vocab_size=50000)  # shrunk from '7B'

print(f"Parameters: {model.get_num_params():,}")
""", check=check_lm)

example("000:272", """
from inl_llm.models import create_model, create_optimized_model, create_ultra_optimized_model
# For 24GB GPU, maximum model size:

# Without optimizations: ~3B params
model = create_model(size='small')  # Standard  # shrunk from '3B'

# With Level 1: ~7B params
model = create_optimized_model(size='small')  # shrunk from '7B' (not one of its sizes in the original either)

# With Level 1 + 2: ~10B params
model = create_ultra_optimized_model(size='small')  # shrunk from '13B'
""", check=check_lm)

example("000:286", """
from inl_llm.models import create_optimized_model
# Fastest configuration
model = create_optimized_model(
    size='small',  # shrunk from 'medium'
    enable_all_optimizations=True  # Adaptive stopping enabled
)

# Check statistics
stats = model.get_inference_stats()
# Aim for ~5-7 average iterations (vs 10 max)
""", check=lambda ns: len(ns["stats"]) == 6)

example("000:299", """
from inl_llm.core import create_cycle_scheduler
# Use cycle scheduler for best results
scheduler = create_cycle_scheduler(preset='balanced')

# Equilibrium phase: stabilize (10 epochs)
# Exploration phase: discover (20 epochs)
# Repeat 5 times = 150 epochs total
""", check=lambda ns: ns["scheduler"].get_total_epochs() == 160)


def check_001_92(ns):
    assert ns["logits"].shape == (2, 12, 50000) and len(ns["trajectory"]) == 6
    assert ns["trajectory"][0]["x"].shape == (24, 6, 512)  # [B·S, T+1, d]
    assert ns["output"].shape == (2, 112)


example("001:92", """
import sys
sys.path.insert(0, '/path/to/vAgent/architecture')

from inl_llm.models import create_model
import torch

# Create model with ALL V2 optimizations enabled by default
model = create_model(
    size='small',  # shrunk from '5B' (not one of create_model's sizes in the original either)  # Available: 'small' (30M), 'medium' (80M), '2B', '5B', '10B'
    vocab_size=50000
)

# Training mode: Full iterations
model.train()
logits, trajectory = model(input_ids, return_aux=True)
# trajectory contains full x/v states for each layer

# Inference mode: Adaptive early stopping (3× faster!)
model.eval()
logits, trajectory = model(input_ids, return_aux=True)
# Automatically uses 3-5 iterations instead of 12

# Generation
output = model.generate(
    input_ids,
    max_new_tokens=100,
    temperature=0.8,
    top_p=0.9
)
""", check=check_001_92)

# formulas printed as code: not Python
example("001:194", """
μ(t+1) = 0.9999 * μ(t) + 0.0001 * mean(h(t))
""", raises=(SyntaxError, "assign to function call"))
example("001:202", """
noise = amplitude * sin(γ * t + φ)  # γ and φ are learned
""", raises=(NameError, "amplitude"))
example("001:209", """
α(t) = α_base * (1 - exp(-κ * ||error||))
""", raises=(SyntaxError, None))
example("001:216", """
weight_i = 1 / (1 + Var(h_i))
""", raises=(NameError, "Var"))

example("001:247", """
from inl_llm.models import create_model
from inl_llm.core import IntegratorLoss, create_cycle_scheduler
import torch.optim as optim

# Create model (all V2 optimizations enabled by default)
model = create_model(size='small', vocab_size=50000)  # shrunk from 'medium'

# V2: IntegratorLoss with CrossEntropy support
loss_fn = IntegratorLoss(
    task_loss_type='ce',  # ✅ NEW: CrossEntropy for language modeling
    target_value=0.0,     # ✅ NEW: Normalized states
    lambda_mean_init=0.1,
    lambda_speed=0.01,
    lambda_energy=0.001,
    variance_weighted=True
)

optimizer = optim.AdamW(model.parameters(), lr=5e-5)  # ✅ NEW: Lower LR
scheduler = create_cycle_scheduler(preset='equilibrium')
""", raises=(ValueError, "unknown preset 'equilibrium'"))

example("002:47", """
from inl_llm.optimizations import LowRankEmbedding

embed = LowRankEmbedding(
    vocab_size=50000,
    d_model=2048,
    rank_ratio=0.125  # rank = d_model * 0.125 = 256
)
""", check=lambda ns: ns["embed"].num_parameters() == 13_324_288)

example("002:80", """
from inl_llm.optimizations import GradientCheckpointedINL
from inl_llm.core import IntegratorNeuronLayer

base_inl = IntegratorNeuronLayer(...)
checkpointed_inl = GradientCheckpointedINL(base_inl)
""", raises=(TypeError, "hidden_dim must be a positive int, got Ellipsis"))


def adaptive_names():
    from inl_llm.core import IntegratorNeuronLayer
    torch.manual_seed(0)
    return dict(base_inl=IntegratorNeuronLayer(hidden_dim=64, output_dim=64), **states(64))


def check_002_111(ns):
    assert ns["info"]["iterations_used"].shape == (4,) and ns["x"].shape == (4, 64)
    assert ns["stats"] == ns["adaptive_inl"].avg_iterations.item()


example("002:111", """
from inl_llm.optimizations import AdaptiveIntegratorNeuronLayer

adaptive_inl = AdaptiveIntegratorNeuronLayer(
    inl_layer=base_inl,
    convergence_threshold=0.01,  # L2 norm threshold
    min_iterations=3,            # Always do at least 3
    max_iterations=10            # Cap at 10
)

# During inference
x, v, info = adaptive_inl(h, use_early_stopping=True)
print(f"Used {info['iterations_used'].mean():.1f} iterations")
# the next block of the document
stats = adaptive_inl.avg_iterations.item()
# Exponential moving average of iterations used
""", names=adaptive_names, check=check_002_111)


def check_002_154(ns):
    assert ns["alpha"].shape == ns["v_cand"].shape == (4, 2048) and ns["layer_idx"] == 23


example("002:154", """
from inl_llm.optimizations import SharedController

# Create shared controller
shared_ctrl = SharedController(
    hidden_dim=2048,
    output_dim=2048,
    num_layers=24,
    hidden_controller=64
)

# Use in different layers
for layer_idx in range(24):
    alpha, beta, gate, v_cand = shared_ctrl(h, x, v, layer_idx=layer_idx)
""", names=lambda: states(2048), check=check_002_154)

example("002:208", """
from inl_llm.optimizations import SparseHarmonicINL

sparse_inl = SparseHarmonicINL(
    hidden_dim=2048,
    output_dim=2048,
    sparsity=0.1,  # 10% of dimensions
    excitation_amplitude=0.03
)

# Automatically applies sparse excitation
x_next, v_next, aux = sparse_inl(h, x, v, step=t)
""", names=lambda: states(2048), check=lambda ns: ns["sparse_inl"].num_excited == 205)

example("002:253", """
from inl_llm.optimizations import HierarchicalEquilibriumINL

hier_inl = HierarchicalEquilibriumINL(
    hidden_dim=2048,
    output_dim=2048,
    group_size=64,  # Each group shares offset
    target_value=5.0
)

# Get full μ
mu = hier_inl.get_mu()  # [2048] computed from 33 params
""", check=lambda ns: ns["mu"].shape == (2048,) and ns["hier_inl"].num_mu_parameters() == 33)

# an illustration of the expansion with made-up numbers, not code of the package
example("002:265", """
μ_global = 5.0                    # Single learned scalar
μ_offsets = [0.1, -0.2, 0.3, ...] # Per-group offsets (32 values)

# Expand to full dimensionality
μ[0:64]   = μ_global + μ_offsets[0]   # 5.1
""", raises=(NameError, "μ"))


def check_002_304(ns):
    assert ns["aux"]["top_k_experts"].shape == (4, 2) and ns["x_next"].shape == (4, 2048)


example("002:304", """
from inl_llm.optimizations import MixtureOfIntegrators

moi = MixtureOfIntegrators(
    hidden_dim=2048,
    output_dim=2048,
    num_experts=8,  # Total experts
    top_k=2         # Use top-2 per token
)

x_next, v_next, aux = moi(h, x, v, step=t)

# Check routing
print(aux['top_k_experts'])   # Which experts were chosen
print(aux['expert_weights'])  # Their weights
""", names=lambda: states(2048), check=check_002_304)

example("002:378", """
from inl_llm.models import create_optimized_model

# Level 1 optimizations (production-ready)
model = create_optimized_model(
    size='small',  # shrunk from 'medium'  # or 'small', 'large', '3B', '7B', etc.
    vocab_size=50000,
    enable_all_optimizations=True
)
""", check=check_lm)

example("002:396", """
from inl_llm.models import create_ultra_optimized_model

# Level 1 + Level 2 optimizations (research)
model = create_ultra_optimized_model(
    size='small',  # shrunk from '7B'
    vocab_size=50000
)
""", check=check_lm)


def check_custom_optimized(ns):
    c = ns["model"].config
    assert c.low_rank_embeddings and c.adaptive_stopping and c.tol == 0.01 and c.d_model == 256


example("002:412", """
from inl_llm.models import OptimizedIntegratorLanguageModel

model = OptimizedIntegratorLanguageModel(
    vocab_size=50000,
    d_model=256,  # shrunk from 2048
    num_layers=2,  # shrunk from 24
    # Pick and choose
    use_lowrank_embeddings=True,      # Level 1
    use_gradient_checkpointing=False,  # Disable if memory OK
    use_adaptive_stopping=True,       # Level 1
    lowrank_ratio=0.125,
    convergence_threshold=0.01
)
""", check=check_custom_optimized)

example("002:492", """
from inl_llm.models import create_optimized_model
model = create_optimized_model(
    size='small',  # shrunk from '7B' (not one of its sizes in the original either)
    vocab_size=50000,
    enable_all_optimizations=True  # Level 1 only
)
""", check=check_lm)

example("002:508", """
from inl_llm.models import create_ultra_optimized_model
model = create_ultra_optimized_model(
    size='small',  # shrunk from '13B'
    vocab_size=50000
)
""", check=check_lm)

# fragments that leave out IntegratorNeuronLayer's required context width (hidden_dim)
for line, args in (("003:72", "learnable_mu=True,           # Enabled by default\n    mu_adaptation_rate=1e-4      "
                                "# Slow EMA update"),
                   ("003:98", "excitation_amplitude=0.03,   # Default amplitude"),
                   ("003:164", "dynamic_alpha=True,   # Enabled by default\n    alpha_kappa=1.0       "
                               "# Sensitivity parameter")):
    example(line, f"""
from inl_llm.core import IntegratorNeuronLayer
IntegratorNeuronLayer(
    {args}
)
""", raises=(TypeError, "hidden_dim"))

example("003:137", """
from inl_llm.core import IntegratorLoss
IntegratorLoss(
    variance_weighted=True  # Enabled by default
)
""")


def check_003_203(ns):
    s = ns["scheduler"]
    assert s.equilibrium.duration == 10 and s.exploration.excitation_amplitude == 0.05 and s.total == 160


example("003:203", """
from inl_llm.core import create_cycle_scheduler

# Three presets available
scheduler = create_cycle_scheduler(preset='balanced')
# Options: 'conservative', 'balanced', 'aggressive'

# Or custom:
scheduler = create_cycle_scheduler(
    equilibrium_config={
        'lambda_mean': 0.5,
        'excitation_amplitude': 0.0,
        'duration_epochs': 10
    },
    exploration_config={
        'lambda_mean': 0.05,
        'excitation_amplitude': 0.05,
        'duration_epochs': 20
    },
    num_cycles=5,
    warmup_epochs=10
)
""", check=check_003_203)

example("003:344", """
from inl_llm.models import create_optimized_model

# Create optimized model with all efficiency improvements
model = create_optimized_model(
    size='small',  # shrunk from 'medium'  # 'small', 'medium', 'large', 'xlarge', '3B', '7B', '13B'
    vocab_size=50000,
    enable_all_optimizations=True  # Enables all 3 optimizations
)
""", check=check_lm)

ADVANCED_TRAINING = """
from inl_llm.core import IntegratorModel
from inl_llm.core import IntegratorLoss
from inl_llm.core import create_cycle_scheduler
import torch.optim as optim

# 1. Create model (all features enabled by default)
model = IntegratorModel(
    input_dim=512,
    hidden_dim=768,
    num_iterations=10,
    # Defaults: learnable_mu=True, dynamic_alpha=True,
    #           excitation_amplitude=0.03
)

# 2. Create loss (variance weighting enabled)
loss_fn = IntegratorLoss(
    target_value=5.0,
    variance_weighted=True,  # default
    lambda_mean_init=1.0,
    lambda_energy=0.01
)

# 3. Setup cycle scheduler
scheduler = create_cycle_scheduler(preset='balanced')

# 4. Optimizer
optimizer = optim.AdamW(model.parameters(), lr=3e-4)

# 5. Training loop
for epoch in range(scheduler.get_total_epochs()):

    # Update training phase
    phase_info = scheduler.step(epoch)
    loss_fn.set_exploration_phase(phase_info['is_exploration'])

    # Update model excitation amplitude
    if hasattr(model, 'inl'):
        model.inl.excitation_amplitude = phase_info['excitation_amplitude']

    # Train epoch
    for batch in dataloader:
        inputs, targets = batch

        # Forward with trajectory tracking
        outputs, trajectory = model(inputs, return_trajectory=True)

        # Get learned equilibrium for loss
        learned_mu = model.get_learned_mu()

        # Compute losses
        losses = loss_fn(
            predictions=outputs,
            targets=targets,
            trajectory=trajectory,
            epoch=epoch,
            learned_mu=learned_mu
        )

        # Backward
        optimizer.zero_grad()
        losses['total'].backward()
        optimizer.step()

        # Log
        print(f"Phase: {phase_info['phase_name']}, Loss: {losses['total'].item():.4f}")
"""


def check_003_362(ns):
    assert ns["epoch"] == 159 and ns["trajectory"]["x"].shape == (4, 11, 1)
    assert ns["model"].inl.excitation_amplitude == 0.05  # the last cycle's exploration


example("003:362", ADVANCED_TRAINING, names=lambda: dict(dataloader=regression_data()), check=check_003_362)


def check_003_470(ns):
    m = ns["metrics"]
    assert set(m) == {"time_to_converge", "final_rmse", "final_mean", "final_std", "fraction_converged"}
    assert 1 <= m["time_to_converge"] <= 10


example("003:470", ADVANCED_TRAINING.replace("scheduler.get_total_epochs()", "2") + """
# the document's next block, on the model and trajectory above
from inl_llm.core import compute_convergence_metrics

metrics = compute_convergence_metrics(
    x_trajectory=trajectory['x'],
    target_value=model.inl.mu.mean().item()
)
""", names=lambda: dict(dataloader=regression_data()), check=check_003_470)


def check_003_548(ns):
    import pandas as pd
    assert list(pd.read_parquet("data.parquet").columns) == ["prompt", "completion"]


example("003:548", """
import pandas as pd

df = pd.DataFrame({
    'prompt': ['What is AI?', 'Explain quantum physics'],
    'completion': ['Artificial Intelligence...', 'Quantum mechanics...']
})
df.to_parquet('data.parquet')
""", check=check_003_548)

example("003:648", """
from inl_llm.models import OptimizedIntegratorLanguageModel

model = OptimizedIntegratorLanguageModel(
    vocab_size=50000,
    d_model=256,  # shrunk from 2048
    num_layers=2,  # shrunk from 24
    # Enable/disable specific optimizations
    use_lowrank_embeddings=True,      # Default: True
    use_gradient_checkpointing=True,  # Default: False (enable for large models)
    use_adaptive_stopping=True,       # Default: True
    lowrank_ratio=0.125,              # Rank = d_model * 0.125
    convergence_threshold=0.01        # Early stopping threshold
)
""", check=check_custom_optimized)


def check_004_56(ns):
    assert ns["logits"].shape == (2, 12, 50261) and len(ns["aux_info"]) == 2 and ns["cache"].length == 12
    assert ns["output_ids"].shape == (2, 112)
    assert ns["model"].config.num_kv_heads == 6


example("004:56", """
from inl_llm.models import UltraOptimizedIntegratorLanguageModel

model = UltraOptimizedIntegratorLanguageModel(
    vocab_size=50261,
    d_model=192,  # shrunk from 3072
    num_layers=2,  # shrunk from 32
    num_heads=24,
    num_kv_heads=6,        # GQA: 4 Q heads per KV head
    num_iterations_per_layer=2,
    feedforward_dim=384,  # shrunk from 12288
    max_seq_len=4096,
    # All optimizations enabled by default
)

# Forward pass
logits, aux_info, cache = model(input_ids, use_cache=True, return_aux=True)

# Generation with KV cache
output_ids = model.generate(
    input_ids,
    max_new_tokens=100,
    temperature=0.8,
    top_p=0.9,
    use_cache=True  # 3x faster!
)
""", check=check_004_56)


@pytest.mark.parametrize("code,names,check,raises", EXAMPLES)
def test_seed_example(code, names, check, raises, tmp_path, monkeypatch):
    if "pandas" in code:
        pytest.importorskip("pandas")
    monkeypatch.chdir(tmp_path)  # an example that writes a file writes it here
    monkeypatch.setattr(sys, "path", list(sys.path))  # an example that edits sys.path edits a copy
    torch.manual_seed(0)
    ns = given(**(names() if callable(names) else names))
    if raises is not None:
        error, match = raises
        with pytest.raises(error, match=match):
            exec(compile(code, "<seed example>", "exec"), ns)
        return
    exec(compile(code, "<seed example>", "exec"), ns)
    if check is not None:
        result = check(ns)
        assert result is None or result
