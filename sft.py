"""Supervised fine-tuning on reasoning traces: FSDP2, bf16 compute with fp32 master weights.

The target of a row is `<think> {reasoning} </think>\\n<answer> {label} </answer><|im_end|>\\n` after
the recipe's prompt (model.build_messages); rows of the released `*-tokenized` datasets carry the whole
chat pre-rendered in a `text` column instead, split at the last assistant header. The loss is on
the target tokens only (the closing <|im_end|> and the chat template's newline after it included:
the official SFT collator labelled everything after the assistant header), summed, and divided by
the number of target tokens of the whole optimizer step on all ranks: every token weighs the same
whatever the micro-batch size, accumulation or world size (SPEC.md section 8). Text-only and image
rows mix freely.

Defaults are the recipe (SPEC.md section 6): lr 1e-5 cosine with 5% warmup, AdamW (0.9, 0.95,
wd 1e-4), grad clip 1.0, global batch 16, max length 32768, 5 epochs (the released models are
epoch 3), no packing.

    python sft.py --model tiny --data DATA --global-batch 4 --micro-batch 2 --epochs 3      # CPU
    torchrun --nproc_per_node 8 sft.py --model qwen2.5-vl-7b --data UCSC-VLAA/MedVLThinker-pmc_vqa-gpt_4o_reasoning-tokenized

Rows with no reasoning trace (reasoning None, as `prepare` and `filter` leave it before `distill`)
and no `text` are skipped with a count. Checkpoints (every epoch, or --save-every steps) are Hugging
Face directories plus sharded optimizer state; --resume continues from the last complete one, with
the same data order (a function of seed and epoch) and learning-rate schedule (a function of the
step). A non-empty --out is refused unless --resume or --overwrite.
"""

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import checkpoints as C
import data as D
import lora as L
import model as M
import plan as P

ASSISTANT_HEADER = "<|im_start|>assistant\n"
END = "<|im_end|>\n"  # how the chat template closes the assistant turn; the official loss covered both tokens


# ---- config ----

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="qwen2.5-vl-3b", help="alias (qwen2.5-vl-3b|7b|32b, tiny), hub id or local checkpoint")
    g.add_argument("--data", help="rows with `reasoning` (or a pre-rendered `text`): hub name, save_to_disk dir, parquet/jsonl")
    g.add_argument("--split", default="train", help="split of a hub dataset or DatasetDict")
    g.add_argument("--max-length", type=int, default=32768, help="prompt + target tokens; longer rows are an error")
    g.add_argument("--skip-long", action="store_true", help="drop over-long rows (with a count) instead of stopping")
    g = p.add_argument_group("optimisation")
    g.add_argument("--global-batch", type=int, default=16, help="sequences per optimizer step, all ranks together")
    g.add_argument("--micro-batch", type=int, default=1, help="sequences per forward/backward on one rank")
    g.add_argument("--lr", type=float, default=1e-5, help="peak learning rate")
    g.add_argument("--warmup-ratio", type=float, default=0.05, help="linear warmup share of all steps, then cosine to 0")
    g.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.95), help="AdamW betas")
    g.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay")
    g.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm")
    g.add_argument("--epochs", type=int, default=5, help="passes over the data")
    g.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: epochs decide; the schedule still spans all epochs)")
    g.add_argument("--seed", type=int, default=42, help="data order")
    g.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                   help="compute dtype (FSDP2 mixed precision; master weights stay fp32). Default: bfloat16 on GPU "
                        "and for --plan, float32 on CPU")
    g.add_argument("--no-gradient-checkpointing", action="store_true", help="keep activations instead of recomputing them")
    g.add_argument("--offload", action="store_true", help="keep the fp32 shards, gradients and AdamW state in host "
                                                          "memory (FSDP2 CPU offload: one GPU, slower steps)")
    L.add_args(p)
    D.add_report_args(p)
    g = p.add_argument_group("output")
    g.add_argument("--out", default="runs/sft", help="output directory")
    g.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: at the end of every epoch)")
    g.add_argument("--keep-last", type=int, default=0, help="keep only the last K checkpoints (0: all)")
    g.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint in --out")
    g.add_argument("--overwrite", action="store_true", help="start afresh in a non-empty --out (its old run's files are deleted)")
    g = p.add_argument_group("memory plan and telemetry")
    g.add_argument("--plan", action="store_true", help="print the expected memory per GPU and per node, exit 0 if it fits, 2 if not")
    g.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", 1)),
                   help="GPUs that --plan plans for (default: torchrun's WORLD_SIZE, else 1)")
    g.add_argument("--gpu-memory-gb", type=float, default=None,
                   help="GiB per GPU to plan for (default: this GPU's, else 80); when given, a CPU run is checked too")
    g.add_argument("--image-tokens", type=int, default=2048,
                   help="image tokens per sequence that --plan assumes (the images of one row; 1024 px is ~1369)")
    g.add_argument("--peak-tflops", type=float, default=None,
                   help="device peak TFLOP/s for MFU (default: bf16 dense peak of a known GPU; none on CPU: MFU is null)")
    args = p.parse_args(argv)
    if not args.plan and not args.data:
        p.error("--data is required")
    D.check_flags(p, args, {"max_length": 1, "global_batch": 1, "micro_batch": 1, "lr": 0, "warmup_ratio": 0,
                            "weight_decay": 0, "epochs": 1, "max_steps": 0, "save_every": 0, "keep_last": 0},
                  above={"grad_clip": 0})
    if args.warmup_ratio > 1:
        p.error(f"--warmup-ratio must be at most 1, got {args.warmup_ratio}")
    if args.resume and args.overwrite:
        p.error("--resume continues the run in --out, --overwrite replaces it: pass one")
    args.dtype = args.dtype or ("bfloat16" if torch.cuda.is_available() or args.plan else "float32")
    L.check_args(p, args)
    D.check_report_args(p, args)
    return args


# ---- data ----

def has_trace(reasoning, text) -> bool:
    """A row trains only with a reasoning trace or a pre-rendered chat: `prepare` and `filter` write
    reasoning None (distill fills it in), which would otherwise train "<think> None </think>"."""
    return bool(reasoning is not None and str(reasoning).strip()) or bool(text)


def rows_with_traces(rows) -> list[int]:
    """Positions of the rows that has_trace (reads two columns, not the images)."""
    names = rows.column_names
    reasoning = rows["reasoning"] if "reasoning" in names else [None] * len(rows)
    text = rows["text"] if "text" in names else [None] * len(rows)
    return [i for i, (r, t) in enumerate(zip(reasoning, text)) if has_trace(r, t)]


def encode(processor, row: dict) -> tuple[dict, list[int]]:
    """(prompt encoding, target token ids) for a row with `reasoning`, or with a pre-rendered `text`."""
    tok = processor.tokenizer
    if not str(row.get("reasoning") or "").strip() and row.get("text"):  # no trace: the pre-rendered chat
        head, sep, target = row["text"].rpartition(ASSISTANT_HEADER)
        if not sep:
            raise ValueError(f"row {row.get('dataset_index')}: `text` has no assistant turn")
        enc = processor(text=[head + sep], images=M.row_images(row) or None, return_tensors="pt")
        prompt = {"input_ids": enc["input_ids"][0], "mm_token_type_ids": enc["mm_token_type_ids"][0],
                  "pixel_values": enc.get("pixel_values"), "image_grid_thw": enc.get("image_grid_thw")}
        target = target[:target.index("<|im_end|>")] if "<|im_end|>" in target else target
        return prompt, tok(target + END)["input_ids"]
    return M.encode_prompt(processor, row), tok(M.sft_target(row) + END)["input_ids"]


def epoch_order(seed: int, epoch: int, n: int) -> list[int]:
    order = list(range(n))
    random.Random(seed * 1000 + epoch).shuffle(order)
    return order


def lr_at(step: int, total: int, args) -> float:
    """Linear warmup over warmup_ratio * total steps, then cosine decay to 0 at `total`."""
    warmup = math.ceil(args.warmup_ratio * total)
    if step < warmup:
        return args.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return args.lr * 0.5 * (1 + math.cos(math.pi * progress))


# ---- the loop ----

def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # ---- memory plan: before anything is loaded, a configuration that cannot fit stops (exit 2) ----
    if args.plan or args.gpu_memory_gb or torch.cuda.is_available():
        world = args.world_size if args.plan else int(os.environ.get("WORLD_SIZE", 1))
        shapes = P.shapes(args.model)
        P.check(shapes, P.Run(
            "sft", world, micro_batch=args.micro_batch, seq_len=args.max_length, logit_tokens=args.max_length,
            image_tokens=min(args.image_tokens, args.max_length), compute_bytes=getattr(torch, args.dtype).itemsize,
            checkpointing=not args.no_gradient_checkpointing, gpu_gib=P.gpu_gib(args.gpu_memory_gb),
            ranks_per_node=P.ranks_per_node(world), **P.training_run(args, shapes)), args.model, show=args.plan)
    # ---- checks before anything loads: the model name, --out, the data's columns and rows ----
    out = Path(args.out)
    path = M.resolve_model(args.model, flag="--model")
    D.check_out_dir(out, args.resume, args.overwrite)
    rows = D.load_rows(args.data, args.split)
    if "text" in rows.column_names:  # the released *-tokenized sets: the whole chat pre-rendered
        D.check_rows(rows, args.data, ("text",))
    else:
        D.check_rows(rows, args.data, D.ROW_COLUMNS + ("reasoning",))
    traced = rows_with_traces(rows)
    if len(traced) < args.global_batch:
        raise SystemExit(f"{args.data}: {len(traced)} of {len(rows)} rows have a reasoning trace, fewer than "
                         f"--global-batch {args.global_batch} (rows from prepare or filter get theirs from curate.py distill)")
    rank, world, device = M.init_distributed()
    torch.manual_seed(args.seed)
    policy = optimizer = metrics = None
    try:
        if len(traced) < len(rows):
            M.print0(f"skipping {len(rows) - len(traced)} of {len(rows)} rows with no reasoning trace")
        if args.global_batch % (world * args.micro_batch):
            raise SystemExit(f"--global-batch {args.global_batch} is not a multiple of world size x --micro-batch")
        accum = args.global_batch // (world * args.micro_batch)
        processor = M.load_processor(path)

        # lengths checked before training starts (each rank encodes a share; encodings are not kept:
        # with images they are large, and each step encodes its own rows again)
        mine = {}
        for i in tqdm(traced[rank::world], disable=rank != 0, desc="checking lengths"):
            prompt, target = encode(processor, rows[i])
            mine[i] = len(prompt["input_ids"]) + len(target)
        lengths = [None] * world
        dist.all_gather_object(lengths, mine)
        lengths = {i: n for part in lengths for i, n in part.items()}
        too_long = sorted(i for i, n in lengths.items() if n > args.max_length)
        if too_long and not args.skip_long:
            raise SystemExit(f"{len(too_long)} rows exceed --max-length {args.max_length}: " + "; ".join(
                f"row {i} ({lengths[i]} tokens)" for i in too_long[:10]) + ". Raise the limit or pass --skip-long.")
        if too_long:
            M.print0(f"skipping {len(too_long)} rows over {args.max_length} tokens")
        usable = [i for i in traced if lengths[i] <= args.max_length]
        steps_per_epoch = len(usable) // args.global_batch
        total = steps_per_epoch * args.epochs
        if steps_per_epoch == 0:
            raise SystemExit(f"{len(usable)} usable rows, fewer than --global-batch {args.global_batch}")
        if rank == 0:
            if args.overwrite:
                D.clear_outputs(out)
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.json").write_text(json.dumps({**vars(args), "world_size": world}, indent=2))
            print(json.dumps(vars(args)), flush=True)
        C.check_shared_out(out)  # several nodes: --out must be one directory they all see (--resume needs it)
        M.print0(f"{len(usable)} rows, {steps_per_epoch} steps per epoch x {args.epochs} epochs, "
                 f"{world} ranks x {args.micro_batch} sequences x {accum} accumulation")

        policy = M.load_sharded_model(path, param_dtype=getattr(torch, args.dtype), cpu_offload=args.offload,
                                      gradient_checkpointing=not args.no_gradient_checkpointing,
                                      lora=L.from_args(args, path)).train()
        optimizer = M.adamw(policy, args.lr, args.betas, args.weight_decay)
        start = C.load_training_checkpoint(policy, optimizer, out / "checkpoints") if args.resume else 0
        metrics = D.Metrics(out, start, args, rank, {**vars(args), "world_size": world})
        pad = processor.tokenizer.pad_token_id
        last = min(total, args.max_steps or total)
        shapes, peak_tflops = P.shapes(path), P.peak_tflops(device, args.peak_tflops)  # for MFU

        for step in range(start, last):
            t0 = time.perf_counter()
            epoch, k = divmod(step, steps_per_epoch)
            order = [usable[i] for i in epoch_order(args.seed, epoch, len(usable))]
            batch_rows = order[k * args.global_batch:(k + 1) * args.global_batch]
            # micro-batch j of the step goes to rank j % world, so one rank with accumulation sees the
            # micro-batches in the same order as the ranks of a larger world together
            micro = [batch_rows[j * args.micro_batch:(j + 1) * args.micro_batch] for j in range(world * accum)][rank::world]
            encoded = [[encode(processor, rows[i]) for i in idx] for idx in micro]
            batches = [M.to_device(M.collate([p for p, _ in e], [t for _, t in e], pad), device) for e in encoded]
            tokens = torch.tensor(float(sum(b["completion_mask"].sum() for b in batches)), device=device)
            dist.all_reduce(tokens)  # target tokens of the whole optimizer step on all ranks
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total, args)
            loss_sum = 0.0
            for b in batches:
                logp = M.token_logprobs(policy, b)                                     # (B, T)
                nll = -(logp * b["completion_mask"]).sum()                            # summed over target tokens
                (nll * world / tokens).backward()  # FSDP averages over ranks: x world gives the global mean
                loss_sum += nll.item()
            norm = M.clip_and_step(policy, optimizer, args.grad_clip, step + 1)

            # ---- log: per device, the real (unpadded) tokens through forward + backward and their model
            # FLOPs (plan.flops) over the whole step's seconds (encoding the rows included) ----
            flops = sum(P.batch_flops(shapes, b) for b in batches)
            stats = torch.tensor([loss_sum, flops, sum(float(b["attention_mask"].sum()) for b in batches)],
                                 dtype=torch.float64)
            peak = torch.tensor([P.peak_device_memory_gb() or 0.0, P.peak_rss_mb()], dtype=torch.float64)
            dist.all_reduce(stats)
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
            seconds = time.perf_counter() - t0
            tflops = stats[1].item() / seconds / world / 1e12
            m = {"step": step + 1, "epoch": epoch + 1, "loss": stats[0].item() / tokens.item(), "lr": optimizer.param_groups[0]["lr"],
                 "grad_norm": norm, "train_tok_s": stats[2].item() / seconds / world, "tflops": tflops,
                 "mfu": tflops / peak_tflops if peak_tflops else None,
                 "peak_mem_gb": peak[0].item() if device.type == "cuda" else None, "peak_rss_mb": peak[1].item(),
                 "s_step": round(seconds, 3)}
            if rank == 0:
                print(f"step {m['step']}/{total} epoch {m['epoch']} loss {m['loss']:.4f} lr {m['lr']:.3g} "
                      f"gnorm {norm:.3f} | " + P.perf_line(m), flush=True)
                metrics.log(m)

            # ---- checkpoint: every --save-every steps, or at each epoch's end, and at the last step ----
            end_of_epoch = (step + 1) % steps_per_epoch == 0
            if (args.save_every and (step + 1) % args.save_every == 0) or (not args.save_every and end_of_epoch) \
                    or step + 1 == last:
                C.save_training_checkpoint(policy, optimizer, processor, out / "checkpoints" / f"step_{step + 1:06d}",
                                           {"step": step + 1, "epoch": (step + 1) / steps_per_epoch, "config": vars(args)},
                                           dtype=getattr(torch, args.dtype), keep_last=args.keep_last)
    except BaseException as e:
        M.exit_on_error(e)  # several ranks: print it and end the job now, not at the barrier below
        raise
    finally:
        if metrics is not None:
            metrics.close()
        del policy, optimizer
        M.cleanup_distributed()


if __name__ == "__main__":
    main(sys.argv[1:])
