"""LoRA (lora.py): adapters on a frozen base, the reference as adapters-off, merged checkpoints that
plain transformers loads, adapters that peft loads. GRPO with LoRA on two ranks with vLLM is in
test_demo (it must learn); SFT with LoRA (1 vs 2 ranks, kill and resume, overfitting) in test_sft."""
import json

import pytest
import torch
from safetensors.torch import load_file

import checkpoints
import lora
import model
from conftest import make_toy_rows

def logprobs(m, batch) -> torch.Tensor:
    with torch.no_grad():
        return model.token_logprobs(m, batch)


@pytest.mark.parametrize("family", ["tiny", "tiny-qwen3-vl"])
def test_adapters_train_alone_and_leave_as_a_merged_model_and_a_peft_adapter(family, tmp_path):
    from peft import PeftModel

    tiny_path = model.resolve_model(family)
    processor = model.load_processor(tiny_path)
    rank, world, _ = model.init_distributed()
    policy = optimizer = None
    try:
        batch = model.build_batch(processor, make_toy_rows(3), [[100, 101, 102], [200, 201], [300] * 5])
        base = model.load_model(tiny_path)
        initial = logprobs(base, batch)
        torch.manual_seed(0)
        policy = model.load_sharded_model(tiny_path, param_dtype=torch.float32, gradient_checkpointing=True,
                                          lora=lora.lora_config(8, 16, lora.TARGETS, base=tiny_path)).train()
        assert torch.equal(logprobs(policy, batch), initial)  # lora_B starts at zero
        trained = {n for n, p in policy.named_parameters() if p.requires_grad}
        assert trained and all(".lora_A." in n or ".lora_B." in n for n in trained)
        assert len(trained) == 2 * 7 * 2  # A and B of q, k, v, o, gate, up, down in each of the 2 decoder layers
        optimizer = model.adamw(policy, 1e-2, (0.9, 0.999), 0.0)
        for step in range(2):
            (-(model.token_logprobs(policy, batch) * batch["completion_mask"]).sum()).backward()
            model.clip_and_step(policy, optimizer, 1.0, step + 1)
        assert sum(len(s) for s in optimizer.state.values()) == 3 * len(trained)  # step, m, v: adapters only
        after = logprobs(policy, batch)
        assert (after - initial).abs().max() > 0.1
        with lora.adapters_off(policy):  # GRPO's reference: exactly the initial model, no second copy
            assert torch.equal(logprobs(policy, batch), initial)
        assert torch.equal(logprobs(policy, batch), after)  # and the adapters are back on

        ckpt = tmp_path / "ckpt"
        checkpoints.save_checkpoint(policy, processor, ckpt, {"step": 2}, dtype=torch.float32)
        assert checkpoints.checkpoint_problem(ckpt) is None and (ckpt / "adapter" / "adapter_model.safetensors").is_file()
        merged = model.load_model(str(ckpt))  # plain transformers, no peft
        assert (logprobs(merged, batch) - after).abs().max() < 1e-5
        saved, original = load_file(str(ckpt / "model.safetensors")), load_file(f"{tiny_path}/model.safetensors")
        assert saved.keys() == original.keys()
        changed = [k for k in saved if not torch.equal(saved[k], original[k])]
        assert len(changed) == 2 * 7 and all(k.endswith("_proj.weight") for k in changed), changed
        # only the adapted blocks (whole: vLLM fuses q/k/v and gate/up) go to the rollout engine
        synced = dict(model.full_state_items(policy, changed_only=True))
        assert set(synced) == {k for k in base.state_dict() if ".language_model.layers." in k
                               and (".self_attn." in k or ".mlp." in k)}
        peft_model = PeftModel.from_pretrained(base, str(ckpt / "adapter"))  # the adapters unmerged, in peft's layers
        assert (logprobs(peft_model.base_model.model, batch) - after).abs().max() < 1e-5
        assert json.loads((ckpt / "adapter" / "adapter_config.json").read_text())["r"] == 8
    finally:
        del policy, optimizer
        model.cleanup_distributed()


def test_bf16_base_is_frozen_in_the_compute_dtype_with_fp32_adapters(processor, tiny_path):
    """The one-GPU memory saving: no fp32 copy of the frozen base (FSDP2 accepts mixed dtypes in a unit
    as long as its trainable parameters share one). The first forward is the reference's, adapters off
    (GRPO with one update per step has no old-log-prob pass): FSDP2 fixes each unit's dtypes then, from
    the parameters that need gradients, so switching the adapters off must leave them trainable, or
    the gradients come back in bf16, unreduced in fp32."""
    model.init_distributed()
    policy = None
    try:
        policy = model.load_sharded_model(tiny_path, param_dtype=torch.bfloat16,
                                          lora=lora.lora_config(4, 8, lora.TARGETS, base=tiny_path))
        dtypes = {p.dtype for n, p in policy.named_parameters() if ".lora_" not in n}
        assert dtypes == {torch.bfloat16}
        assert {p.dtype for p in policy.parameters() if p.requires_grad} == {torch.float32}
        assert {t.dtype for _, t in model.full_state_items(policy)} == {torch.bfloat16}
        batch = model.build_batch(processor, make_toy_rows(2), [[100, 101], [102]])
        with lora.adapters_off(policy):
            logprobs(policy, batch)
        (-(model.token_logprobs(policy, batch) * batch["completion_mask"]).sum()).backward()
        grads = [p.grad for p in policy.parameters() if p.requires_grad]
        assert grads and all(g is not None and g.dtype == torch.float32 for g in grads)
    finally:
        del policy
        model.cleanup_distributed()


def test_lora_vision_adapts_the_vision_blocks_too(processor, tiny_path):
    model.init_distributed()
    policy = optimizer = None
    try:
        policy = model.load_sharded_model(tiny_path, param_dtype=torch.float32,
                                          lora=lora.lora_config(4, 8, lora.TARGETS, vision=True, base=tiny_path))
        adapted = lora.adapter_modules(policy)
        assert sorted({n.split(".blocks.0.")[1] for n in adapted if ".visual.blocks.0." in n}) == \
            ["attn.proj", "attn.qkv", "mlp.down_proj", "mlp.gate_proj", "mlp.up_proj"]
        batch = model.build_batch(processor, make_toy_rows(2), [[100, 101], [102]])  # an image row and a text row
        optimizer = model.adamw(policy, 1e-2, (0.9, 0.999), 0.0)
        (-(model.token_logprobs(policy, batch) * batch["completion_mask"]).sum()).backward()
        model.clip_and_step(policy, optimizer, 1.0, 1)
        merged = model.load_model(tiny_path)
        merged.load_state_dict(dict(model.full_state_items(policy)))
        assert (logprobs(merged, batch) - logprobs(policy, batch)).abs().max() < 1e-5
    finally:
        del policy, optimizer
        model.cleanup_distributed()


def test_lora_flags_are_checked_before_anything_loads(capsys):
    import grpo
    import sft

    for parse in (grpo.parse_args, sft.parse_args):
        with pytest.raises(SystemExit):
            parse(["--plan", "--lora-rank", "8", "--lora-targets", "q_proj,qkv"])
        assert "--lora-targets: qkv; the decoder layers' linear layers are" in capsys.readouterr().err
        with pytest.raises(SystemExit):
            parse(["--plan", "--lora-rank", "8", "--lora-alpha", "0"])
        assert "--lora-alpha must be positive, got 0" in capsys.readouterr().err
        args = parse(["--plan", "--lora-rank", "16"])
        assert args.lora_alpha == 32 and args.lora_targets == lora.TARGETS
