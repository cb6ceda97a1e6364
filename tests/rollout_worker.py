"""Run by test_rollout_dist.py as `torchrun --nproc_per_node 2 tests/rollout_worker.py TINY_PATH OUT_DIR`.

Each rank: the FSDP2-sharded tiny policy, its own vLLM engine (external launcher, tensor parallel 1)
and its own rows (uneven shares, text-only on one rank). One AdamW step on a
log-likelihood loss changes every weight; after the sync each rank's engine must agree with the
sharded trainer, and the hf fallback (generate on the sharded model) with the engine.
"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import model  # noqa: E402
import rollout  # noqa: E402
from conftest import make_rows  # noqa: E402


def gaps(policy, processor, rows, outputs) -> list[float]:
    comps = [o[0] for o in outputs]
    batch = model.build_batch(processor, rows, [c.token_ids for c in comps])
    with torch.no_grad():
        logp = model.token_logprobs(policy, batch)
    return [(torch.tensor(c.logprobs) - logp[i][batch["completion_mask"][i]]).abs().max().item()
            for i, c in enumerate(comps)]


def main() -> None:
    tiny, out = sys.argv[1], Path(sys.argv[2])
    rank, world, _ = model.init_distributed()
    try:
        processor = model.load_processor(tiny)
        policy = model.load_model(tiny)
        model.shard_model(policy)
        engine = rollout.VLLMEngine(tiny, processor, max_model_len=2048, max_images=2, dtype="float32")
        # rank 0: the one- and two-image rows; rank 1: the text row alone, so its training batches
        # have no image while rank 0's do (the vision tower must still run in step on both ranks)
        rows = make_rows()[:2] if rank == 0 else make_rows()[2:]
        greedy = dict(n=1, temperature=0.0, max_new_tokens=16)
        before = engine.generate(rows, **greedy)
        gaps_before = gaps(policy, processor, rows, before)

        policy.train()
        opt = torch.optim.AdamW(policy.parameters(), lr=1e-2)
        batch = model.build_batch(processor, rows, [o[0].token_ids for o in before])
        (-model.token_logprobs(policy, batch).sum() / batch["completion_mask"].sum()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

        engine.update_weights(policy)
        after = engine.generate(rows, **greedy)
        hf = rollout.HFEngine(policy, processor).generate(rows, **greedy)
        result = {
            "rank": rank, "rows": len(rows),
            "gaps_before": gaps_before, "gaps_after": gaps(policy, processor, rows, after),
            "changed": [a[0].logprobs != b[0].logprobs for a, b in zip(after, before)],
            "hf_equal": [a[0].token_ids == h[0].token_ids for a, h in zip(after, hf)],
        }
        (out / f"rank{rank}.json").write_text(json.dumps(result))
        del policy, opt
        engine.close()
    finally:
        model.cleanup_distributed()


if __name__ == "__main__":
    main()
