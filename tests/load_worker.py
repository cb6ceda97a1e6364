"""Run by test_fsdp.py: `python tests/load_worker.py build DIR` writes a random Qwen2.5-VL checkpoint of
~520 MB (fp32, tied embeddings like the 3B), large enough that loading it dominates a rank's memory;
`torchrun --nproc_per_node 2 tests/load_worker.py load DIR OUT` loads it with model.load_sharded_model
and writes, per rank, how much its peak resident memory grew while loading, and (rank 0) whether
the gathered weights and each rank's buffers equal a plain load_model and the embeddings stay tied.
"""
import json
import resource
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import model  # noqa: E402

# 8 layers of width 1024 (32 heads of 32, the tiny model's mrope sections) and a small vocabulary:
# ~134M parameters, the largest tensor 16 MB, so a rank that holds only its shards stays far from
# the full model's size.
TEXT = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=8, num_attention_heads=32,
            num_key_value_heads=32, vocab_size=2048, pad_token_id=0)


def build(path: Path) -> None:
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    config = AutoConfig.from_pretrained(model.resolve_model("tiny"))
    for key, value in TEXT.items():
        setattr(config.text_config, key, value)
    config.text_config.layer_types = ["full_attention"] * TEXT["num_hidden_layers"]
    config.vision_config.out_hidden_size = TEXT["hidden_size"]
    config.tie_word_embeddings = config.text_config.tie_word_embeddings = True
    torch.manual_seed(0)
    m = Qwen2_5_VLForConditionalGeneration(config)
    assert m.lm_head.weight is m.model.language_model.embed_tokens.weight
    m.save_pretrained(path)


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def load(path: str, out: Path) -> None:
    rank, world, _ = model.init_distributed()
    try:
        model.load_model(path, device="meta")  # imports and builds everything once, at no memory cost
        before = peak_mb()
        m = model.load_sharded_model(path)
        grew = peak_mb() - before
        tied = m.lm_head.weight is m.model.language_model.embed_tokens.weight
        loaded = {k: v.clone() for k, v in model.full_state_items(m)}  # gathered, on every rank
        everyone = [None] * world
        torch.distributed.all_gather_object(everyone, (grew, tied, {k: v.clone() for k, v in m.named_buffers()}))
        if rank == 0:
            plain = model.load_model(path)
            init, plain_buffers = plain.state_dict(), dict(plain.named_buffers())
            result = {
                "model_mb": sum(v.numel() * v.element_size() for v in plain.parameters()) / 2**20,
                "grew_mb": [g for g, _, _ in everyone], "tied": [t for _, t, _ in everyone],
                "keys_equal": set(loaded) == set(init), "tensors": len(init),
                "identical": sum(torch.equal(loaded[k], init[k]) for k in init if k in loaded),
                "buffers_identical": [set(b) == set(plain_buffers) and all(torch.equal(b[k], plain_buffers[k])
                                                                          for k in plain_buffers)
                                      for _, _, b in everyone],
            }
            (out / "load.json").write_text(json.dumps(result))
    finally:
        model.cleanup_distributed()


if __name__ == "__main__":
    if sys.argv[1] == "build":
        build(Path(sys.argv[2]))
    else:
        load(sys.argv[2], Path(sys.argv[3]))
