"""The FSDP2 training step on GPUs: a randomly initialised Qwen2.5-VL with a recipe model's shapes at
the paper's lengths; tokens/s and model FLOPs utilisation, bf16, gradient checkpointing on or off.

    python benchmarks/train_step.py --model qwen2.5-vl-3b                          # one GPU
    python benchmarks/train_step.py --model qwen2.5-vl-3b --no-gradient-checkpointing --micro-batch 1   # H200
    torchrun --nproc_per_node 8 benchmarks/train_step.py --model qwen2.5-vl-7b
    python benchmarks/train_step.py --model tiny --dtype float32 --seq-len 256 --image-tokens 16 \\
        --completion 64 --micro-batch 2 --steps 2 --skip 1                          # a CPU smoke run

What runs is the trainers' own code: model.load_sharded_model (FSDP2, fp32 master weights, --dtype
compute), model.token_logprobs (the chunked log-prob head) over --micro-batches micro-batches of
--micro-batch sequences of --seq-len tokens (one image of --image-tokens merged tokens first, the
last --completion tokens through the log-prob head: a GRPO update of 2,048 prompt + 4,096 response
tokens by default; micro-batch 2 because one 80 GB GPU holds the 3B's fp32 weights, gradients and
AdamW state, 60 GB, beside the activations), a token-mean loss, backward, and model.clip_and_step
(fused AdamW). Weights and
tokens are random (speed depends on neither): rank 0 writes a checkpoint of the shapes in
plan.SHAPES once, under the cache, in bf16; nothing is downloaded.

MFU = plan.batch_flops (model FLOPs, PaLM's count: vision tower and language model, forward and
backward, no recomputation) / step seconds / GPUs / plan.peak_tflops (the bf16 dense peak). The
first --skip steps (start-up, allocator warm-up) are left out of the means.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import model as M  # noqa: E402
import plan as P  # noqa: E402


def random_checkpoint(name: str) -> str:
    """A checkpoint with `name`'s shapes and random weights (rank 0 writes it once); a tiny model as it is."""
    import torch.distributed as dist

    if name in M.TINY:
        return M.resolve_model(name)
    hub_id = M.MODEL_ALIASES.get(name, name)
    if hub_id not in P.SHAPES:
        raise SystemExit(f"--model: one of {', '.join([*M.TINY, *M.MODEL_ALIASES])} (shapes from plan.SHAPES)")
    path = M.CACHE_DIR / ("random-" + hub_id.split("/")[-1])
    if dist.get_rank() == 0 and not (path / "config.json").exists():
        config, model_class = P.builtin_config(hub_id)
        print(f"writing a random {hub_id}-shaped checkpoint to {path} (once)", flush=True)
        model_class(config).to(torch.bfloat16).save_pretrained(path)
    dist.barrier()
    return str(path)


def random_batch(config, args, generator: torch.Generator) -> dict:
    """--micro-batch sequences: vision start, the image's tokens, vision end, random text; an image
    of 2a x 2b patches per sequence (a x b = --image-tokens merged tokens); the last --completion
    tokens are the ones whose log-probs are trained."""
    B, T, n = args.micro_batch, args.seq_len, args.image_tokens
    a = next(d for d in range(int(n ** 0.5), 0, -1) if n % d == 0)
    grid = torch.tensor([[1, 2 * a, 2 * (n // a)]] * B)
    vision = config.vision_config
    patch = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
    ids = torch.randint(0, 151643, (B, T), generator=generator)
    ids[:, 0], ids[:, n + 1] = config.vision_start_token_id, config.vision_end_token_id
    ids[:, 1:n + 1] = config.image_token_id
    mm = torch.zeros(B, T, dtype=torch.long)
    mm[:, 1:n + 1] = 1
    completion = torch.zeros(B, T, dtype=torch.bool)
    completion[:, T - args.completion:] = True
    return {"input_ids": ids, "attention_mask": torch.ones(B, T, dtype=torch.long), "mm_token_type_ids": mm,
            "pixel_values": torch.randn(B * 4 * n, patch, generator=generator), "image_grid_thw": grid,
            "completion_mask": completion}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen2.5-vl-3b", help="tiny, tiny-qwen3-vl or a recipe alias (random weights of its shapes)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="compute dtype")
    p.add_argument("--seq-len", type=int, default=6144, help="tokens per sequence (2048 prompt + 4096 response)")
    p.add_argument("--image-tokens", type=int, default=1024, help="merged image tokens per sequence (4 patches each)")
    p.add_argument("--completion", type=int, default=4096, help="tokens per sequence through the log-prob head")
    p.add_argument("--micro-batch", type=int, default=2, help="sequences per forward/backward")
    p.add_argument("--micro-batches", type=int, default=2, help="micro-batches per optimizer step")
    p.add_argument("--no-gradient-checkpointing", action="store_true")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--skip", type=int, default=2, help="first steps left out of the means")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's peak (default: plan.PEAK_TFLOPS)")
    p.add_argument("--gpu-memory-gb", type=float, default=None, help="plan for GPUs of this size (default: this one's)")
    p.add_argument("--json", default=None, help="also write the result here")
    args = p.parse_args()
    if not 0 < args.completion < args.seq_len - args.image_tokens - 1 or args.skip >= args.steps:
        raise SystemExit("need 0 < --completion < --seq-len - --image-tokens - 1 and --skip < --steps")

    if torch.cuda.is_available() or args.gpu_memory_gb:  # the memory planner first, like sft.py (exit 2)
        world = int(os.environ.get("WORLD_SIZE", 1))
        P.check(P.shapes(args.model), P.Run(
            "sft", world, micro_batch=args.micro_batch, seq_len=args.seq_len, logit_tokens=args.completion,
            image_tokens=args.image_tokens, compute_bytes=getattr(torch, args.dtype).itemsize,
            checkpointing=not args.no_gradient_checkpointing, gpu_gib=P.gpu_gib(args.gpu_memory_gb),
            ranks_per_node=P.ranks_per_node(world)), args.model, show=False)
    rank, world, device = M.init_distributed()
    try:
        path = random_checkpoint(args.model)
        shapes, peak = P.shapes(path), P.peak_tflops(device, args.peak_tflops)
        policy = M.load_sharded_model(path, param_dtype=getattr(torch, args.dtype),
                                      gradient_checkpointing=not args.no_gradient_checkpointing).train()
        optimizer = M.adamw(policy, 1e-6, (0.9, 0.999), 0.01)
        g = torch.Generator().manual_seed(rank)
        batches = [random_batch(policy.config, args, g) for _ in range(args.micro_batches)]
        flops = sum(P.batch_flops(shapes, b) for b in batches)        # per rank, per step
        tokens = sum(int(b["attention_mask"].sum()) for b in batches)
        batches = [M.to_device(b, device) for b in batches]
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        times = []
        for step in range(args.steps):
            sync()
            start = time.perf_counter()
            for b in batches:
                logp = M.token_logprobs(policy, b)
                mask = b["completion_mask"]
                (-(logp * mask).sum() / mask.sum() / len(batches)).backward()
            M.clip_and_step(policy, optimizer, 1.0, step + 1)
            sync()
            times.append(time.perf_counter() - start)
            M.print0(f"step {step + 1}/{args.steps}: {times[-1]:.2f} s, {tokens / times[-1]:,.0f} tokens/s per GPU, "
                     f"{flops / times[-1] / 1e12:.3g} TFLOP/s per GPU")
        s = sum(times[args.skip:]) / len(times[args.skip:])
        result = {**vars(args), "world": world, "device": torch.cuda.get_device_name(device) if device.type == "cuda"
                  else "cpu", "s_per_step": s, "tokens_per_s_per_gpu": tokens / s, "tflops_per_gpu": flops / s / 1e12,
                  "mfu": flops / s / 1e12 / peak if peak else None, "peak_mem_gb": P.peak_device_memory_gb(),
                  "peak_rss_mb": P.peak_rss_mb()}
        M.print0(json.dumps(result))
        mfu = f"{result['mfu']:.1%}" if peak else "- (no peak for this device)"
        M.print0(f"\n| model | GPUs | device | dtype | grad. ckpt | micro-batch x seq | s/step | tokens/s/GPU | "
                 f"TFLOP/s/GPU | MFU | peak mem GB |\n|---|---|---|---|---|---|---|---|---|---|---|\n"
                 f"| {args.model} | {world} | {result['device']} | {args.dtype} | "
                 f"{'off' if args.no_gradient_checkpointing else 'on'} | {args.micro_batches} x {args.micro_batch} x "
                 f"{args.seq_len} | {s:.2f} | {result['tokens_per_s_per_gpu']:,.0f} | {result['tflops_per_gpu']:.3g} | "
                 f"{mfu} | {result['peak_mem_gb'] or 0:.1f} |")
        if args.json and rank == 0:
            Path(args.json).write_text(json.dumps(result, indent=2))
        del policy, optimizer
    finally:
        M.cleanup_distributed()


if __name__ == "__main__":
    main()
