"""Run by test_fsdp.py as `torchrun --nproc_per_node 2 tests/fsdp_worker.py TINY_PATH OUT_DIR`.

Every rank loads the FSDP2-sharded tiny model through model.load_sharded_model (rank 0 reads the
files, rank 1 builds the model on the meta device and gets its shards from rank 0), then trains it
(gradient checkpointing on) for 3 AdamW steps on its own micro-batch, with the loss built on
model.token_logprobs. Rank 0 then trains an unsharded copy on all ranks' micro-batches (loss = mean
over ranks, which is what FSDP's gradient averaging computes) and compares: the weights and every
rank's buffers right after loading with a plain load_model, the gathered trained weights, and the
checkpoint that save_checkpoint wrote.
"""
import json
import sys
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import checkpoints  # noqa: E402
import model  # noqa: E402
from conftest import make_rows  # noqa: E402

STEPS, LR = 3, 1e-3


def micro_batch(processor, step: int, rank: int) -> dict:
    rows = make_rows()
    picked = [rows[(step + rank) % 3], rows[(step + rank + 1) % 3]]
    g = torch.Generator().manual_seed(100 * step + rank)
    return model.build_batch(processor, picked, [torch.randint(0, 151643, (n,), generator=g).tolist() for n in (6, 11)])


def nll(m, batch: dict) -> torch.Tensor:
    # One log-prob chunk: on CPU, MKL's small-M (<= 16 rows) matmuls round differently depending on the
    # memory alignment of the weight, and FSDP2's gathered parameters sit at other offsets than a
    # plain model's. Values then differ in the last bit, not beyond; test_model covers chunking.
    return -model.token_logprobs(m, batch).sum() / batch["completion_mask"].sum()


def train(m, batches: list[list[dict]]) -> list[float]:
    opt = model.adamw(m, LR, (0.9, 0.999), 0.01)  # the stages' optimizer (fused)
    norms = []
    for step_batches in batches:
        for b in step_batches:
            (nll(m, b) / len(step_batches)).backward()
        norm = torch.nn.utils.clip_grad_norm_(m.parameters(), max_norm=1e9)  # exercised, never clips
        norms.append(float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm))
        opt.step()
        opt.zero_grad(set_to_none=True)
    return norms


def main() -> None:
    tiny, out = sys.argv[1], Path(sys.argv[2])
    rank, world, _ = model.init_distributed()
    try:
        processor = model.load_processor(tiny)
        policy = model.load_sharded_model(tiny, gradient_checkpointing=True).train()  # rank 1: meta, then rank 0's
        loaded = {k: v.clone() for k, v in model.full_state_items(policy)}  # gathered, on every rank
        buffers = [None] * world  # every rank's own buffers, non-persistent ones (rotary inv_freq) included
        torch.distributed.all_gather_object(buffers, ({k: v.clone() for k, v in policy.named_buffers()},
                                                      policy.generation_config.to_dict()))
        norms = train(policy, [[micro_batch(processor, s, rank)] for s in range(STEPS)])
        with torch.no_grad():  # a forward without backward leaves the root gathered; model.reshard frees it
            model.token_logprobs(policy, micro_batch(processor, 0, rank))
        gathered_after_no_grad = not isinstance(policy.lm_head.weight, DTensor)
        model.reshard(policy)
        sharded_after_reshard = isinstance(policy.lm_head.weight, DTensor)
        sharded = {k: v.clone() for k, v in model.full_state_items(policy)}
        checkpoints.save_checkpoint(policy, processor, out / "ckpt", {"step": STEPS}, dtype=torch.float32)
        del policy
        if rank == 0:
            ref = model.load_model(tiny).train()
            ref_norms = train(ref, [[micro_batch(processor, s, r) for r in range(world)] for s in range(STEPS)])
            plain = model.load_model(tiny)  # what every rank held before sharding, before this change
            init, plain_buffers = plain.state_dict(), dict(plain.named_buffers())
            saved = model.load_model(str(out / "ckpt")).state_dict()
            ref_sd = ref.state_dict()
            result = {
                "load_identical": sum(torch.equal(loaded[k], init[k]) for k in init if k in loaded),
                "load_keys_equal": set(loaded) == set(init),
                "buffers": len(plain_buffers),
                "buffers_identical": [sum(torch.equal(b[k], plain_buffers[k]) for k in plain_buffers)
                                      if set(b) == set(plain_buffers) else -1 for b, _ in buffers],
                "generation_config_equal": [g == plain.generation_config.to_dict() for _, g in buffers],
                "gathered_after_no_grad": gathered_after_no_grad, "sharded_after_reshard": sharded_after_reshard,
                "world": world, "norms": norms, "ref_norms": ref_norms,
                "keys_equal": set(sharded) == set(ref_sd) == set(saved),
                "identical": sum(torch.equal(sharded[k], ref_sd[k]) for k in ref_sd),
                "saved_identical": sum(torch.equal(saved[k], ref_sd[k]) for k in ref_sd),
                "moved": sum(not torch.equal(ref_sd[k], init[k]) for k in ref_sd),
                "tensors": len(ref_sd),
                "max_diff": max((sharded[k] - ref_sd[k]).abs().max().item() for k in ref_sd),
            }
            (out / "result.json").write_text(json.dumps(result))
    finally:
        model.cleanup_distributed()


if __name__ == "__main__":
    main()
