"""Packed vs padded forwards in grpo.py's update: one micro-batch, the same sequences, side by side.

    python benchmarks/update_packing.py                                  # 32 sequences, cap 1024 (~8 min, 2 cores)
    python benchmarks/update_packing.py --seqs 8 --cap 256 --repeats 1   # a smoke run (~1.5 min)

grpo.py's own code on the tiny model, fp32, one process (model.init_distributed,
model.load_sharded_model: FSDP2, gradient checkpointing on the policy, a frozen reference copy);
one micro-batch of --seqs sequences cut by batching.cut_updates into forwards of at most
--max-tokens-per-forward tokens (padded: count x longest, packed: the sum), each built by
grpo.make_batch (model.collate, then model.pack unless padded). Two phases, timed:
  log-probs  build the batches, no_grad model.token_logprobs of the policy (old) and the reference
  update     grpo.train_forward per forward at grpo.py's defaults (clipped loss + 0.01 k3 KL,
             token-microbatch, backward), no optimizer step
Each layout runs in its own fresh process (--variant), so its peak RSS (ru_maxrss) is its own.
Seconds: the median of --repeats after one warm-up, CPU seconds (user + system) beside them (with
threads on every core, other work inflates both: the load average is printed). Real tokens/s:
prompt + completion tokens / seconds; tokens processed: what the layers see (B x T padded, N packed).

Lengths, seeded, shaped like the recipe's: toy rows (curate.py's question, options, a toy_tile) whose
image sides are drawn from 392-952 px in steps of 28 (the tiny processor's 224^2-pixel cap raised to
Qwen2.5-VL's 1280 x 28^2), ~300-1,260 prompt tokens; completions at the recipe's 4,096 cap are
lognormal, median 400 (sigma 0.6: 90% under ~870), with --tail of them (at least one) at the cap.
The run scales completions by --cap / 4096 (cap 1024: median ~100) and keeps the prompts; token ids
are random in [0, 151643). Last, plan.flops of the same micro-batch's update at the full cap for
Qwen2.5-VL-3B/7B: padded with every sequence at the longest of its forward (what the compute does),
packed at the real lengths (model.PACKED_SDPA attends within each sequence, sum of T_i^2).
"""
import argparse
import json
import math
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
RECIPE_CAP = 4096


def recipe_lengths(seqs: int, tail: float, seed: int) -> list[tuple[int, int, int]]:
    """(image width px, image height px, completion tokens at the 4,096 cap) per sequence."""
    rng = random.Random(seed)
    capped = set(rng.sample(range(seqs), max(1, round(seqs * tail))))
    return [(28 * rng.randint(14, 34), 28 * rng.randint(14, 34), RECIPE_CAP if i in capped else
             min(RECIPE_CAP - 1, max(16, round(rng.lognormvariate(math.log(400), 0.6))))) for i in range(seqs)]


def clock() -> tuple[float, float]:
    """(wall seconds, this process's user + system CPU seconds)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter(), r.ru_utime + r.ru_stime


# ---- one layout, in its own process ----

def run_variant(args) -> dict:
    sys.path.insert(0, str(ROOT))
    import torch

    import batching
    import curate
    import grpo
    import model as M

    torch.set_num_threads(args.threads)
    _, _, device = M.init_distributed()
    path = M.resolve_model("tiny")
    processor = M.load_processor(path)
    processor.image_processor.size["longest_edge"] = 1280 * 28 * 28  # Qwen2.5-VL's max_pixels, not tiny's
    rng, gen = random.Random(args.seed), torch.Generator().manual_seed(args.seed)
    encoded, samples = {}, []
    for i, (w, h, n) in enumerate(recipe_lengths(args.seqs, args.tail, args.seed)):
        row = {"images": [curate.toy_tile(rng, rng.choice("ABCD"), max(w, h)).resize((w, h))],
               "question": curate.TOY_QUESTION, "options": json.dumps(curate.TOY_OPTIONS)}
        encoded[i] = M.encode_prompt(processor, row)
        ids = torch.randint(0, 151643, (max(1, round(n * args.cap / RECIPE_CAP)),), generator=gen).tolist()
        samples.append((i, SimpleNamespace(token_ids=ids)))
    prompt_lens = [len(encoded[i]["input_ids"]) for i in range(args.seqs)]
    completion_lens = [len(c.token_ids) for _, c in samples]
    lengths = [p + n for p, n in zip(prompt_lens, completion_lens)]
    packing = args.variant == "packed"
    cut, _ = batching.cut_updates(list(range(args.seqs)), lengths, completion_lens, [True] * args.seqs, 1, 1, args.seqs,
                              args.max_tokens_per_forward, padded=not packing)
    forwards = cut[0][0]  # rank 0, update 0: the micro-batch's forwards
    adv = torch.randn(args.seqs, generator=gen)  # (B,)
    recipe = grpo.parse_args(["--data", "-"])  # grpo.py's loss flags at their defaults (KL 0.01, token-microbatch)

    policy = M.load_sharded_model(path, param_dtype=torch.float32, gradient_checkpointing=True)
    ref = M.load_sharded_model(path, param_dtype=torch.float32).requires_grad_(False)
    with open("/proc/self/status") as f:
        rss_loaded = next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))
    seconds = {"logprobs": [], "update": [], "cpu_logprobs": [], "cpu_update": []}
    for repeat in range(args.repeats + 1):
        start, batches = clock(), []
        with torch.no_grad():  # ---- log-probs: old and reference ----
            for fw in forwards:
                b = M.to_device(grpo.make_batch(fw, samples, encoded, processor, policy, packing), device)
                batches.append((fw, b, M.token_logprobs(policy, b), M.token_logprobs(ref, b)))
        M.reshard(policy, ref)
        middle = clock()
        policy.train()  # ---- update: forward + backward per forward, the micro-batch's normalisation ----
        for fw, b, old, ref_lp in batches:
            grpo.train_forward(policy, b, fw, old, ref_lp, adv, 0, 1, recipe)  # token-microbatch: no global count
        end = clock()
        processed = sum(b["input_ids"].numel() for _, b, _, _ in batches)
        del batches
        policy.zero_grad(set_to_none=True)  # what clip_and_step leaves
        print(f"{args.variant} repeat {repeat}: log-probs {middle[0] - start[0]:.2f} s, "
              f"update {end[0] - middle[0]:.2f} s", flush=True)
        for key, (a, b) in {"logprobs": (start, middle), "update": (middle, end)}.items():
            if repeat:  # the first is the warm-up
                seconds[key].append(b[0] - a[0])
                seconds["cpu_" + key].append(b[1] - a[1])
    del policy, ref
    M.cleanup_distributed()
    return {"variant": args.variant, "forwards": len(forwards), "prompt_lens": prompt_lens,
            "real_tokens": sum(lengths), "completion_tokens": sum(completion_lens), "processed_tokens": processed,
            **{k: statistics.median(v) for k, v in seconds.items()}, "all_seconds": seconds,
            "rss_loaded_mb": rss_loaded, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


# ---- the parent: both layouts, then the tables ----

def recipe_flops(prompt_lens: list[int], args) -> list[dict]:
    """plan.flops of one micro-batch's update (forward + backward) at the full 4,096 cap."""
    sys.path.insert(0, str(ROOT))
    import batching
    import plan as P

    sampled = recipe_lengths(args.seqs, args.tail, args.seed)
    completions = [n for *_, n in sampled]
    grids = [(1, h // 14, w // 14) for w, h, _ in sampled]  # 14 px patches; sides are multiples of 28
    lengths = [p + n for p, n in zip(prompt_lens, completions)]
    cut = {way: batching.split_by_tokens(lengths, args.max_tokens_per_forward, padded=way == "padded")
           for way in ("padded", "packed")}
    rows = []
    for name in ("qwen2.5-vl-3b", "qwen2.5-vl-7b"):
        s = P.shapes(name)

        def total(way: str, spans) -> float:  # spans(piece): the lengths each forward's attention runs over
            return sum(P.flops(s, spans(piece), sum(completions[j] for j in piece), [grids[j] for j in piece])
                       for piece in cut[way]) / 1e12

        rows.append({"model": name, "forwards": {k: len(v) for k, v in cut.items()},
                     "padded": total("padded", lambda piece: [max(lengths[j] for j in piece)] * len(piece)),
                     "packed": total("packed", lambda piece: [lengths[j] for j in piece])})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqs", type=int, default=32, help="sequences in the micro-batch (grpo.py --micro-batch)")
    p.add_argument("--cap", type=int, default=1024, help="completion cap of the run (lengths scaled by cap / 4096)")
    p.add_argument("--tail", type=float, default=0.04, help="share of completions at the cap (at least one)")
    p.add_argument("--max-tokens-per-forward", type=int, default=16384, help="grpo.py's (0: one forward)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per layout, after one warm-up")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--seed", type=int, default=0, help="lengths, images and token ids")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--variant", choices=["packed", "padded"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        return print("RESULT " + json.dumps(run_variant(args)), flush=True)

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1"}
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("json", "variant")]
    runs, load = {}, os.getloadavg()
    for variant in ("padded", "packed"):
        child = subprocess.run([sys.executable, __file__, "--variant", variant] + flags, capture_output=True,
                               text=True, env=env, cwd=ROOT)
        if child.returncode:
            raise SystemExit(f"{variant} failed (rc {child.returncode}):\n{child.stdout[-2000:]}{child.stderr[-3000:]}")
        lines = child.stdout.splitlines()
        print("\n".join(line for line in lines if not line.startswith("RESULT ")), flush=True)
        runs[variant] = json.loads(next(line[7:] for line in lines if line.startswith("RESULT ")))
    flops = recipe_flops(runs["packed"]["prompt_lens"], args)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": runs, "flops": flops}, indent=2))

    pad, pk = runs["padded"], runs["packed"]
    print(f"\nGRPO update of one micro-batch, tiny model, fp32, gradient checkpointing, {args.threads} threads: "
          f"{args.seqs} sequences, {pk['real_tokens']:,} real tokens ({pk['completion_tokens']:,} completion, cap "
          f"{args.cap}), forwards of <= {args.max_tokens_per_forward:,} tokens; median of {args.repeats}; load average "
          f"{load[0]:.1f} before, {os.getloadavg()[0]:.1f} after (1 min; other work skews both seconds)")
    print("| layout | forwards | tokens processed | log-probs s (CPU s), 2 fwd | real tok/s | update s (CPU s), "
          "fwd+bwd | real tok/s | RSS after load MiB | peak RSS MiB |\n|---|---|---|---|---|---|---|---|---|")
    for r in (pad, pk):
        print(f"| {r['variant']} | {r['forwards']} | {r['processed_tokens']:,} | {r['logprobs']:.2f} "
              f"({r['cpu_logprobs']:.2f}) | {r['real_tokens'] / r['logprobs']:,.0f} | {r['update']:.2f} "
              f"({r['cpu_update']:.2f}) | {r['real_tokens'] / r['update']:,.0f} | {r['rss_loaded_mb']:,.0f} | "
              f"{r['peak_rss_mb']:,.0f} |")
    x = {k: pk[k] / pad[k] for k in pk if isinstance(pk[k], float | int) and pad[k]}
    print(f"| packed / padded | | {x['processed_tokens']:.2f}x | {x['logprobs']:.2f}x ({x['cpu_logprobs']:.2f}x) | "
          f"{1 / x['logprobs']:.2f}x | {x['update']:.2f}x ({x['cpu_update']:.2f}x) | {1 / x['update']:.2f}x | "
          f"{x['rss_loaded_mb']:.2f}x | {x['peak_rss_mb']:.2f}x |")
    print(f"\nModel FLOPs of the same micro-batch's update (forward + backward) at the full cap {RECIPE_CAP}:\n"
          "| shapes | padded TFLOP | packed TFLOP | saved |\n|---|---|---|---|")
    for f in flops:
        print(f"| {f['model']} | {f['padded']:.1f} ({f['forwards']['padded']} forwards) | {f['packed']:.1f} "
              f"({f['forwards']['packed']}) | {1 - f['packed'] / f['padded']:.0%} |")


if __name__ == "__main__":
    main()
