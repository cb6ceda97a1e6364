"""The memory planner, shared by grpo.py and sft.py, and the FLOP count behind their MFU.

`grpo.py --plan` / `sft.py --plan` print the expected memory of every GPU (and of every node's
host) for the stage's flags, from the model's shapes alone, and exit 0 if it fits, 2 if not. On a
GPU (or on CPU with --gpu-memory-gb) a normal run makes the same check first and stops with exit
code 2, before anything is loaded, when the plan does not fit (an out-of-memory error at step 200
costs more than a refusal at step 0). tests/test_plan.py holds the plan against memory measured
while the tiny model trains on two CPU ranks.

What is counted, per GPU (B sequences of T tokens per micro-batch, P parameters, W ranks):
  policy     fp32 master weights, gradients (update phase only: set to None after each step) and
             AdamW's m and v, all FSDP2-sharded: 4P/W each, 8P/W for m and v.
  gathered   FSDP2's unsharded units in the compute dtype during forward/backward: the root unit
             (embeddings, lm_head, final norm, the vision mergers) stays gathered for the whole
             micro-batch, with its unsharded gradient and that gradient's fp32 copy for the
             reduce-scatter; plus two blocks (the current one and the prefetched next).
  activations with gradient checkpointing: every decoder layer's and vision block's input (B*T*H;
             Qwen3-VL: and the DeepStack features), one layer's recomputed activations (per token:
             c*(9H + 4A + 4Hkv + 6I) + 8H bytes, A = heads x head_dim, c the compute dtype's size:
             norms, q/k/v, RoPE copies, attention output, SwiGLU's four I-wide tensors, their
             gradients; Qwen3's q/k norms add A + Hkv; RMSNorm computes in fp32), the boolean causal mask
             (B*T*T) and one chunk of the log-prob head (chunk x vocab x (4 + c) bytes, 4 in fp32:
             model.LinearLogprobs' backward holds one buffer of fp32 logits, turned in place into
             their gradient, and that gradient's copy in a compute dtype below fp32; below fp32 also
             the lm_head gradient's fp32 sum and one chunk's share of it). Without
             checkpointing, every layer's activations.
             --offload: all three in host memory instead (FSDP2's CPU offload).
             LoRA (--lora-rank): the frozen base in the compute dtype, c*P/W; weights, gradients and
             AdamW state for the adapters' parameters only (lora_params), and no gradient of the root
             unit or of a block's base weights.
  reference  (GRPO, KL > 0) fp32 shards 4P/W on the GPU, or in host memory with --ref-offload (its
             root unit, gathered for its forwards, is freed after them: model.reshard). With LoRA,
             none: the reference is the policy with its adapters off.
  vLLM       (GRPO) while awake it holds --gpu-memory-utilization x GPU memory: weights / tensor
             parallel, its activations and CUDA graphs (VLLM_OVERHEAD_GIB, an estimate: vLLM logs
             its own numbers at start-up) and the KV cache (the rest). Asleep (level 1) it holds
             ~nothing on the GPU and its weights in host memory. The rollout phase must fit the
             trainer's persistent memory (params, AdamW, an on-GPU reference) beside vLLM's share.
  log-probs  (GRPO) the step's old and reference log-probs, fp32, on the device through the
             updates; the step's batches wait in host memory until their forward.
  reserve    RESERVE_GIB for the CUDA context, NCCL buffers and allocator fragmentation.
The update's peak is the largest of three moments of a micro-batch's backward (plan_memory): the
log-prob head's backward, a layer's backward, and the root unit's reduce-scatter.
Host memory per node: at start-up rank 0 reads the full fp32 model and scatters it into the other
ranks' shards (model.load_sharded_model; node 0 is the worst node), the offloaded reference shards, vLLM's slept weights, and rank 0's gathered checkpoint.

Images are assumed to fill the prompt (GRPO: --max-prompt-tokens image tokens per sequence, each
of spatial_merge_size^2 patches), the worst case; text and image positions are both B*T.
"""

import math
import os
import resource
from dataclasses import dataclass, field

import torch

import model as M
from lora import TARGETS

# The checkpoints the recipe trains, and Qwen3-VL's, so that planning needs no download: the
# `config.json` of Qwen/Qwen2.5-VL-{3B,7B,32B}-Instruct and Qwen/Qwen3-VL-{2B,4B,8B,32B}-Instruct
# (text part, vision_config). tests/test_plan.py builds the models from these on the meta device and
# checks the parameter counts against them. Qwen3-VL's text part has head_dim 128 whatever the width.
_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14, temporal_patch_size=2,
               in_channels=3, spatial_merge_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31])
_Q3 = dict(family="qwen3-vl", num_key_value_heads=8, head_dim=128, vocab_size=151936)
_Q3_VISION_S = dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, patch_size=16, temporal_patch_size=2,
                    in_channels=3, spatial_merge_size=2, num_position_embeddings=2304, deepstack_visual_indexes=[5, 11, 17])
_Q3_VISION_L = dict(_Q3_VISION_S, depth=27, hidden_size=1152, intermediate_size=4304, deepstack_visual_indexes=[8, 16, 24])
SHAPES = {
    "Qwen/Qwen2.5-VL-3B-Instruct": dict(
        hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
        vocab_size=151936, tie_word_embeddings=True, vision=dict(_VISION, out_hidden_size=2048)),
    "Qwen/Qwen2.5-VL-7B-Instruct": dict(
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
        vocab_size=152064, tie_word_embeddings=False, vision=dict(_VISION, out_hidden_size=3584)),
    "Qwen/Qwen2.5-VL-32B-Instruct": dict(
        hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40, num_key_value_heads=8,
        vocab_size=152064, tie_word_embeddings=False, vision=dict(_VISION, intermediate_size=3456, out_hidden_size=5120)),
    "Qwen/Qwen3-VL-2B-Instruct": dict(
        _Q3, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
        tie_word_embeddings=True, vision=dict(_Q3_VISION_S, out_hidden_size=2048)),
    "Qwen/Qwen3-VL-4B-Instruct": dict(
        _Q3, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
        tie_word_embeddings=True, vision=dict(_Q3_VISION_S, out_hidden_size=2560)),
    "Qwen/Qwen3-VL-8B-Instruct": dict(
        _Q3, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
        tie_word_embeddings=False, vision=dict(_Q3_VISION_L, out_hidden_size=4096)),
    "Qwen/Qwen3-VL-32B-Instruct": dict(
        _Q3, hidden_size=5120, intermediate_size=25600, num_hidden_layers=64, num_attention_heads=64,
        tie_word_embeddings=False, vision=dict(_Q3_VISION_L, out_hidden_size=5120)),
}
FAMILIES = {"qwen2_5_vl": "qwen2.5-vl", "qwen3_vl": "qwen3-vl"}  # config.model_type -> what the planner counts

GiB = 2 ** 30
RESERVE_GIB = 4.0         # CUDA context (~0.5), NCCL buffers (~1), allocator fragmentation
VLLM_OVERHEAD_GIB = 2.0   # vLLM's profiled activations, sampler buffers and CUDA graphs (estimate)
LOGPROB_CHUNK = 256       # model.token_logprobs' chunk_tokens
DEFAULT_TOKENS_PER_FORWARD = 16384  # grpo.py --max-tokens-per-forward (verl's ppo_max_token_len_per_gpu default)
# bf16 dense peak TFLOP/s by device name (substring, first match), the denominator of MFU
PEAK_TFLOPS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("H800", 989.0),
               ("A100", 312.0), ("A800", 312.0)]


@dataclass
class Shapes:
    """What the planner and the FLOP count need of a Qwen2.5-VL or Qwen3-VL config. The families
    differ here in: Qwen3's q/k norms (no q/k/v biases) and head_dim 128 whatever the width; its
    vision tower's LayerNorms (with biases), two-matrix GELU MLP, learned position grid and full
    attention in every block (Qwen2.5-VL: RMSNorms, SwiGLU, windows); and DeepStack, one more patch
    merger per vision layer whose features are added into the early decoder layers."""
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    v_depth: int
    v_hidden: int
    v_intermediate: int
    v_out: int
    patch_dim: int        # in_channels * temporal_patch_size * patch_size^2: one patch's pixels
    merge: int            # spatial_merge_size
    window: int           # the vision window's side in merged tokens (0: no windows)
    v_full_blocks: int    # vision blocks with full (not windowed) attention
    family: str = "qwen2.5-vl"
    v_positions: int = 0  # Qwen3-VL: the learned position grid's entries
    deepstack: int = 0    # Qwen3-VL: DeepStack mergers (vision layers feeding the decoder)

    @property
    def qwen3(self) -> bool:
        return self.family == "qwen3-vl"

    @property
    def v_mlp_mats(self) -> int:
        return 2 if self.qwen3 else 3  # GELU fc1/fc2, or SwiGLU gate/up/down

    @classmethod
    def from_dict(cls, text: dict, vision: dict, tied: bool, family: str = "qwen2.5-vl") -> "Shapes":
        heads = text["num_attention_heads"]
        return cls(text["hidden_size"], text["intermediate_size"], text["num_hidden_layers"], heads,
                   text["num_key_value_heads"], text.get("head_dim") or text["hidden_size"] // heads,
                   text["vocab_size"], tied, vision["depth"], vision["hidden_size"], vision["intermediate_size"],
                   vision["out_hidden_size"], vision["in_channels"] * vision["temporal_patch_size"] * vision["patch_size"] ** 2,
                   vision["spatial_merge_size"],
                   vision.get("window_size", 0) // vision["spatial_merge_size"] // vision["patch_size"],
                   len(vision.get("fullatt_block_indexes", range(vision["depth"]))),  # no windows: all full
                   family, vision.get("num_position_embeddings", 0), len(vision.get("deepstack_visual_indexes", [])))


def shapes(name: str) -> Shapes:
    """An alias, hub id or local checkpoint -> Shapes, from the built-in table or the config.json
    (read with transformers' AutoConfig: nothing but the config is loaded)."""
    hub_id = M.MODEL_ALIASES.get(name, name)
    if hub_id in SHAPES:
        table = SHAPES[hub_id]
        return Shapes.from_dict(table, table["vision"], table["tie_word_embeddings"], table.get("family", "qwen2.5-vl"))
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(M.resolve_model(name))
    except OSError as e:
        raise SystemExit(f"--plan: no config for {name!r} ({e}); use a local checkpoint or one of {sorted(SHAPES)}")
    if config.model_type not in FAMILIES:
        raise SystemExit(f"--plan: {name!r} is a {config.model_type} model; the planner counts {sorted(FAMILIES)}")
    return Shapes.from_dict(config.text_config.to_dict(), config.vision_config.to_dict(), bool(config.tie_word_embeddings),
                            FAMILIES[config.model_type])


def builtin_config(hub_id: str):
    """(transformers config, model class) of a built-in shape: build it on the meta device to count its
    parameters, or for real to write a random checkpoint of that shape."""
    import transformers

    table = SHAPES[hub_id]
    prefix = "Qwen3VL" if table.get("family") == "qwen3-vl" else "Qwen2_5_VL"
    text = {k: v for k, v in table.items() if k not in ("vision", "tie_word_embeddings", "family")}
    config = getattr(transformers, prefix + "Config")(text_config=text, vision_config=table["vision"],
                                                      tie_word_embeddings=table["tie_word_embeddings"])
    return config, getattr(transformers, prefix + "ForConditionalGeneration")


# ---- parameter counts ----

def param_counts(s: Shapes) -> dict[str, int]:
    """Exact parameter counts of Qwen2_5_VL- / Qwen3VLForConditionalGeneration: the decoder layers,
    the vision blocks, and the root unit of model.shard_model (everything else: embeddings, lm_head,
    norm, patch embedding, position grid, mergers)."""
    q3 = s.qwen3
    attn, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    layer = s.hidden * (attn + 2 * kv) + attn * s.hidden + 3 * s.hidden * s.intermediate + 2 * s.hidden  # q,k,v,o, MLP, norms
    layer += 2 * s.head_dim if q3 else attn + 2 * kv                 # Qwen3: q/k norms; Qwen2.5: q/k/v biases
    vh, vi, m = s.v_hidden, s.v_intermediate, s.v_hidden * s.merge ** 2
    mlp = 2 * vh * vi + vi + vh if q3 else 3 * vh * vi + 2 * vi + vh  # fc1/fc2 or gate/up/down, with biases
    block = vh * 3 * vh + 3 * vh + vh * vh + vh + mlp + (4 if q3 else 2) * vh  # qkv, proj; 2 LayerNorms / RMSNorms
    merger = m * m + m + m * s.v_out + s.v_out                       # two linear layers on merged tokens
    if q3:  # patch embedding (with bias), position grid, merger (LayerNorm), DeepStack mergers (LayerNorm on merged)
        vision_root = s.patch_dim * vh + vh + s.v_positions * vh + merger + 2 * vh + s.deepstack * (merger + 2 * m)
    else:   # patch embedding, merger (RMSNorm)
        vision_root = s.patch_dim * vh + merger + vh
    root = s.vocab * s.hidden * (1 if s.tied else 2) + s.hidden + vision_root  # embeddings, lm_head unless tied, norm
    return {"total": s.layers * layer + s.v_depth * block + root, "vision": s.v_depth * block + vision_root,
            "layer": layer, "block": block, "root": root}


# ---- FLOPs: what MFU divides by the device's peak ----
#
# Model FLOPs of one training step, counted like PaLM's appendix B: a (m x k) @ (k x n) matmul is
# 2mkn FLOPs, and its backward is twice that (gradients of the input and of the weight), so
# training = 3 x forward. For a sequence of T real tokens (padding is not counted) of which n go
# through lm_head (token_logprobs projects only the completion / target positions):
#   LM layers   6 * N_layers * T,  N_layers = layers * (H*(H + 2*Hkv) + H*H + 3*H*I)  (q,k,v,o; gate,up,down)
#   attention   12 * layers * H * T^2   (QK^T and AV: 2 * 2*T*T*H forward; full T^2 as in PaLM, the
#               causal mask's half is not subtracted)
#   lm_head     6 * H * V * n
#   vision, per image of p = t*h*w patches, on the vision tower's own tokens (before merging):
#               6 * depth * (4*vh^2 + k*vh*vi) * p    (qkv, proj; MLP: k = 3 gate, up, down; Qwen3-VL k = 2)
#             + 12 * vh * (full_blocks * t*(h*w)^2 + windowed_blocks * t * sum over windows of w_len^2)
#             + 6 * (1 + d) * ((m^2*vh)^2 + m^2*vh*out) * p / m^2   (the patch merger and Qwen3-VL's d
#                                                                     DeepStack mergers, on merged tokens)
#             + 4 * patch_dim * vh * p                                (patch embedding: no gradient for pixels)
# Embedding lookups, norms, activations, RoPE, softmax, biases, Qwen3-VL's position-grid
# interpolation and DeepStack's additions are not counted, nor is the
# recomputation that gradient checkpointing adds (it is hardware work, not model work): MFU is
# the share of the device's peak spent on the model's own arithmetic. A forward-only pass (old
# and reference log-probs) is a third of the training count.

def vision_attention_spans(s: Shapes, t: int, h: int, w: int) -> tuple[int, int]:
    """(sum of squared full-attention spans, sum of squared window spans) of one image, in patches."""
    if not s.window:  # no windowed blocks (Qwen3-VL)
        return t * (h * w) ** 2, 0
    mh, mw, m2 = h // s.merge, w // s.merge, s.merge ** 2
    rows = [min(s.window, mh - i) for i in range(0, mh, s.window)]
    cols = [min(s.window, mw - j) for j in range(0, mw, s.window)]
    return t * (h * w) ** 2, t * sum((a * b * m2) ** 2 for a in rows for b in cols)


def flops(s: Shapes, seq_lens: list[int], logit_tokens: int, image_grids: list[tuple[int, int, int]],
          backward: bool = True) -> float:
    """Model FLOPs of one forward (+ backward) pass over sequences of `seq_lens` real tokens,
    `logit_tokens` of them through lm_head, images of (t, h, w) patches. See the formula above."""
    H, I, kv = s.hidden, s.intermediate, s.kv_heads * s.head_dim
    attn = s.heads * s.head_dim
    lm = 2 * s.layers * (H * (attn + 2 * kv) + attn * H + 3 * H * I) * sum(seq_lens)
    lm += 4 * s.layers * attn * sum(T * T for T in seq_lens) + 2 * H * s.vocab * logit_tokens
    vh, vi, m2 = s.v_hidden, s.v_intermediate, s.merge ** 2
    vision, embed = 0.0, 0.0
    for t, h, w in image_grids:
        p = t * h * w
        full, windowed = vision_attention_spans(s, t, h, w)
        vision += 2 * s.v_depth * (4 * vh * vh + s.v_mlp_mats * vh * vi) * p
        vision += 2 * (1 + s.deepstack) * (m2 * vh * m2 * vh + m2 * vh * s.v_out) * p / m2
        vision += 4 * vh * (s.v_full_blocks * full + (s.v_depth - s.v_full_blocks) * windowed)
        embed += 2 * s.patch_dim * vh * p
    return (3 if backward else 1) * (lm + vision) + (2 if backward else 1) * embed


def batch_flops(s: Shapes, batch: dict, backward: bool = True) -> float:
    """flops() of a model.collate batch (real lengths from attention_mask) or a model.pack one (from
    seq_lens): lm_head positions from completion_mask, images from image_grid_thw (each distinct one once)."""
    grids = batch.get("pixel_grid_thw", batch.get("image_grid_thw"))  # the images the vision tower sees
    grids = grids.tolist() if grids is not None else []
    lengths = batch["seq_lens"] if "seq_lens" in batch else batch["attention_mask"].sum(1)
    return flops(s, lengths.tolist(), int(batch["completion_mask"][:, 1:].sum()), grids, backward)


def peak_tflops(device, override: float | None = None) -> float | None:
    """The device's bf16 dense peak in TFLOP/s: --peak-tflops, else the table above for a known GPU,
    else None (a CPU has no honest peak: MFU is then reported as null)."""
    if override:
        return override
    if getattr(device, "type", device) != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops for key, tflops in PEAK_TFLOPS if key in name), None)


# ---- telemetry shared by the stages' step lines ----

def peak_device_memory_gb() -> float | None:
    """The trainer's peak GPU memory so far (torch's allocator statistics; whether they count vLLM's
    sleep-mode pool, torch tensors whose pages are unmapped while asleep, is what gpu_check's planner
    row shows); None on CPU."""
    return torch.cuda.max_memory_allocated() / GiB if torch.cuda.is_available() else None


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def perf_line(m: dict) -> str:
    """The fixed performance fields of a step line, from its metrics (absent ones are skipped, nulls are -)."""
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    parts = [f"rollout {m['rollout_tok_s']:.0f} tok/s"] if "rollout_tok_s" in m else []
    parts += [f"train {m['train_tok_s']:.0f} tok/s", f"{m['tflops']:.3g} TFLOP/s",
              f"mfu {fmt(m['mfu'], '.1%')}", f"mem {fmt(m['peak_mem_gb'], '.1f')} GB",
              f"rss {m['peak_rss_mb']:.0f} MB",
              "time " + " ".join(f"{k[2:]} {v:.1f}s" for k, v in m.items() if k.startswith("s_"))]
    return " ".join(parts)


def gpu_gib(flag: float | None) -> float:
    """GiB per GPU to plan for: the flag, else this machine's first GPU, else 80."""
    if flag:
        return flag
    return torch.cuda.get_device_properties(0).total_memory / GiB if torch.cuda.is_available() else 80.0


def ranks_per_node(world: int) -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", min(world, 8)))


# ---- the memory plan ----

@dataclass
class Run:
    """The flags of a stage that decide its memory."""
    stage: str                    # "grpo" or "sft"
    world: int                    # ranks (GPUs)
    micro_batch: int              # sequences per forward/backward on one rank
    seq_len: int                  # the longest sequence: prompt + completion tokens
    logit_tokens: int             # tokens per sequence through lm_head (the completion / target)
    image_tokens: int             # merged image tokens per sequence (worst case)
    compute_bytes: int = 2        # 2: bf16 compute, 4: fp32
    checkpointing: bool = True
    packed: bool = False          # GRPO: a forward's sequences in one row (model.pack), else right-padded
    tokens_per_forward: int = 0   # --max-tokens-per-forward: a micro-batch over it runs in pieces (0: never)
    ref: str | None = None        # GRPO's reference model: None, "gpu" or "host" (--ref-offload)
    vllm: bool = False
    tensor_parallel: int = 1
    gpu_memory_utilization: float = 0.6
    vllm_bytes: int = 2           # vLLM's weights and KV cache dtype
    max_model_len: int = 0
    step_sequences: int = 0       # GRPO: sequences a rank trains on per step (their log-probs wait on the device)
    gpu_gib: float = 80.0
    ranks_per_node: int = 8
    reserve_gib: float = RESERVE_GIB
    lora_params: int = 0          # --lora-rank: the adapters' parameters (lora_params); 0: full fine-tuning
    offload: bool = False         # --offload: the policy's shards, gradients and AdamW state in host memory


@dataclass
class Plan:
    rows: list[tuple[str, float, str]]           # (what, GiB per GPU, phases when it is held)
    host: list[tuple[str, float]]                # (what, GiB per node)
    phases: dict[str, float]                     # phase -> GiB per GPU
    kv_tokens: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return not self.problems

    @property
    def host_peak(self) -> float:
        """GiB per node: the start-up read of the model, or everything held afterwards."""
        return max(self.host[0][1], sum(gib for _, gib in self.host[1:]))


def lora_params(s: Shapes, rank: int, targets: str = TARGETS) -> int:
    """The adapters' parameters: r x (in + out) for each of the decoder layers' `targets` (--lora-vision's
    vision adapters are not counted: under 1% of the language model's)."""
    attn, kv, h, i = s.heads * s.head_dim, s.kv_heads * s.head_dim, s.hidden, s.intermediate
    dims = {"q_proj": h + attn, "k_proj": h + kv, "v_proj": h + kv, "o_proj": attn + h,
            "gate_proj": h + i, "up_proj": h + i, "down_proj": i + h}
    return s.layers * rank * sum(dims[t.strip()] for t in targets.split(",") if t.strip() in dims)


def training_run(args, s: Shapes) -> dict:
    """The Run fields of the flags sft.py and grpo.py share: LoRA and --offload."""
    return dict(lora_params=lora_params(s, args.lora_rank, args.lora_targets) if args.lora_rank else 0,
                offload=args.offload)


def kv_bytes_per_token(s: Shapes, dtype_bytes: int, tensor_parallel: int = 1) -> int:
    """vLLM's KV cache per token on one device: keys and values of every layer's KV heads (of its shard)."""
    return 2 * s.layers * max(1, s.kv_heads // tensor_parallel) * s.head_dim * dtype_bytes


def layer_activation_bytes(hidden: int, attn: int, kv: int, intermediate: int, c: int, qk_norm: bool = False) -> int:
    """Bytes per token of one decoder layer's (or vision block's) activations during its backward:
    attention-wide (heads x head_dim) q, its RoPE copy, the attention output and its gradient, and
    with Qwen3's q/k norms one more q- and k-wide copy each."""
    return c * (9 * hidden + 4 * attn + 4 * kv + 6 * intermediate + qk_norm * (attn + kv)) + 8 * hidden


def forward_size(r: Run) -> tuple[int, int, int, int]:
    """(tokens, image tokens, lm_head tokens, attention-mask bytes) of the largest forward: the worst case.
    Packed: up to the token budget in one row (a longer sequence runs alone), as many of them image
    tokens as its sequences can hold, and no mask (model.PACKED_SDPA attends per sequence). Padded:
    as many whole sequences of seq_len as the budget holds, a B x T^2 boolean mask."""
    budget = r.tokens_per_forward or r.micro_batch * r.seq_len
    if r.packed:
        tokens = min(r.micro_batch * r.seq_len, max(budget, r.seq_len))
        return tokens, min(tokens, r.micro_batch * r.image_tokens), min(tokens, r.micro_batch * r.logit_tokens), 0
    b = min(r.micro_batch, max(1, budget // r.seq_len))
    return b * r.seq_len, b * r.image_tokens, b * r.logit_tokens, b * r.seq_len ** 2


def plan_memory(s: Shapes, r: Run) -> Plan:
    n = param_counts(s)
    P, W, c = n["total"], r.world, r.compute_bytes
    tokens, image_tokens, logit_tokens, mask = forward_size(r)
    patches = image_tokens * s.merge ** 2
    # activations of one micro-batch
    lm_layer = layer_activation_bytes(s.hidden, s.heads * s.head_dim, s.kv_heads * s.head_dim, s.intermediate, c, s.qwen3)
    v_block = layer_activation_bytes(s.v_hidden, s.v_hidden, s.v_hidden, s.v_intermediate, c)  # SwiGLU's count: an upper bound for GELU
    if r.checkpointing:  # plus the DeepStack features, held until their decoder layers have run backward
        saved = c * (s.layers * tokens * s.hidden + s.v_depth * patches * s.v_hidden + s.deepstack * image_tokens * s.hidden)
        working = max(lm_layer * tokens, v_block * patches)
    else:
        saved = s.layers * lm_layer * tokens + s.v_depth * v_block * patches + c * s.deepstack * image_tokens * s.hidden
        working = 0
    chunk = min(LOGPROB_CHUNK, logit_tokens)
    head = chunk * s.vocab * (4 + (c if c < 4 else 0))         # fp32 logits, their compute-dtype copy
    hidden = 2 * c * tokens * s.hidden + mask                   # final hidden states, their grad; bool mask
    root = c * n["root"]                                       # gathered for the whole forward and backward
    head_grad = c * s.vocab * s.hidden                         # lm_head's unsharded gradient, from the first chunk on
    # below fp32, LinearLogprobs sums that gradient in fp32 (plus one chunk's product in the compute dtype)
    head_sum = (4 + c) * s.vocab * s.hidden if c < 4 else 0
    blocks = (3 * c + 4) * max(n["layer"], n["block"])         # two gathered blocks, one's gradient and its fp32 copy
    reduce = (c + 4) * n["root"]                               # the root's gradients and fp32 reduce-scatter input
    T = r.lora_params or P                                     # trained parameters
    if r.lora_params:  # a frozen base: nothing of the root unit or of a block's base gets a gradient
        head_grad = head_sum = reduce = 0
        blocks = 2 * c * max(n["layer"], n["block"]) + (c + 4) * T / s.layers
    where, on_gpu = (", in host memory: --offload", 0) if r.offload else ("", 1)
    rows = [(f"{'LoRA adapter' if r.lora_params else 'policy'} weights (fp32, sharded{where})", on_gpu * 4 * T / W, "always"),
            (f"AdamW m and v (fp32, sharded{where})", on_gpu * 8 * T / W, "always"),
            (f"gradients (fp32, sharded{where})", on_gpu * 4 * T / W, "update"),
            ("FSDP2 root unit gathered (embeddings, lm_head, merger)", root, "update"),
            ("lm_head gradient, unsharded", head_grad, "update A+C"),
            (f"activations: {'saved layer inputs' if r.checkpointing else 'every layer, kept'} "
             f"({tokens:,} tokens)", saved, "update A+C"),
            ("activations: final hidden states, their gradient, mask", hidden, "update A+C"),
            (f"log-prob chunk ({chunk} x {s.vocab})", head, "update A"),
            ("lm_head gradient's fp32 sum, one chunk's product", head_sum, "update A"),
            ("activations: one layer recomputed", working, "update C"),
            ("FSDP2 two blocks gathered, gradient", blocks, "update C"),
            ("root gradients + fp32 reduce-scatter input", reduce, "update B")]
    if r.lora_params:
        rows.insert(0, (f"frozen base weights (compute dtype, sharded{where})", on_gpu * c * P / W, "always"))
    if r.ref == "gpu":
        rows.append(("reference model (fp32, sharded)", 4 * P / W, "always"))
    if r.step_sequences:  # the batches themselves wait in host memory
        rows.append(("the step's old and reference log-probs (fp32)", 2 * 4 * r.step_sequences * r.seq_len, "update"))
    problems, kv_tokens = [], 0
    if r.vllm:
        tp = r.tensor_parallel
        if W % tp:
            problems.append(f"world size {W} is not a multiple of --tensor-parallel {tp}")
        share = r.gpu_memory_utilization * r.gpu_gib * GiB
        weights = P * r.vllm_bytes / tp
        kv_bytes = share - weights - VLLM_OVERHEAD_GIB * GiB
        per_token = kv_bytes_per_token(s, r.vllm_bytes, tp)
        kv_tokens = max(0, int(kv_bytes // per_token))
        rows += [(f"vLLM weights (/ tensor parallel {tp})", weights, "rollout"),
                 ("vLLM activations, CUDA graphs (estimate)", VLLM_OVERHEAD_GIB * GiB, "rollout"),
                 (f"vLLM KV cache ({kv_tokens:,} tokens)", max(kv_bytes, 0), "rollout")]
        if kv_tokens < r.max_model_len:
            problems.append(f"vLLM's KV cache holds {kv_tokens:,} tokens, less than one sequence of {r.max_model_len}: "
                            f"raise --gpu-memory-utilization or --tensor-parallel")
    rows.append(("reserve: CUDA context, NCCL, fragmentation", r.reserve_gib * GiB, "always"))
    rows = [(what, b / GiB, when) for what, b, when in rows]
    # The update's peak is the largest of three moments of a micro-batch's backward:
    #   A  the log-prob head's backward (its first step): every layer's saved input still held
    #   C  a layer's backward: its recomputed activations, two gathered blocks
    #   B  the root unit's reduce-scatter (its last step): activations gone
    held = lambda pick: sum(g for _, g, when in rows if pick(when))  # noqa: E731
    phases = {"rollout": held(lambda w: w in ("always", "rollout"))} if r.vllm else {}
    phases["update"] = held(lambda w: w in ("always", "update")) + max(
        held(lambda w: w.startswith("update ") and m in w[7:]) for m in "ABC")
    for ph, need in phases.items():
        if need > r.gpu_gib:
            problems.append(f"the {ph} phase needs {need:.1f} GiB per GPU, more than the {r.gpu_gib:g} GiB there are")
    # host memory, per node
    k = min(r.ranks_per_node, W)
    b = c if r.lora_params else 4  # bytes per parameter of the loaded model: a LoRA base in the compute dtype
    host = [(f"start-up: rank 0 reads the full model, {k} ranks hold shards", (b * P + k * b * P / W) / GiB),
            ("rank 0 gathers a checkpoint (compute dtype)", c * P / GiB)]
    if r.offload:
        host.append(("policy shards, gradients, AdamW (--offload)", k * 16 * T / W / GiB))
        if r.lora_params:
            host.append(("frozen base shards (--offload)", k * c * P / W / GiB))
    if r.ref == "host":
        host.append(("reference model shards (--ref-offload)", k * 4 * P / W / GiB))
    if r.vllm:
        host.append(("vLLM weights while asleep (level 1)", k * P * r.vllm_bytes / r.tensor_parallel / GiB))
    return Plan(rows, host, phases, kv_tokens, problems)


def describe(s: Shapes, r: Run, plan: Plan, name: str) -> str:
    n = param_counts(s)
    nodes = math.ceil(r.world / r.ranks_per_node)
    lines = [f"memory plan, {r.stage}: {name} ({n['total'] / 1e9:.2f} B parameters, vision {n['vision'] / 1e9:.2f} B), "
             f"{r.world} GPUs x {r.gpu_gib:g} GiB ({nodes} node{'s' * (nodes > 1)}), "
             f"micro-batch {r.micro_batch} x {r.seq_len} tokens, forwards of at most {forward_size(r)[0]:,} tokens "
             f"({'packed' if r.packed else 'padded'}), {'bf16' if r.compute_bytes == 2 else 'fp32'} compute, "
             f"gradient checkpointing {'on' if r.checkpointing else 'off'}",
             f"  {'per GPU':<62} {'GiB':>7}  held during"]
    lines += [f"  {what:<62} {gib:7.2f}  {when}" for what, gib, when in plan.rows]
    lines.append("  update moments: A the log-prob head's backward, C a layer's backward, B the root's reduce-scatter")
    lines.append("  peak: " + ", ".join(f"{ph} {gib:.1f} GiB" for ph, gib in plan.phases.items())
                 + f" of {r.gpu_gib:g} GiB")
    lines.append(f"  {'host memory per node':<62} {'GiB':>7}")
    lines += [f"  {what:<62} {gib:7.1f}" for what, gib in plan.host]
    lines.append(f"  peak per node: {plan.host_peak:.1f} GiB (the start-up read, or what is held after it)")
    lines.append("  fits" if plan.fits else "  DOES NOT FIT: " + "; ".join(plan.problems))
    return "\n".join(lines)


def check(s: Shapes, r: Run, name: str, show: bool) -> None:
    """--plan (show): print the plan, exit 0 if it fits and 2 if not. Otherwise print nothing and
    return when it fits; when it does not, print it and exit 2."""
    plan = plan_memory(s, r)
    if (show or not plan.fits) and os.environ.get("RANK", "0") == "0":
        print(describe(s, r, plan, name), flush=True)
    if not plan.fits:
        raise SystemExit(2)
    if show:
        raise SystemExit(0)
