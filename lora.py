"""LoRA adapters on the policy, for sft.py and grpo.py (`--lora-rank R`): one GPU trains a 7B model.

peft's LoRA layers are injected into the model in place (`peft.inject_adapter_in_model`), so the model
keeps its class, its module names and the project's forward; FSDP2 then shards it like any other
(a decoder layer's frozen base weights and its trainable adapters are one FSDP2 unit: FSDP2 wants
one dtype only among a unit's *trainable* parameters).

- The frozen base is loaded in the compute dtype (bf16 on GPUs): no fp32 master copy, no gradient,
  no AdamW state. Only the adapters (lora_A, lora_B) are fp32 master weights with gradients and AdamW
  state. lora_B starts at zero, so the adapted model starts equal to the base.
- GRPO's reference model is the policy with its adapters switched off (`adapters_off`): the initial
  model, without a second copy.
- What leaves the trainer is plain Hugging Face weights: `merged_items` folds each adapter into its
  base weight, W + (alpha / r) B A, under the module's own name. The weight sync streams only the
  adapted modules (the rest never changes); a checkpoint is the whole merged model, which transformers
  and vLLM load unchanged, plus `adapter/`, the adapters alone in peft's format
  (`peft.PeftModel.from_pretrained(base, ckpt / "adapter")`).

Targets: the language model's attention and MLP projections by default (`--lora-targets`); the vision
tower stays frozen unless `--lora-vision` adapts its blocks' linear layers too.
"""

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

ADAPTER = "default"  # peft's adapter name; one adapter per model here
TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
# the vision blocks' linear layers: Qwen2.5-VL (qkv, proj; gate/up/down) and Qwen3-VL (qkv, proj; fc1/fc2)
VISION_TARGETS = r"attn\.(qkv|proj)|mlp\.(gate_proj|up_proj|down_proj|linear_fc1|linear_fc2)"


def add_args(p) -> None:
    """The LoRA flags, shared by sft.py and grpo.py."""
    g = p.add_argument_group("LoRA (lora.py): train adapters on a frozen base")
    g.add_argument("--lora-rank", type=int, default=0, help="LoRA rank r (0: full fine-tuning, the recipe)")
    g.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha: the update is scaled by alpha / r "
                                                                  "(default 2 r)")
    g.add_argument("--lora-targets", default=TARGETS, help="comma-separated names of the language model's linear "
                                                            "layers to adapt")
    g.add_argument("--lora-vision", action="store_true", help="adapt the vision blocks' linear layers too "
                                                               "(default: the vision tower is frozen)")


def check_args(p, args) -> None:
    if args.lora_rank < 0:
        p.error(f"--lora-rank must be at least 0, got {args.lora_rank}")
    if args.lora_rank and args.lora_alpha is None:
        args.lora_alpha = 2.0 * args.lora_rank
    if args.lora_rank and args.lora_alpha <= 0:  # a scale of alpha / r = 0 would train nothing, silently
        p.error(f"--lora-alpha must be positive, got {args.lora_alpha:g}")
    unknown = {t.strip() for t in args.lora_targets.split(",")} - set(TARGETS.split(","))
    if unknown or not args.lora_targets.strip():
        p.error(f"--lora-targets: {', '.join(sorted(unknown)) or 'none given'}; the decoder layers' linear layers "
                f"are {TARGETS}")
    if args.lora_rank:
        try:
            import peft  # noqa: F401
        except ImportError:
            p.error("--lora-rank needs peft: pip install peft (README: dependencies)")


def target_pattern(targets: str, vision: bool = False) -> str:
    """peft's target_modules as one regex over full module names: the decoder layers' `targets`, and
    with `vision` the vision blocks' linear layers."""
    names = "|".join(t.strip() for t in targets.split(",") if t.strip())
    pattern = rf".*language_model\.layers\.\d+\.(self_attn|mlp)\.({names})"
    return pattern + (rf"|.*visual\.blocks\.\d+\.({VISION_TARGETS})" if vision else "")


def lora_config(rank: int, alpha: float, targets: str, vision: bool = False, base: str | None = None):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=target_pattern(targets, vision),
                      base_model_name_or_path=base)


def from_args(args, base: str):
    """The LoraConfig of the --lora-* flags for the model at `base`; None for full fine-tuning."""
    if not args.lora_rank:
        return None
    return lora_config(args.lora_rank, args.lora_alpha, args.lora_targets, args.lora_vision, base)


def add_adapters(model, config) -> None:
    """Inject LoRA layers in place (call before sharding), freeze everything else, keep the adapters in
    fp32 whatever the base's dtype. lora_A is peft's Kaiming init from torch's RNG, lora_B zeros."""
    from peft import inject_adapter_in_model

    model.requires_grad_(False)
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    model.lora_config = config
    if not adapter_modules(model):
        raise SystemExit(f"--lora-targets matched no module of {type(model).__name__}: {config.target_modules}")
    for name, param in model.named_parameters():
        if ".lora_" in name:
            param.data = param.data.float()
            param.requires_grad_(True)


def adapter_modules(model) -> dict[str, torch.nn.Module]:
    """{module name: peft LoRA layer}, in module order; empty for a model without adapters (peft unneeded)."""
    if not is_lora(model):
        return {}
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def is_lora(model) -> bool:
    return hasattr(model, "lora_config")


@contextmanager
def adapters_off(model):
    """The base model: every adapter switched off for the block (GRPO's reference log-probs).

    peft's flag alone (`_disable_adapters`, what its forward reads), not its `enable_adapters(False)`:
    that also sets requires_grad=False on the adapters, and when the reference forward is the policy's
    first (GRPO with one update per step), FSDP2 fixes each unit's dtypes then, from the parameters that
    need gradients: with none, a bf16 run's gradients would come back in bf16 (an error for the fp32
    adapters)."""
    layers = adapter_modules(model).values()
    for m in layers:
        m._disable_adapters = True
    try:
        yield model
    finally:
        for m in layers:
            m._disable_adapters = False


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach()


def merged_weight(m) -> torch.Tensor:
    """W + scaling * B @ A of one LoRA layer, in fp32, gathered from the FSDP2 shards (every rank calls)."""
    w, a, b = (_full(t).float() for t in (m.base_layer.weight, m.lora_A[ADAPTER].weight, m.lora_B[ADAPTER].weight))
    return w + m.scaling[ADAPTER] * (b @ a)  # (out, in) + (out, r) @ (r, in)


def merged_items(model, dtype: torch.dtype | None = None, adapted_only: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, full tensor) of the merged model, one tensor at a time: every adapted
    module's weight merged with its adapter under the module's own name, the adapters themselves left
    out; a model without adapters: its own tensors as they are. adapted_only (with adapters): just the
    blocks that hold an adapted module (a decoder layer's self_attn or mlp), whole, since vLLM fuses
    q/k/v and gate/up into one layer that must be loaded entirely; else every parameter and buffer.
    Every rank iterates (collectives)."""
    layers = adapter_modules(model)
    blocks = tuple({name.rpartition(".")[0] + "." for name in layers})
    adapted_only = adapted_only and bool(layers)
    for key, tensor in model.state_dict().items():
        if ".lora_" in key or adapted_only and not key.startswith(blocks):  # adapters fold into their base
            continue
        owner, _, leaf = key.rpartition(".")
        module = owner.removesuffix(".base_layer")
        if module in layers and leaf == "weight":
            yield f"{module}.weight", merged_weight(layers[module]).to(dtype or tensor.dtype)
        else:  # unchanged since loading (a base layer's bias under its module's name)
            yield (f"{module}.{leaf}" if module in layers else key), _full(tensor).to(dtype or tensor.dtype)


def adapter_state(model) -> dict[str, torch.Tensor]:
    """The adapters' full fp32 tensors under peft's saved names (`base_model.model.<module>.lora_A.weight`),
    gathered from the shards: every rank calls, every rank gets them (a few MB to a few hundred)."""
    state = {}
    for name, m in adapter_modules(model).items():
        for part in ("lora_A", "lora_B"):
            state[f"base_model.model.{name}.{part}.weight"] = _full(getattr(m, part)[ADAPTER].weight).float().cpu()
    return state


def save_adapter(config, state: dict[str, torch.Tensor], out: Path) -> None:
    """adapter_config.json and adapter_model.safetensors in `out`: what peft.PeftModel.from_pretrained loads."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out))
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "adapter_model.safetensors"),
              metadata={"format": "pt"})
