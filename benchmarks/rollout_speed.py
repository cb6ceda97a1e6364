"""Rollout throughput (vLLM vs the hf fallback) and weight-sync time, same model and prompts.

    python benchmarks/rollout_speed.py                       # tiny model, CPU
    python benchmarks/rollout_speed.py --model qwen2.5-vl-3b --prompts 64 --n 8 --max-new-tokens 512

Prints one table. Tokens/s counts generated tokens only; sync is engine.update_weights (gather +
load + cache resets), measured after one warm-up sync.
Run with OMP_NUM_THREADS=1 on CPU (set before torch is imported; 2 threads on 2 cores are far slower).
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import model  # noqa: E402
import rollout  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="tiny", help="alias, hub id or local path")
parser.add_argument("--prompts", type=int, default=8, help="rows per call (half with an image)")
parser.add_argument("--n", type=int, default=8, help="completions per row")
parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens per completion (ignore_eos-like: random models rarely stop)")
parser.add_argument("--repeats", type=int, default=3, help="timed calls per engine (best is reported)")
parser.add_argument("--dtype", default="float32", help="torch dtype of both engines' weights")
args = parser.parse_args()

rank, world, device = model.init_distributed()
path = model.resolve_model(args.model)
processor = model.load_processor(path)
dtype = getattr(torch, args.dtype)
policy = model.load_model(path, dtype=dtype, device=device)


def rows(k: int) -> list[dict]:
    from PIL import Image

    out = []
    for i in range(k):
        image = Image.effect_noise((112 + 28 * (i % 3), 112), 60 + i).convert("RGB")
        out.append({"images": [image] if i % 2 == 0 else [], "question": f"Finding number {i} on this study?",
                    "options": {"A": "Normal", "B": "Mass", "C": "Effusion", "D": "Fracture"}, "answer_label": "B"})
    return out


def best_tokens_per_s(engine, batch: list[dict]) -> tuple[float, int]:
    best, tokens = 0.0, 0
    for r in range(args.repeats):
        start = time.perf_counter()
        out = engine.generate(batch, n=args.n, temperature=1.0, max_new_tokens=args.max_new_tokens, seed=r)
        seconds = time.perf_counter() - start
        tokens = sum(len(c.token_ids) for per_row in out for c in per_row)
        best = max(best, tokens / seconds)
    return best, tokens


batch = rows(args.prompts)
vllm_engine = rollout.VLLMEngine(path, processor, max_model_len=4096, max_images=1, dtype=args.dtype)
hf_engine = rollout.HFEngine(policy, processor)
vllm_tps, vllm_tokens = best_tokens_per_s(vllm_engine, batch)
hf_tps, hf_tokens = best_tokens_per_s(hf_engine, batch)

vllm_engine.update_weights(policy)  # warm-up
sync = []
for _ in range(args.repeats):
    start = time.perf_counter()
    vllm_engine.update_weights(policy)
    sync.append(time.perf_counter() - start)
params = sum(p.numel() for p in policy.parameters())

model.print0(f"\nmodel {args.model} ({params / 1e6:.1f} M params, {args.dtype}), {args.prompts} prompts x {args.n} "
             f"completions x <= {args.max_new_tokens} tokens, device {device}, torch threads {torch.get_num_threads()}")
model.print0("| engine | tokens per call | tokens/s | ratio |\n|---|---|---|---|")
model.print0(f"| vllm | {vllm_tokens} | {vllm_tps:,.0f} | {vllm_tps / hf_tps:.1f}x |")
model.print0(f"| hf (transformers generate) | {hf_tokens} | {hf_tps:,.0f} | 1.0x |")
model.print0(f"weight sync (gather + reload_weights + cache resets): best {min(sync):.3f} s, "
             f"mean {sum(sync) / len(sync):.3f} s over {len(sync)}")
del policy, hf_engine
vllm_engine.close()
model.cleanup_distributed()
