"""One AdamW step over an FSDP2-sharded model: torch's default, foreach and fused implementations.

    python benchmarks/optimizer_step.py                      # tiny model, CPU, one rank
    torchrun --nproc_per_node 8 benchmarks/optimizer_step.py --model qwen2.5-vl-3b

Prints one table: milliseconds per optimizer.step() (mean of --repeats after one warm-up step, so
the state exists) and the largest difference from the default's parameters after the same steps.
Gradients are fixed random tensors; the step is what sft.py and grpo.py take (model.adamw is fused).
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import model  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="tiny", help="alias, hub id or local path")
parser.add_argument("--repeats", type=int, default=10, help="timed steps per implementation")
args = parser.parse_args()

rank, world, device = model.init_distributed()
policy = model.load_sharded_model(model.resolve_model(args.model))
params = list(policy.parameters())
start = [p.detach().clone() for p in params]
torch.manual_seed(rank)
grads = [torch.randn_like(p) * 1e-3 for p in params]
count = sum(p.numel() for p in params) * world


def run(**kw) -> tuple[float, list[torch.Tensor]]:
    with torch.no_grad():
        for p, p0, g in zip(params, start, grads):
            p.copy_(p0)
            p.grad = g.clone()
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.01, **kw)
    opt.step()  # creates the state
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(args.repeats):
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / args.repeats, [p.detach().clone() for p in params]


rows = []
_, reference = run(foreach=False)
for name, kw in (("default (for loop)", {"foreach": False}), ("foreach", {"foreach": True}), ("fused", {"fused": True})):
    seconds, after = run(**kw)
    gap = max(float((a - b).abs().max().full_tensor() if hasattr(a, "full_tensor") else (a - b).abs().max())
              for a, b in zip(after, reference))
    rows.append((name, seconds, gap))
if rank == 0:
    print(f"\n{args.model}: {count / 1e6:.1f} M parameters, {world} rank(s), {device.type}")
    print("| AdamW | ms per step | vs default | max |param - default's| |")
    print("|---|---|---|---|")
    for name, seconds, gap in rows:
        print(f"| {name} | {seconds * 1e3:.1f} | {rows[0][1] / seconds:.1f}x | {gap:.1e} |")
model.cleanup_distributed()
