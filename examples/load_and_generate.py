"""Reload the checkpoint simple_training.py saved and continue a few prompts, through the
original package's API: the tokenizer from its saved config, the model rebuilt from its saved
keyword arguments, the state dict loaded into it, then `generate` with temperature and top-p.

    python examples/simple_training.py                 # writes examples/checkpoints/inl_small
    python examples/load_and_generate.py --prompt "import " --prompt "class "

Each prompt is sampled after torch.manual_seed(--seed), as simple_training.py draws its own
sample: the same prompt, seed and length give the same text from the reloaded model.
"""
import argparse
import json
import os
import sys

import torch

from byte_tokenizer import AutoTokenizer
from inl_llm.models import UltraOptimizedIntegratorLanguageModel

HERE = os.path.dirname(os.path.abspath(__file__))
p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--checkpoint", default=os.path.join(HERE, "checkpoints", "inl_small"))
p.add_argument("--prompt", action="append", help="repeatable (default: three code openings)")
p.add_argument("--max-new-tokens", type=int, default=60)
p.add_argument("--temperature", type=float, default=0.8)
p.add_argument("--top-p", type=float, default=0.9)
p.add_argument("--seed", type=int, default=0)
args = p.parse_args()
prompts = args.prompt or ["def ", "import ", "class "]
device = "cuda" if torch.cuda.is_available() else "cpu"

weights = os.path.join(args.checkpoint, "pytorch_model.pt")
if not os.path.isfile(weights):
    sys.exit(f"no checkpoint at {args.checkpoint}: run simple_training.py first (or pass --checkpoint)")

tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
with open(os.path.join(args.checkpoint, "model_args.json")) as f:
    model_args = json.load(f)
model = UltraOptimizedIntegratorLanguageModel(**model_args)
model.load_state_dict(torch.load(weights, map_location="cpu"))
model.to(device).eval()
print(f"loaded: {weights} ({model.get_num_params():,} parameters, d_model {model_args['d_model']}, "
      f"layers {model_args['num_layers']}, vocab {tokenizer.vocab_size})")

for prompt in prompts:
    torch.manual_seed(args.seed)
    ids = tokenizer.encode(prompt, return_tensors="pt").to(device)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                             top_p=args.top_p, do_sample=True)
    print(f"sample: {prompt!r} + {out.shape[1] - ids.shape[1]} tokens -> "
          f"{tokenizer.decode(out[0], skip_special_tokens=True)!r}")

stats = model.get_inference_stats()
print(f"inference: {stats['avg_iterations']:.2f} integrator steps per row on average "
      f"(at most {model_args['num_iterations_per_layer']} per layer)")
