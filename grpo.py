"""GRPO for Qwen2.5-VL, by hand: FSDP2 training, vLLM rollouts in the same process, a verifiable reward.

One step, in this order (see `main`):
  rollout     every rank samples n completions for each of its prompts (vLLM, or --rollout hf)
  reward      reward.reward: 1 for <think>..</think><answer>right</answer>, else 0
  advantages  per prompt group: (r - mean) / (std + 1e-6)
  log-probs   old log-probs (the policy before this step's updates; with one update per step they
              are the update's own, detached) and the frozen reference's
  batches     the step's sequences split over the ranks by their tokens (verl's balance_batch), each
              rank's cut into mini-batches (one per optimizer update) and micro-batches of 32 sequences,
              each run packed (one row, no padding) in forwards of at most --max-tokens-per-forward tokens
  update      per mini-batch: clipped policy loss + k3 KL over micro-batches, clip the gradient norm,
              AdamW step (2 mini-batches per step by default, one PPO epoch)
  sync        stream the new weights into vLLM, reset its caches
  log, checkpoint, eval

Defaults are the MedVLThinker recipe (SPEC.md section 5): 256 prompts x 8 completions per step,
mini-batch 128 prompts, lr 1e-6 constant, AdamW (0.9, 0.999, wd 0.01), grad clip 1.0, KL 0.01
(k3, clamped), clip 0.2/0.2, dual clip 3.0, max 2048 prompt / 4096 response tokens, T = 1.0,
loss averaged per micro-batch like verl@54b2677 (`--loss-agg token-global` is the correct mean), and
verl's update batches (balance_batch, 32 sequences per micro-batch, use_remove_padding): which
sequences share a micro-batch sets each token's weight under that average.
Left out on purpose: entropy bonus (0 in the recipe), critic, reward models.

    python grpo.py --model tiny --data DATA --prompts-per-step 4 --mini-batch 2 ...   # 1 process, CPU
    torchrun --nproc_per_node 8 grpo.py --model qwen2.5-vl-7b --data DATA              # 1 node
Resuming needs no RNG state: the data order is a function of (seed, epoch) and every prompt's
sampling is seeded by (seed, step, prompt), so a resumed run reproduces the uninterrupted one.
Rows with images are never truncated: a prompt over --max-prompt-tokens is an error before
training starts (or, with --skip-long-prompts, dropped with a count). A run resumes from the last
complete checkpoint in --out with --resume; a non-empty --out is refused without --resume or --overwrite.
"""

import argparse
import json
import os
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

import checkpoints as C
import data as D
import evaluate
import lora as L
import model as M
import plan as P
import rollout
import reward as R
from batching import Forward, balanced_order, cut_updates


# ---- config ----

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="qwen2.5-vl-3b", help="alias (qwen2.5-vl-3b|7b|32b, tiny), hub id or local checkpoint")
    g.add_argument("--data", help="training rows: hub name, save_to_disk dir, or parquet/jsonl file")
    g.add_argument("--split", default="train", help="split of a hub dataset or DatasetDict")
    g.add_argument("--max-prompt-tokens", type=int, default=2048, help="longer prompts are an error (see --skip-long-prompts)")
    g.add_argument("--skip-long-prompts", action="store_true", help="drop over-long prompts (with a count) instead of stopping")
    g = p.add_argument_group("rollout")
    g.add_argument("--prompts-per-step", type=int, default=256, help="prompts per step, all ranks together")
    g.add_argument("--group-size", type=int, default=8, help="completions per prompt (GRPO's group)")
    g.add_argument("--max-response-tokens", type=int, default=4096, help="max new tokens per completion")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling")
    g.add_argument("--rollout", choices=["vllm", "hf"], default="vllm", help="engine: vLLM in process, or transformers generate")
    g.add_argument("--tensor-parallel", type=int, default=1, help="vLLM tensor parallel size (ranks per engine)")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.6, help="vLLM's share of GPU memory")
    g.add_argument("--vllm-dtype", default="auto", help="vLLM weights dtype (auto: the checkpoint's; float32 on CPU for exact canaries)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--mini-batch", type=int, default=128, help="prompts per optimizer update, all ranks together")
    g.add_argument("--micro-batch", type=int, default=32,
                   help="sequences per micro-batch on one rank (the paper's ppo_micro_batch_size_per_gpu: 32 for 3B/7B, "
                        "16 for 32B); with token-microbatch it sets each token's weight")
    g.add_argument("--max-tokens-per-forward", type=int, default=P.DEFAULT_TOKENS_PER_FORWARD,
                   help="a micro-batch with more tokens runs as several forwards/backwards with the micro-batch's "
                        "normalisation (the same gradient, memory bounded by this; every recipe model fits 80 GiB "
                        "GPUs with it in the memory plan); 0: never split")
    g.add_argument("--no-packing", action="store_true",
                   help="right-pad each forward's sequences to the longest instead of packing them into one row")
    g.add_argument("--no-balance", action="store_true",
                   help="each rank trains its own rollouts instead of verl's balanced split of the step's sequences")
    g.add_argument("--lr", type=float, default=1e-6, help="constant learning rate (after --warmup-steps)")
    g.add_argument("--warmup-steps", type=int, default=0,
                   help="linear warm-up over this many steps (0: none, the recipe; the demo's high lr needs it)")
    g.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.999), help="AdamW betas")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    g.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm")
    g.add_argument("--epochs", type=int, default=1, help="passes over the data (m23k: 5, PMC-VQA: 1)")
    g.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: epochs decide)")
    g.add_argument("--seed", type=int, default=42, help="data order and sampling seed")
    g.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                   help="compute dtype (FSDP2 mixed precision; master weights stay fp32). Default: bfloat16 on GPU "
                        "and for --plan, float32 on CPU")
    g.add_argument("--no-gradient-checkpointing", action="store_true", help="keep activations instead of recomputing them")
    g.add_argument("--offload", action="store_true", help="keep the policy's fp32 shards, gradients and AdamW state in "
                                                          "host memory (FSDP2 CPU offload: one GPU, slower steps)")
    L.add_args(p)
    D.add_report_args(p)
    g = p.add_argument_group("GRPO loss")
    g.add_argument("--kl-coef", type=float, default=0.01, help="k3 KL to the initial model (0: no reference model is built)")
    g.add_argument("--ref-offload", action="store_true", help="keep the reference model's shards in host memory")
    g.add_argument("--clip-low", type=float, default=0.2, help="PPO clip below 1")
    g.add_argument("--clip-high", type=float, default=0.2, help="PPO clip above 1")
    g.add_argument("--dual-clip", type=float, default=3.0, help="dual clip c for negative advantages")
    g.add_argument("--loss-agg", choices=["token-microbatch", "token-global"], default="token-microbatch",
                   help="token-microbatch: the paper's (verl@54b2677); token-global: mean over all tokens of the mini-batch")
    g.add_argument("--filter-zero-variance", action="store_true", help="leave groups whose rewards are all equal out of the update")
    g.add_argument("--lenient-reward", action="store_true", help="also accept '(B)', 'B.', 'B: text' (reward.py)")
    g.add_argument("--canary-max-gap", type=float, default=0.1, help="stop when mean |vLLM - trainer| log-prob exceeds this")
    g = p.add_argument_group("output")
    g.add_argument("--out", default="runs/grpo", help="output directory")
    g.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps (and at the end; 0: only at the end)")
    g.add_argument("--keep-last", type=int, default=0, help="keep only the last K checkpoints (0: all)")
    g.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint in --out")
    g.add_argument("--overwrite", action="store_true", help="start afresh in a non-empty --out (its old run's files are deleted)")
    g.add_argument("--dump-every", type=int, default=10, help="write sampled rollouts every N steps")
    g.add_argument("--eval-data", default=None, help="rows evaluate.py scores greedily every --eval-every steps")
    g.add_argument("--eval-every", type=int, default=0, help="0: no in-training evaluation; else also one before the first step")
    g = p.add_argument_group("memory plan and telemetry")
    g.add_argument("--plan", action="store_true", help="print the expected memory per GPU and per node, exit 0 if it fits, 2 if not")
    g.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", 1)),
                   help="GPUs that --plan plans for (default: torchrun's WORLD_SIZE, else 1)")
    g.add_argument("--gpu-memory-gb", type=float, default=None,
                   help="GiB per GPU to plan for (default: this GPU's, else 80); when given, a CPU run is checked too")
    g.add_argument("--peak-tflops", type=float, default=None,
                   help="device peak TFLOP/s for MFU (default: bf16 dense peak of a known GPU; none on CPU: MFU is null)")
    args = p.parse_args(argv)
    if not args.plan and not args.data:
        p.error("--data is required")
    args.dtype = args.dtype or ("bfloat16" if torch.cuda.is_available() or args.plan else "float32")
    D.check_flags(p, args, {"prompts_per_step": 1, "group_size": 1, "mini_batch": 1, "micro_batch": 1, "epochs": 1,
                            "max_prompt_tokens": 1, "max_response_tokens": 1, "lr": 0, "kl_coef": 0, "dual_clip": 1},
                  above={"temperature": 0, "top_p": 0, "grad_clip": 0})  # before vLLM or the model loads
    if args.prompts_per_step % args.mini_batch:
        p.error("--prompts-per-step must be a multiple of --mini-batch")
    if args.resume and args.overwrite:
        p.error("--resume continues the run in --out, --overwrite replaces it: pass one")
    L.check_args(p, args)
    D.check_report_args(p, args)
    return args


# ---- GRPO math: pure functions, CPU-testable ----

def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """rewards (N,), consecutive groups of `group_size` completions of one prompt -> advantages (N,).
    (r - mean) / (std + eps) within each group, unbiased std; a group of one has mean 0, std 1."""
    r = rewards.view(-1, group_size).float()                   # (G, n)
    if group_size == 1:
        return r.view(-1).clone()
    mean, std = r.mean(-1, keepdim=True), r.std(-1, keepdim=True)  # (G, 1)
    return ((r - mean) / (std + eps)).view(-1)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token low-variance KL estimate (k3): exp(ref - logp) - (ref - logp) - 1, in [-10, 10].
    The log-ratio is clamped to [-20, 20] first, so exp cannot overflow into an inf gradient."""
    log_ratio = (ref_logp - logp).clamp(-20, 20)               # (B, T)
    return (log_ratio.exp() - log_ratio - 1).clamp(-10, 10)   # (B, T)


def clipped_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, clip_low: float = 0.2,
                        clip_high: float = 0.2, dual_clip: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate per token, with the dual clip for negative advantages.
    logp, old_logp (B, T); adv (B, T) or (B, 1): each sequence's advantage on its tokens (per_token).
    Returns (loss (B, T), clipped (B, T) bool)."""
    ratio = (logp - old_logp).clamp(-20, 20).exp()             # (B, T)
    loss_unclipped = -adv * ratio
    loss_clipped = -adv * ratio.clamp(1 - clip_low, 1 + clip_high)
    loss = torch.maximum(loss_unclipped, loss_clipped)         # pessimistic bound
    # dual clip: with adv < 0 a huge ratio would give an unbounded loss; cap it at -adv * c
    loss = torch.where(adv < 0, torch.minimum(loss, -adv * dual_clip), loss)
    return loss, loss_clipped > loss_unclipped


def aggregate(loss_tok: torch.Tensor, mask: torch.Tensor, mode: str, num_micro_batches: int = 1,
              global_tokens: int | None = None, world_size: int = 1, micro_tokens: int | None = None) -> torch.Tensor:
    """Per-token loss (B, T) -> the scalar this micro-batch (or this piece of one) backpropagates.

    token-microbatch (the paper's, verl@54b2677): mean over this micro-batch's tokens, divided by
      the number of micro-batches. A token's weight then depends on how many tokens share its
      micro-batch: long and short completions count differently depending on how the batch was cut.
    token-global (correct): sum over this micro-batch's tokens / all tokens of the mini-batch on all
      ranks, times world_size because FSDP averages gradients over ranks. Every token weighs the
      same, whatever the micro-batch size, accumulation steps or number of ranks.
    A micro-batch run as several forwards (--max-tokens-per-forward) passes its whole completion token
    count as `micro_tokens`: each piece then divides by the micro-batch's tokens, and the pieces'
    gradients add up to the unsplit micro-batch's.
    """
    total = (loss_tok * mask).sum()
    if mode == "token-microbatch":
        tokens = mask.sum().clamp(min=1) if micro_tokens is None else max(micro_tokens, 1)
        return total / tokens / num_micro_batches
    if mode == "token-global":
        return total * world_size / max(global_tokens, 1)
    raise ValueError(f"unknown loss aggregation {mode!r}")


def per_token(values: torch.Tensor, batch: dict) -> torch.Tensor:
    """One value per sequence (B,) -> one per token in the batch's layout: (1, N) packed, (B, 1) padded."""
    if "seq_lens" in batch:                                    # model.pack: sequences side by side
        return values.repeat_interleave(batch["seq_lens"])[None]
    return values[:, None]


def canary(samples: list, idx: list[int], old: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """|engine log-prob - trainer log-prob| per completion token of the forward of sequences `idx`
    (old, mask (B, T) padded or (1, N) packed: mask picks their completion tokens in sequence order)."""
    engine = torch.cat([torch.tensor(samples[i][1].logprobs, dtype=torch.float32) for i in idx])
    return (engine.to(old.device) - old[mask]).abs()


# ---- data ----

def check_prompt_lengths(rows, processor, args, rank: int, world: int) -> tuple[list[int], list[int]]:
    """(indices of rows to train on, every row's prompt tokens, image tokens included). Over-long
    prompts are never truncated (image tokens would no longer match image features): they stop the
    run, naming them, or are skipped with a count."""
    mine = [(i, M.prompt_tokens(processor, rows[i])) for i in range(rank, len(rows), world)]
    lengths = [None] * world
    dist.all_gather_object(lengths, mine)
    too_long = sorted((i, n) for part in lengths for i, n in part if n > args.max_prompt_tokens)
    if too_long and not args.skip_long_prompts:
        names = [f"row {i} (dataset_index {rows[i].get('dataset_index')}, {n} tokens)" for i, n in too_long[:10]]
        raise SystemExit(f"{len(too_long)} prompts exceed --max-prompt-tokens {args.max_prompt_tokens}: "
                         + "; ".join(names) + ". Resize the images, raise the limit, or pass --skip-long-prompts.")
    if too_long:
        M.print0(f"skipping {len(too_long)} prompts over {args.max_prompt_tokens} tokens")
    skip = {i for i, _ in too_long}
    prompt_lens = [0] * len(rows)
    for i, n in (pair for part in lengths for pair in part):
        prompt_lens[i] = n
    return [i for i in range(len(rows)) if i not in skip], prompt_lens


def step_prompts(order_seed: int, indices: list[int], step: int, per_step: int) -> list[int]:
    """The prompts of a step: epoch e is a permutation of `indices` seeded by (seed, e); steps take
    consecutive slices and drop the remainder. A pure function of the step: resuming needs no state."""
    steps_per_epoch = len(indices) // per_step
    epoch, k = divmod(step, steps_per_epoch)
    order = indices[:]
    random.Random(order_seed * 1000 + epoch).shuffle(order)
    return order[k * per_step:(k + 1) * per_step]


# ---- checkpoints ----

def save(policy, optimizer, processor, args, step: int) -> None:
    path = Path(args.out) / "checkpoints" / f"step_{step:06d}"
    C.save_training_checkpoint(policy, optimizer, processor, path, {"step": step, "config": vars(args)},
                               dtype=getattr(torch, args.dtype), keep_last=args.keep_last)


# ---- the loop ----

def run_eval(engine, eval_rows: list[dict], args, step: int, metrics: D.Metrics) -> None:
    """evaluate.py's greedy run and summary of the engine's current weights; one metrics line."""
    t_eval = time.perf_counter()
    records = evaluate.run(engine, eval_rows, Path(args.out) / "eval" / f"step_{step:06d}.jsonl",
                           max_new_tokens=args.max_response_tokens, seed=args.seed)
    summary, s_eval = evaluate.summarize(records), round(time.perf_counter() - t_eval, 3)
    M.print0(f"eval step {step}: " + " ".join(f"{name} {v['lenient']:.1f}" for name, v in summary.items())
             + f" time {s_eval:.1f}s")
    metrics.log({"step": step, "eval": summary, "s_eval": s_eval})


def train_forward(policy, b: dict, fw: Forward | None, old: torch.Tensor | None, ref_lp: torch.Tensor | None,
                  adv: torch.Tensor, global_tokens: int, world: int, args) -> tuple[dict, torch.Tensor | None]:
    """One forward/backward of the update on batch `b` (on the device): clipped policy loss + k3 KL,
    aggregated (--loss-agg) and backpropagated. fw None is a padding forward: it joins the
    collectives and contributes nothing. old None (one update per step) takes the forward's own
    log-probs, detached, as the old ones. Returns (sums of loss, KL and clipped tokens over its
    completion tokens, the old log-probs used)."""
    logp = M.token_logprobs(policy, b, args.temperature)                # (B, T) padded, (1, N) packed
    if fw is None:
        (logp.sum() * 0).backward()
        return {}, None
    mask = b["completion_mask"]                                          # (B, T)
    old = logp.detach() if old is None else old
    pg, clipped = clipped_policy_loss(logp, old, per_token(adv[fw.idx].to(logp.device), b), args.clip_low,
                                      args.clip_high, args.dual_clip)   # (B, T)
    kl = kl_k3(logp, ref_lp) if ref_lp is not None else torch.zeros_like(pg)
    loss_tok = pg + args.kl_coef * kl                                   # (B, T)
    aggregate(loss_tok, mask, args.loss_agg, fw.micro_batches, global_tokens, world, fw.micro_tokens).backward()
    return {"loss": (loss_tok.detach() * mask).sum().item(), "kl": (kl.detach() * mask).sum().item(),
            "clip": (clipped & mask).sum().item()}, old


def reference_logprobs(ref, policy, b: dict, temperature: float) -> torch.Tensor | None:
    """The reference model's log-probs: its own frozen copy's, or with LoRA (ref is policy) the
    policy's with its adapters off; None without a reference (--kl-coef 0)."""
    if ref is None:
        return None
    with L.adapters_off(policy) if ref is policy else nullcontext():
        return M.token_logprobs(ref, b, temperature)


def gather_samples(local: list, world: int) -> list:
    """Every rank's samples, in rank order (= the step's prompt order), on every rank."""
    everyone = [None] * world
    dist.all_gather_object(everyone, local)
    return [s for part in everyone for s in part]


def make_batch(fw: Forward | None, samples: list, encoded: dict, processor, model, packing: bool) -> dict:
    """The model batch of one forward: its sequences right-padded (model.collate), then packed
    (model.pack) unless --no-packing. None (a padding forward) is one pad token after the step's first
    prompt: it joins the collectives and trains nothing."""
    pad = processor.tokenizer.pad_token_id
    idx = fw.idx if fw is not None else [0]
    completions = [samples[i][1].token_ids for i in idx] if fw is not None else [[pad]]
    batch = M.collate([encoded[samples[i][0]] for i in idx], completions, pad)
    return M.pack(model, batch) if packing else batch


def log_step(m: dict, step: int, total_steps: int, metrics: D.Metrics) -> None:
    """The step's line on stdout and its record in metrics.jsonl and the tracker (rank 0)."""
    print(f"step {step}/{total_steps} reward {m['reward']:.3f} acc {m['accuracy']:.3f} "
          f"format {m['format']:.3f} len {m['response_len']:.0f}/{m['response_len_max']:.0f} "
          f"kl {m['kl']:.4f} clip {m['clip_frac']:.3f} gnorm {m['grad_norm']:.3f} "
          f"zero-var {m['zero_var_groups']:.2f} canary {m['canary_mean']:.2e}/{m['canary_max']:.2e} | "
          + P.perf_line(m), flush=True)
    metrics.log({"step": step, **m})


def dump_rollouts(path: Path, rows, samples: list, lengths: list[int], order: list[int], world: int) -> None:
    """One JSON line per sample of the step, in rollout order: its row, completion, reward, valid tokens
    (what the balance weighs) and the rank that trained it."""
    per_rank = len(order) // world
    rank_of = {i: pos // per_rank for pos, i in enumerate(order)}
    path.parent.mkdir(exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps({"dataset_index": rows[i].get("dataset_index"), "completion": c.text, "reward": float(r),
                                 "tokens": lengths[j], "rank": rank_of[j]}) + "\n"
                     for j, (i, c, r, *_) in enumerate(samples))


def step_metrics(samples: list, zero_var: torch.Tensor, stats: dict, gaps: list, norms: list[float], t: dict,
                 trained_tokens: int, world: int, device, peak_tflops: float | None) -> dict:
    """The step's record. Rollout figures come from `samples` (every rank holds all); the update's
    sums, the canary and the peaks are reduced over ranks.
    Throughput is per device: rollout tokens are everything generated on all ranks / rollout seconds /
    world size (GPUs, whatever the tensor parallel size: x --tensor-parallel for one engine); training
    tokens are the real (unpadded) tokens through forward + backward in the update; MFU is the
    update's model FLOPs (plan.flops) / update seconds / world / peak."""
    gaps = torch.cat(gaps) if gaps else torch.zeros(1)
    local = torch.tensor([stats["loss"], stats["kl"], stats["clip"], stats["flops"], stats["tokens"],
                          gaps.sum().item(), gaps.numel()], dtype=torch.float64)
    peak = torch.tensor([gaps.max().item(), P.peak_device_memory_gb() or 0.0, P.peak_rss_mb()], dtype=torch.float64)
    dist.all_reduce(local)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    loss, kl, clip, flops, train_tokens, gap_sum, gap_n = local.tolist()
    lengths = [len(c.token_ids) for _, c, *_ in samples]
    trained_tokens = max(trained_tokens, 1)  # loss, KL and clip fraction: means over all trained tokens
    seconds = {f"s_{k}": round(t[k] - prev, 3) for prev, k in zip(list(t.values()), list(t)[1:])}
    tflops = flops / seconds["s_update"] / world / 1e12
    n = len(samples)
    return {"reward": sum(s[2] for s in samples) / n, "accuracy": sum(s[3] for s in samples) / n,
            "format": sum(s[4] for s in samples) / n, "response_len": sum(lengths) / n, "response_len_max": max(lengths),
            "zero_var_groups": zero_var.float().mean().item(), "loss": loss / trained_tokens,
            "kl": kl / trained_tokens, "clip_frac": clip / trained_tokens, "grad_norm": max(norms),
            "canary_mean": gap_sum / gap_n, "canary_max": peak[0].item(),
            "rollout_tok_s": sum(lengths) / world / seconds["s_rollout"],
            "train_tok_s": train_tokens / world / seconds["s_update"], "tflops": tflops,
            "mfu": tflops / peak_tflops if peak_tflops else None,
            "peak_mem_gb": peak[1].item() if device.type == "cuda" else None, "peak_rss_mb": peak[2].item(), **seconds}


def check_memory(args) -> None:
    """plan.py's memory plan for these flags: printed and exit 0/2 with --plan, else exit 2 (with the
    plan) only when it does not fit."""
    world = args.world_size if args.plan else int(os.environ.get("WORLD_SIZE", 1))
    longest, shapes = args.max_prompt_tokens + args.max_response_tokens, P.shapes(args.model)
    P.check(shapes, P.Run(
        "grpo", world, micro_batch=min(args.micro_batch, max(1, args.mini_batch // world) * args.group_size),
        packed=not args.no_packing, tokens_per_forward=args.max_tokens_per_forward, seq_len=longest,
        logit_tokens=args.max_response_tokens, image_tokens=args.max_prompt_tokens,
        compute_bytes=getattr(torch, args.dtype).itemsize, checkpointing=not args.no_gradient_checkpointing,
        ref=None if args.kl_coef == 0 or args.lora_rank else "host" if args.ref_offload else "gpu", vllm=args.rollout == "vllm",
        tensor_parallel=args.tensor_parallel, gpu_memory_utilization=args.gpu_memory_utilization,
        vllm_bytes=4 if args.vllm_dtype == "float32" else 2, max_model_len=longest,
        step_sequences=-(-args.prompts_per_step * args.group_size // world),
        gpu_gib=P.gpu_gib(args.gpu_memory_gb), ranks_per_node=P.ranks_per_node(world),
        **P.training_run(args, shapes)), args.model, show=args.plan)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # ---- memory plan: before anything is loaded, a configuration that cannot fit stops (exit 2) ----
    if args.plan or args.gpu_memory_gb or torch.cuda.is_available():
        check_memory(args)
    # ---- checks before anything loads: the model name, --out, the data's columns and rows ----
    out = Path(args.out)
    path = M.resolve_model(args.model, flag="--model")
    D.check_out_dir(out, args.resume, args.overwrite)
    rows = D.load_rows(args.data, args.split)
    D.check_rows(rows, args.data)
    eval_rows = list(D.load_rows(args.eval_data, "test")) if args.eval_data else None
    if eval_rows is not None:
        D.check_rows(eval_rows, args.eval_data, D.ROW_COLUMNS + ("dataset_name",))
    rank, world, device = M.init_distributed()
    torch.manual_seed(args.seed)
    policy = ref = engine = optimizer = metrics = None
    try:
        if args.prompts_per_step % world or args.mini_batch % world:
            raise SystemExit(f"--prompts-per-step and --mini-batch must be multiples of the world size {world}")
        processor = M.load_processor(path)
        indices, prompt_lens = check_prompt_lengths(rows, processor, args, rank, world)
        steps_per_epoch = len(indices) // args.prompts_per_step
        if steps_per_epoch == 0:
            raise SystemExit(f"{len(indices)} usable rows, fewer than --prompts-per-step {args.prompts_per_step}")
        total_steps = args.max_steps or steps_per_epoch * args.epochs
        import transformers
        config = {**vars(args), "world_size": world, "torch": torch.__version__, "transformers": transformers.__version__}
        if rank == 0:
            if args.overwrite:
                D.clear_outputs(out)
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.json").write_text(json.dumps(config, indent=2))
            print(json.dumps(vars(args)), flush=True)
        C.check_shared_out(out)  # several nodes: --out must be one directory they all see (--resume needs it)
        M.print0(f"{len(indices)} rows, {steps_per_epoch} steps per epoch, {total_steps} steps, {world} ranks")

        # Policy: fp32 master weights, sharded; computes in --dtype. Reference: a frozen copy.
        # Only rank 0 reads the checkpoint files; the other ranks get their shards from it.
        compute_dtype = getattr(torch, args.dtype)
        # LoRA: a frozen base in the compute dtype with fp32 adapters; the reference is the policy with
        # its adapters off (ref is policy).
        policy = M.load_sharded_model(path, param_dtype=compute_dtype, cpu_offload=args.offload,
                                      gradient_checkpointing=not args.no_gradient_checkpointing, lora=L.from_args(args, path))
        if args.kl_coef > 0 and args.lora_rank:
            ref = policy
        elif args.kl_coef > 0:
            ref = M.load_sharded_model(path, param_dtype=compute_dtype, cpu_offload=args.ref_offload)
            ref.requires_grad_(False)
        M.print0("reference model: " + ("none (--kl-coef 0)" if ref is None else "the policy with its LoRA adapters off"
                                        if ref is policy else "frozen copy of the initial policy"))
        optimizer = M.adamw(policy, args.lr, args.betas, args.weight_decay)
        start = C.load_training_checkpoint(policy, optimizer, out / "checkpoints") if args.resume else 0
        per_rank = args.prompts_per_step // world
        shapes, peak_tflops = P.shapes(path), P.peak_tflops(device, args.peak_tflops)  # for MFU
        max_len = args.max_prompt_tokens + args.max_response_tokens
        # on CPU, a KV cache for one step's completions at full length in fp32 (at most 1 GiB)
        kv_cache_bytes = min(2 ** 30, P.kv_bytes_per_token(shapes, 4) * per_rank * args.group_size * max_len)
        engine = rollout.make_engine(args.rollout, path, processor, model=policy,
                                     **(dict(max_model_len=max_len, tensor_parallel_size=args.tensor_parallel,
                                             dtype=args.vllm_dtype, gpu_memory_utilization=args.gpu_memory_utilization,
                                             seed=args.seed, kv_cache_bytes=kv_cache_bytes)
                                        if args.rollout == "vllm" else {}))
        if start:
            engine.update_weights(policy)  # the engine loaded the initial weights from disk
        metrics = D.Metrics(out, start, args, rank, config)

        if eval_rows is not None and args.eval_every and start == 0:
            run_eval(engine, eval_rows, args, 0, metrics)  # the start point of the curve
        for step in range(start, total_steps):
            t = {"start": time.perf_counter()}
            # ---- rollout: this rank's prompts, n completions each, seeded per (step, prompt) ----
            chosen = step_prompts(args.seed, indices, step, args.prompts_per_step)[rank * per_rank:(rank + 1) * per_rank]
            first = step * args.prompts_per_step + rank * per_rank  # this rank's first prompt, numbered across the run
            seeds = rollout.request_seeds(args.seed, range(first, first + per_rank), args.group_size)
            outputs = engine.generate([rows[i] for i in chosen], n=args.group_size, temperature=args.temperature,
                                      top_p=args.top_p, max_new_tokens=args.max_response_tokens, seed=seeds)
            engine.sleep()
            t["rollout"] = time.perf_counter()

            # ---- reward: each rank scores its own; then every rank holds every sample (any rank may train any) ----
            samples = gather_samples([(i, c, R.reward(c.text, rows[i], lenient=args.lenient_reward),
                                       float(R.is_correct(c.text, rows[i])), float(R.format_ok(c.text)))
                                      for i, group in zip(chosen, outputs) for c in group], world)
            rewards = torch.tensor([s[2] for s in samples], dtype=torch.float32)  # (N,) prompt 0's n, prompt 1's, ...
            t["reward"] = time.perf_counter()

            # ---- advantages: per prompt group ----
            adv = group_advantages(rewards, args.group_size)                                   # (N,)
            zero_var = (rewards.view(-1, args.group_size).std(-1) == 0 if args.group_size > 1   # (G,) groups that
                        else torch.zeros(len(rewards), dtype=torch.bool))                       # carry no gradient
            keep = (~zero_var.repeat_interleave(args.group_size) if args.filter_zero_variance
                    else torch.ones(len(samples), dtype=torch.bool)).tolist()
            # ---- update batches: balanced over ranks by valid tokens (verl's balance_batch), then cut
            # into mini-batches, micro-batches and pieces of at most --max-tokens-per-forward tokens ----
            lengths = [prompt_lens[i] + len(c.token_ids) for i, c, *_ in samples]
            order = list(range(len(samples))) if args.no_balance else balanced_order(lengths, world)
            cut, update_tokens = cut_updates(order, lengths, [len(c.token_ids) for _, c, *_ in samples], keep, world,
                                             args.prompts_per_step // args.mini_batch, args.micro_batch,
                                             args.max_tokens_per_forward, padded=args.no_packing)
            forwards = cut[rank]  # [update][k]: Forward, or None to keep the collectives paired

            # ---- old and reference log-probs: the policy before this step's updates, the frozen ref ----
            # With one update per step the policy that the update's forward runs IS the old policy, so
            # its log-probs, detached, are the old ones (ratio exactly 1): no separate forward for them.
            on_policy = len(forwards) == 1
            mine = {samples[j][0] for fws in forwards for fw in fws if fw is not None for j in fw.idx}
            encoded = {i: M.encode_prompt(processor, rows[i]) for i in mine | {samples[0][0]}}
            # batches stay in host memory between their forwards (on a GPU only log-probs stay there)
            batch_of = {}  # (update, k) -> (batch, old log-probs or None, reference log-probs or None)
            with torch.no_grad():
                for u, fws in enumerate(forwards):
                    for k, fw in enumerate(fws):
                        host = make_batch(fw, samples, encoded, processor, policy, not args.no_packing)
                        b = M.to_device(host, device)
                        batch_of[u, k] = (host, None if on_policy else M.token_logprobs(policy, b, args.temperature),
                                          reference_logprobs(ref, policy, b, args.temperature))
            M.reshard(policy, ref)  # no backward follows these forwards: free the gathered roots
            # canary: the engine's log-probs must match the trainer's (a stale sync shows up here)
            gaps = [canary(samples, forwards[u][k].idx, old, b["completion_mask"].to(device))
                    for (u, k), (b, old, _) in batch_of.items() if forwards[u][k] is not None and old is not None]
            t["logprobs"] = time.perf_counter()

            # ---- updates: one optimizer step per mini-batch, one PPO epoch ----
            policy.train()
            for group in optimizer.param_groups:
                group["lr"] = args.lr * min(1.0, (step + 1) / args.warmup_steps) if args.warmup_steps else args.lr
            stats = dict.fromkeys(("loss", "kl", "clip", "flops", "tokens"), 0.0)
            norms = []
            for u, fws in enumerate(forwards):
                for k, fw in enumerate(fws):
                    b, old, ref_lp = batch_of.pop((u, k))
                    b = M.to_device(b, device)
                    sums, old = train_forward(policy, b, fw, old, ref_lp, adv, update_tokens[u], world, args)
                    if fw is None:
                        continue
                    if on_policy:  # the old log-probs were this forward's own: the canary checks them now
                        gaps.append(canary(samples, fw.idx, old, b["completion_mask"]))
                    for key, v in sums.items():
                        stats[key] += v
                    stats["flops"] += P.batch_flops(shapes, b)              # forward + backward, model FLOPs
                    stats["tokens"] += sum(lengths[i] for i in fw.idx)     # real tokens, padding not counted
                norms.append(M.clip_and_step(policy, optimizer, args.grad_clip, step + 1))
            t["update"] = time.perf_counter()

            # ---- weight sync: the engine samples the next step with the new weights ----
            b = old = ref_lp = encoded = None  # the step's last batch and prompts off the device before vLLM wakes
            if device.type == "cuda":
                torch.cuda.empty_cache()  # hand the update's cached blocks back: vLLM wakes into them (plan.py)
            engine.update_weights(policy)
            t["sync"] = time.perf_counter()

            # ---- log ----
            m = step_metrics(samples, zero_var, stats, gaps, norms, t, sum(update_tokens), world, device, peak_tflops)
            m["lr"] = optimizer.param_groups[0]["lr"]
            if rank == 0:
                log_step(m, step + 1, total_steps, metrics)
                if args.dump_every and (step + 1) % args.dump_every == 0:
                    dump_rollouts(out / "rollouts" / f"step_{step + 1:06d}.jsonl", rows, samples, lengths, order, world)
            if m["canary_mean"] > args.canary_max_gap and args.temperature == 1.0:
                raise SystemExit(f"step {step + 1}: vLLM and trainer log-probs differ by {m['canary_mean']:.3g} on "
                                 f"average (> --canary-max-gap {args.canary_max_gap}): the weight sync is stale")

            # ---- checkpoint ----
            if (args.save_every and (step + 1) % args.save_every == 0) or step + 1 == total_steps:
                save(policy, optimizer, processor, args, step + 1)

            # ---- eval: evaluate.py's greedy run and summary on --eval-data ----
            if eval_rows is not None and args.eval_every and (step + 1) % args.eval_every == 0:
                run_eval(engine, eval_rows, args, step + 1, metrics)
    except BaseException as e:
        M.exit_on_error(e)  # several ranks: print it and end the job now, not at the barrier below
        raise
    finally:
        if engine is not None:
            engine.close()
        if metrics is not None:
            metrics.close()
        del policy, ref, optimizer, engine
        M.cleanup_distributed()


if __name__ == "__main__":
    main(sys.argv[1:])
