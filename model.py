"""What the stages share about the model: loading, the prompt, batches, log-probs, distributed
set-up and FSDP2.

- Models: `qwen2.5-vl-3b|7b|32b` and `qwen3-vl-2b|4b|8b|32b` are the Instruct checkpoints; any local
  directory or hub id works too. `tiny` (Qwen2.5-VL) and `tiny-qwen3-vl` are small random-initialised
  models with the real architecture, tokenizer and chat template, rebuilt offline (tiny.py) and
  cached on disk, for CPU tests and the demo. The two families run through the same code: what a
  family must provide is read from its checkpoint (the classes FSDP2 shards: `_no_split_modules`;
  the chat template; the tokenizer's special tokens, which the rollout engine blocks) and from
  transformers' model interface (`model.visual`, `get_rope_index`, `mm_encoder_outputs`); the
  per-family code is `_blank_image_features` (DeepStack) and tiny.py's builders.
- Prompt: `build_messages(row)` is the recipe's single user turn (SPEC.md section 3), used
  unchanged by curation, SFT, RL and evaluation.
- Batches are prompt + completion, right-padded, with the image tensors and `mm_token_type_ids`
  passed through and a mask of the completion tokens (what SFT and GRPO train on).
- `token_logprobs` computes per-token log-probs a chunk of tokens at a time, so the
  (tokens x 151,936) fp32 logits never exist all at once, forward or backward.
- Distributed: `init_distributed`/`cleanup_distributed` work under `python` (a one-rank group) and
  `torchrun`; `shard_model` is FSDP2, one unit per vision block and decoder layer, then the root;
  `load_sharded_model` reads the checkpoint on rank 0 alone and broadcasts it into the other ranks'
  shards, which they built on the meta device.

Checkpoints are in checkpoints.py, datasets and result files in data.py, the rollout engines in
rollout.py, LoRA adapters in lora.py (load_sharded_model adds them, full_state_items merges them).
"""

import io
import itertools
import math
import os
import re
import socket
import sys
from datetime import timedelta
from pathlib import Path
from types import MethodType
from typing import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image

import lora as L
from reward import options_dict
from tiny import TINY_VERSION, build_tiny

# ---- models: names and loading ----

MODEL_ALIASES = {
    "qwen2.5-vl-3b": "Qwen/Qwen2.5-VL-3B-Instruct",
    "qwen2.5-vl-7b": "Qwen/Qwen2.5-VL-7B-Instruct",
    "qwen2.5-vl-32b": "Qwen/Qwen2.5-VL-32B-Instruct",
    "qwen3-vl-2b": "Qwen/Qwen3-VL-2B-Instruct",
    "qwen3-vl-4b": "Qwen/Qwen3-VL-4B-Instruct",
    "qwen3-vl-8b": "Qwen/Qwen3-VL-8B-Instruct",
    "qwen3-vl-32b": "Qwen/Qwen3-VL-32B-Instruct",
}
TINY = {"tiny": "qwen2.5-vl", "tiny-qwen3-vl": "qwen3-vl"}  # name -> family of the tiny random models
CACHE_DIR = Path(os.environ.get("MEDVLT_CACHE", Path.home() / ".cache" / "medvlthinker"))


# What the hub accepts as a model id: "name" or "owner/name" (letters, digits, "-", "_", ".").
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def resolve_model(name: str, seed: int = 0, flag: str | None = None) -> str:
    """An alias, `tiny`, a local checkpoint, a run directory (its last complete checkpoint) or a hub
    id -> what `from_pretrained` takes.

    A name that is none of these (a path that does not exist, or "runs/x" when runs/ is a local
    folder) raises FileNotFoundError here, instead of the hub's "Repo id must be in the form ..."
    later; with `flag` (the command-line flag it came from) it stops the program with that flag named."""
    if name in TINY:
        return str(build_tiny(CACHE_DIR / f"{name}-{TINY_VERSION}-seed{seed}", seed=seed, family=TINY[name]))
    if name in MODEL_ALIASES:
        return MODEL_ALIASES[name]
    run = Path(name)
    problem = None
    if (run / "checkpoints").is_dir():  # a run's own config.json is its flags, not a model's
        from checkpoints import checkpoint_problem, complete_checkpoints  # it imports this module

        steps = sorted((run / "checkpoints").glob("step_*"))
        done = complete_checkpoints(run / "checkpoints")
        if done and steps[-1] != done[-1]:
            print0(f"{name}: using {done[-1].name}; {steps[-1].name} is incomplete "
                   f"({checkpoint_problem(steps[-1])})")
        if done:
            return str(done[-1])
        problem = f"{name}: a run directory with no complete checkpoint"
    elif run.is_dir() or (HUB_ID.fullmatch(name) and not (run.parent != Path(".") and run.parent.is_dir())):
        return name
    else:
        problem = (f"{name}: no such model directory, and not a hub id or an alias "
                   f"({', '.join([*MODEL_ALIASES, *TINY])})")
    if flag:
        raise SystemExit(f"{flag} {problem}")
    raise FileNotFoundError(problem)


def load_processor(name: str):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(resolve_model(name))
    processor.tokenizer.padding_side = "right"  # batches are built right-padded (build_batch)
    return processor


def load_model(name: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """The Qwen2.5-VL (or any image-text-to-text) model in `dtype`, SDPA attention (PACKED_SDPA: packed
    rows attend per sequence), eval mode.

    device="meta" builds the same model from config.json alone: no weights are read and its tensors
    have shapes but no storage (load_sharded_model fills them in)."""
    from transformers import AutoConfig, AutoModelForImageTextToText, GenerationConfig

    _register_packed_sdpa()
    path = resolve_model(name)
    if torch.device(device).type == "meta":
        with torch.device("meta"):
            model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(path), dtype=dtype,
                                                            attn_implementation=PACKED_SDPA)
        try:  # the sampling defaults that from_pretrained reads too (generate uses them)
            model.generation_config = GenerationConfig.from_pretrained(path)
        except OSError:
            pass
        return model.eval()
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, attn_implementation=PACKED_SDPA)
    return model.to(device).eval()


# ---- prompts: SPEC.md section 3, the same in curation, SFT, RL and evaluation ----

# A raw string on purpose: the official code's instruction contains the two characters "\" "n".
INSTRUCTION = (r"You will solve a problem/request. You should provide your thoughts within <think> </think> tags "
               r"before providing the answer.\nWrite your final answer within <answer> </answer> tags.")


def row_images(row: dict) -> list[Image.Image]:
    """The row's images as RGB PIL images: PIL objects, {"bytes"/"path"} dicts (HF datasets) or paths."""
    images = []
    for image in row.get("images") or []:
        if isinstance(image, dict):
            image = Image.open(io.BytesIO(image["bytes"]) if image.get("bytes") else image["path"])
        elif isinstance(image, (str, Path)):
            image = Image.open(image)
        images.append(image if image.mode == "RGB" else image.convert("RGB"))
    return images


def prompt_text(row: dict) -> str:
    options = "".join(f"\n\n{letter}. {text}" for letter, text in options_dict(row).items())
    return f"{INSTRUCTION}\n\nQuestion: {row['question']}\n\nOptions:{options}"


def build_messages(row: dict) -> list[dict]:
    """One user turn, no system message (the template adds its default one): images first, then text."""
    content = [{"type": "image"} for _ in row.get("images") or []]
    return [{"role": "user", "content": content + [{"type": "text", "text": prompt_text(row)}]}]


def render_prompt(processor, row: dict) -> str:
    """The chat-templated prompt string, ending with the assistant header."""
    return processor.apply_chat_template(build_messages(row), tokenize=False, add_generation_prompt=True)


def sft_target(row: dict) -> str:
    """The SFT answer as the official SFT built it: the spaces inside the tags are the recipe's, the
    trace and the label are stripped. The caller appends the turn's end (sft.END)."""
    return f"<think> {row['reasoning'].strip()} </think>\n<answer> {row['answer_label'].strip()} </answer>"


# ---- batches: prompt + completion, right-padded, everything Qwen2.5-VL needs passed through ----

def encode_prompt(processor, row: dict) -> dict:
    """One row's prompt through the processor: token ids with the image placeholders expanded,
    mm_token_type_ids (1 on image tokens), and the image tensors (None for a text-only row)."""
    images = row_images(row)
    enc = processor(text=[render_prompt(processor, row)], images=images or None, return_tensors="pt")
    return {"input_ids": enc["input_ids"][0], "mm_token_type_ids": enc["mm_token_type_ids"][0],
            "pixel_values": enc.get("pixel_values"), "image_grid_thw": enc.get("image_grid_thw")}


def prompt_tokens(processor, row: dict) -> int:
    """len(encode_prompt(processor, row)["input_ids"]) without preparing any pixels: the rendered
    prompt's tokens, each image's one placeholder counted as its merged patches (the processor's own
    resize rule, from the image's size alone)."""
    ip = processor.image_processor
    merged = [ip.get_number_of_image_patches(im.height, im.width, {}) // ip.merge_size ** 2 for im in row_images(row)]
    return len(processor.tokenizer(render_prompt(processor, row))["input_ids"]) + sum(merged) - len(merged)


def collate(prompts: list[dict], completions: list[list[int]], pad_id: int) -> dict:
    """Sequence i = prompts[i] + completions[i], right-padded to the longest.

    completion_mask marks the completion tokens: the positions whose log-prob is trained on.
    mm_token_type_ids is extended with zeros over the completion: without it Qwen2.5-VL silently
    falls back to 1-D positions for image rows (no error, just a different model).
    """
    lengths = [len(p["input_ids"]) + len(c) for p, c in zip(prompts, completions)]
    B, T = len(prompts), max(lengths)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    mm_token_type_ids = torch.zeros(B, T, dtype=torch.long)
    attention_mask = torch.zeros(B, T, dtype=torch.long)
    completion_mask = torch.zeros(B, T, dtype=torch.bool)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        P = len(p["input_ids"])
        input_ids[i, :P] = p["input_ids"]
        input_ids[i, P:lengths[i]] = torch.as_tensor(c, dtype=torch.long)
        mm_token_type_ids[i, :P] = p["mm_token_type_ids"]
        attention_mask[i, :lengths[i]] = 1
        completion_mask[i, P:lengths[i]] = True
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "mm_token_type_ids": mm_token_type_ids,
             "completion_mask": completion_mask}
    with_images = [p for p in prompts if p["pixel_values"] is not None]  # order = order of image tokens
    if with_images:
        batch["image_grid_thw"] = torch.cat([p["image_grid_thw"] for p in with_images])  # (images, 3)
        # A prompt shared by several sequences (a GRPO group's completions) has its pixels once:
        # image_index maps each image of the batch to its copy, which the vision tower sees once.
        distinct = list({id(p): p for p in with_images}.values())
        batch["pixel_values"] = torch.cat([p["pixel_values"] for p in distinct])
        if len(distinct) < len(with_images):
            counts = [len(p["image_grid_thw"]) for p in distinct]
            first = dict(zip(map(id, distinct), itertools.accumulate([0] + counts)))  # prompt -> its first copy
            batch["image_index"] = torch.tensor([first[id(p)] + j for p in with_images
                                                 for j in range(len(p["image_grid_thw"]))])         # (images,)
            batch["pixel_grid_thw"] = torch.cat([p["image_grid_thw"] for p in distinct])  # (distinct images, 3)
    return batch


def pack(model, batch: dict) -> dict:
    """A right-padded collate() batch (B, T) -> the same sequences concatenated into one row (1, N),
    N = their real tokens: no pad token reaches any layer (verl's use_remove_padding).

    position_ids (4, 1, N): plane 0 is each token's position in its own sequence, restarting at 0 at
    every sequence (what transformers reads as packing); planes 1-3 are the model's 3-D rope
    positions of each sequence, computed on the padded batch by its own get_rope_index, so image
    tokens get exactly the positions they get alone.
    seq_lens (B,) lets token_logprobs run attention per sequence (PACKED_SDPA): no token attends
    across sequences. Images stay in order: the packed image tokens meet the image features in the
    order of collate()."""
    keep = batch["attention_mask"].bool()                                          # (B, T)
    rope, _ = model.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"],
                                         batch.get("image_grid_thw"), attention_mask=batch["attention_mask"])
    text = keep.long().cumsum(1) - 1                                               # (B, T)
    packed = {k: batch[k][keep][None] for k in ("input_ids", "mm_token_type_ids", "completion_mask")}  # (1, N)
    packed["position_ids"] = torch.cat([text[keep][None], rope[:, keep]])[:, None]  # (4, 1, N)
    packed["seq_lens"] = keep.sum(1)                                               # (B,)
    images = ("pixel_values", "image_grid_thw", "image_index", "pixel_grid_thw")
    packed.update({k: batch[k] for k in images if k in batch})
    return packed


# A packed row (pack) must not attend across its sequences. transformers' sdpa path would build a
# (N, N) block-diagonal mask from the restarting positions and compute all N^2 scores, most of them
# masked: on CPU that made a packed micro-batch 2x slower than the padded one. PACKED_SDPA instead
# runs causal sdpa on each sequence's span (sum of T_i^2, no mask; on GPU sdpa's flash kernel), and is
# plain sdpa for everything else: padded batches, generation, the vision tower (not causal).
PACKED_SDPA = "sdpa_packed"


def _packed_sdpa(module, query, key, value, attention_mask, packed_seq_lens: list[int] | None = None, **kwargs):
    """query, key, value (1, heads, N, d) of a packed row -> attention output (1, N, heads, d)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if packed_seq_lens is None or not getattr(module, "is_causal", False):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    spans = zip(*(t.split(packed_seq_lens, dim=2) for t in (query, key, value)))  # each (1, heads, T_i, d)
    return torch.cat([sdpa_attention_forward(module, q, k, v, None, **kwargs)[0] for q, k, v in spans], dim=1), None


def _packed_sdpa_mask(*args, attention_mask=None, **kwargs):
    """No mask without padding (_packed_sdpa is causal per sequence); sdpa's mask for padded batches."""
    from transformers.masking_utils import sdpa_mask

    return None if attention_mask is None else sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def _register_packed_sdpa() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(PACKED_SDPA, _packed_sdpa)
    AttentionMaskInterface.register(PACKED_SDPA, _packed_sdpa_mask)


def build_batch(processor, rows: list[dict], completions: list[list[int]]) -> dict:
    """rows[i] (prompt) + completions[i] (token ids) -> one model batch. See collate()."""
    return collate([encode_prompt(processor, r) for r in rows], completions, processor.tokenizer.pad_token_id)


def to_device(batch: dict, device: torch.device | str) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


# ---- per-token log-probs, chunked ----

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "mm_token_type_ids", "pixel_values", "image_grid_thw")


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, temperature: float, out: torch.Tensor) -> torch.Tensor:
    """hidden @ weight.T / temperature into `out` (n, V) fp32, reused chunk after chunk: a fresh
    155 MB tensor per chunk costs more in page faults on CPU than its matmul (benchmarks/RESULTS.md)."""
    if weight.dtype == torch.float32:
        torch.mm(hidden, weight.t(), out=out)
    else:
        out.copy_(F.linear(hidden, weight))
    return out.div_(temperature) if temperature != 1.0 else out


def _logits_buffer(hidden: torch.Tensor, weight: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.empty(rows, len(weight), dtype=torch.float32, device=hidden.device)  # (rows, V) fp32


class LinearLogprobs(torch.autograd.Function):
    """log_softmax(hidden @ weight.T / temperature)[targets] for N tokens, `chunk` tokens at a time.

    Plain autograd would keep every chunk's (chunk x V) logits until backward; checkpointing each
    chunk instead makes autograd build one fresh V x H weight gradient per chunk and sum them. Here
    forward keeps only each token's logsumexp, and backward recomputes a chunk's logits in the same
    buffer, turns them in place into their gradient (g / T * (onehot(target) - softmax)) and adds
    the chunk's share of the weight gradient into one buffer: the peak is one chunk of fp32 logits
    (plus its compute-dtype copy below fp32) and one V x H gradient, whatever N is."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature: float, chunk: int):  # (N, H), (V, H), (N,)
        n = len(targets)
        out = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        buf = _logits_buffer(hidden, weight, min(chunk, n))
        for i in range(0, n, chunk):
            logits = _chunk_logits(hidden[i:i + chunk], weight, temperature, buf[:min(chunk, n - i)])
            top = logits.amax(-1, keepdim=True)
            out[i:i + chunk] = logits.gather(-1, targets[i:i + chunk, None])[:, 0]
            lse[i:i + chunk] = logits.sub_(top).exp_().sum(-1).log_().add_(top[:, 0])  # logsumexp, in place
            out[i:i + chunk] -= lse[i:i + chunk]
        ctx.save_for_backward(hidden, weight, targets, lse)
        # backward runs right after the loss (this is the graph's last op), so the buffer it needs anyway
        # is kept for it: its pages are not faulted in again. Under no_grad ctx is dropped, and it with it.
        ctx.temperature, ctx.chunk, ctx.buf = temperature, chunk, buf
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, targets, lse = ctx.saved_tensors
        want_hidden, want_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        # the weight's gradient is summed over the chunks in fp32 and cast once: a compute-dtype sum
        # rounds at every chunk (128 times for 32k tokens in chunks of 256)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
        n, chunk = len(targets), ctx.chunk
        buf, ctx.buf = ctx.buf, None  # freed when this backward returns, before the decoder's backward
        if buf is None:  # a second backward through the same graph (retain_graph=True)
            buf = _logits_buffer(hidden, weight, min(chunk, n))
        for i in range(0, n, chunk):
            h, g = hidden[i:i + chunk], grad_out[i:i + chunk] / ctx.temperature
            logits = _chunk_logits(h, weight, ctx.temperature, buf[:len(h)])
            dlogits = logits.sub_(lse[i:i + chunk, None]).exp_().mul_(-g[:, None])  # -g * softmax
            dlogits[torch.arange(len(h), device=h.device), targets[i:i + chunk]] += g
            dlogits = dlogits.to(weight.dtype)
            if want_hidden:
                torch.mm(dlogits, weight, out=grad_hidden[i:i + chunk])
            if want_weight and weight.dtype == torch.float32:
                torch.addmm(grad_weight, dlogits.t(), h, out=grad_weight)  # in place (and seen by FlopCounterMode)
            elif want_weight:  # the chunk's share at the compute dtype's matmul speed, added in fp32
                grad_weight += torch.mm(dlogits.t(), h)
        return grad_hidden, grad_weight.to(weight.dtype) if want_weight else None, None, None, None


def _blank_image_features(model) -> torch.Tensor:
    """The vision tower on a blank 28x28 image (4 patches, 1 merged token).

    Under FSDP2 every rank must all-gather the same units in the same order. A rank whose
    micro-batch has no image would skip the vision blocks while another rank gathers them, and the
    collectives would pair up wrongly (a hang or a size mismatch). So a text-only micro-batch still
    runs the vision tower, first, like an image batch does, and adds its outputs times zero: the
    merged features and, for Qwen3-VL, the DeepStack features (every vision parameter then has a
    gradient, as on a rank with images, so the gradient reduce-scatters match too)."""
    visual = model.model.visual
    patch = visual.config.in_channels * visual.config.temporal_patch_size * visual.config.patch_size ** 2
    grid = torch.tensor([[1, 2, 2]], device=model.lm_head.weight.device)
    pixels = torch.zeros(4, patch, dtype=visual.patch_embed.proj.weight.dtype, device=grid.device)
    out = visual(pixels, grid_thw=grid)
    return sum(f.sum() for f in [out.pooler_output, *(getattr(out, "deepstack_features", None) or [])])


def _shared_image_features(model, batch: dict):
    """transformers' mm_encoder_outputs["image"] for a batch whose sequences share images (collate's
    image_index): the vision tower runs once on each distinct image, and every image of the batch
    takes its copy's features (and, where a model has them, its DeepStack features)."""
    out = model.model.get_image_features(batch["pixel_values"], batch["pixel_grid_thw"], return_dict=True)
    pick = lambda per_image: tuple(per_image[j] for j in batch["image_index"].tolist())  # noqa: E731
    out.pooler_output = pick(out.pooler_output)                       # per image of the batch: (its tokens, H)
    if getattr(out, "deepstack_features", None):
        out.deepstack_features = [pick(layer) for layer in out.deepstack_features]
    return out


def _token_logprobs(model, batch: dict, temperature: float = 1.0, chunk_tokens: int = 256) -> torch.Tensor:
    sharded = dist.is_initialized() and dist.get_world_size() > 1
    blank = _blank_image_features(model) if sharded and "pixel_values" not in batch else None
    packed = {"packed_seq_lens": batch["seq_lens"].tolist()} if "seq_lens" in batch else {}  # see _packed_sdpa
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    if "image_index" in batch:
        inputs.pop("pixel_values")
        inputs["mm_encoder_outputs"] = {"image": _shared_image_features(model, batch)}
    hidden = model.model(**inputs, use_cache=False, **packed).last_hidden_state
    if blank is not None:
        hidden = hidden + 0.0 * blank
    mask = batch["completion_mask"][:, 1:]                      # (B, T-1): token t+1 is a completion token
    h = hidden[:, :-1][mask]                                    # (N, H): states that predict those tokens
    targets = batch["input_ids"][:, 1:][mask]                   # (N,)
    logp = torch.zeros(mask.shape[0], mask.shape[1] + 1, dtype=torch.float32, device=hidden.device)  # (B, T)
    if len(targets):
        logp[:, 1:][mask] = LinearLogprobs.apply(h, model.lm_head.weight, targets, temperature, chunk_tokens)
    return logp


def token_logprobs(model, batch: dict, temperature: float = 1.0, chunk_tokens: int = 256) -> torch.Tensor:
    """log p(input_ids[b, t] | input_ids[b, :t]) at completion positions, 0 elsewhere: (B, T) fp32.

    Logits are divided by `temperature` (the sampling temperature), like the rollout engine's."""
    if hasattr(model, "fsdp_token_logprobs"):  # FSDP2 root: runs inside its forward hooks (shard_model)
        return model.fsdp_token_logprobs(batch, temperature, chunk_tokens)
    return _token_logprobs(model, batch, temperature, chunk_tokens)


# ---- distributed: one init/cleanup pair, FSDP2 ----

ONE_RANK_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")  # what a one-rank group sets


def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world_size, device). Under torchrun: its env. Under plain python: a one-rank group, so
    the same FSDP2 code path runs everywhere. NCCL with one GPU per rank, else gloo on CPU."""
    if not dist.is_initialized():
        if "RANK" not in os.environ:  # plain `python`: rendezvous on a free local port
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            os.environ.update(dict(zip(ONE_RANK_ENV, ("0", "0", "1", "127.0.0.1", str(port)))))
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        # NCCL for GPU tensors, gloo for the small CPU tensors and objects the stages exchange
        backend = "cuda:nccl,cpu:gloo" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=timedelta(minutes=60))
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def cleanup_distributed() -> None:
    """Call in `finally`, after deleting the model and optimizer (pending gloo work at interpreter
    exit aborted 2 of 16 runs otherwise)."""
    import gc

    gc.collect()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def exit_on_error(e: BaseException) -> None:
    """Call in a stage's `except BaseException` before its `finally`'s barrier and engine close.

    With several ranks the others wait in a collective this rank will never join, and the barrier
    would keep this rank waiting with them until the 60-minute timeout, its error unprinted. So print
    the error now, rank-prefixed, and leave at once, non-zero: torchrun then stops the other ranks
    within seconds. One rank (plain `python`, the tests in-process): return; the caller re-raises and
    the normal clean-up runs. An exit with code 0 is not an error and returns too."""
    import traceback

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or isinstance(e, SystemExit) and not e.code:
        return
    if isinstance(e, SystemExit):  # a stop with a message (a bad flag, a failed check): the message is the report
        code, text = (e.code, f"exit code {e.code}") if isinstance(e.code, int) else (1, str(e.code))
    else:
        code, text = 1, "".join(traceback.format_exception(e))
    sys.stdout.flush()
    sys.stderr.write("".join(f"[rank {os.environ.get('RANK', '?')}] {line}\n" for line in text.splitlines()))
    sys.stderr.flush()
    os._exit(code)


def print0(*args, **kwargs) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


def shard_model(model, param_dtype: torch.dtype | None = None, reduce_dtype: torch.dtype = torch.float32,
                cpu_offload: bool = False):
    """FSDP2 over all ranks: one unit per vision block and per decoder layer, then the root (embeddings,
    lm_head, norms, the patch merger). param_dtype=torch.bfloat16 computes in bf16 while the sharded
    master weights and the gradient reduction stay fp32. Returns the same (now sharded) model."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import (CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard,
                                        register_fsdp_forward_method)

    mesh = init_device_mesh("cuda" if torch.cuda.is_available() else "cpu", (dist.get_world_size(),))
    kw = dict(mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype),
              offload_policy=CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload else OffloadPolicy())
    units = set(model._no_split_modules)  # the family's vision block and decoder layer classes
    for module in list(model.modules())[1:]:  # in order: the vision blocks, then the decoder layers
        if type(module).__name__ in units:
            fully_shard(module, **kw)
    fully_shard(model, **kw)
    # token_logprobs calls model.model and lm_head directly, not model.forward; registering it as a
    # forward method makes FSDP2 gather the root's parameters around it (like it does for generate).
    model.fsdp_token_logprobs = MethodType(_token_logprobs, model)
    register_fsdp_forward_method(model, "fsdp_token_logprobs")
    register_fsdp_forward_method(model, "generate")
    return model


def reshard(*models) -> None:
    """Free the root unit that FSDP2 gathered for forwards without a backward (no_grad log-probs).

    After a backward FSDP2 reshards every unit; after a forward it reshards all but the root, which
    it keeps for the backward it expects. A frozen reference model never runs one, so its gathered
    embeddings and lm_head would stay allocated through the policy's update (156 MB for the tiny
    model, ~2 GB per GPU for 7B in bf16). Plain modules and sharded ones are left as they are."""
    for m in models:
        if hasattr(m, "reshard"):
            m.reshard()


def load_sharded_model(name: str, param_dtype: torch.dtype | None = None, cpu_offload: bool = False,
                       gradient_checkpointing: bool = False, lora=None):
    """The fp32 model, sharded by shard_model over all ranks, read from disk by rank 0 alone. With a
    `lora` config (lora.lora_config): the base in the compute dtype, frozen, with fp32 LoRA adapters.

    The other ranks build it on the meta device (no memory, no file read), shard that, and receive their
    shards from rank 0 one tensor at a time, so host memory holds one full fp32 copy in the whole job
    instead of one per rank (32B: 134 GB, ~1 TB on a node of 8 ranks). Rank 0 holds the full copy
    plus its shards until the broadcast is done. Global rank 0, not one reader per node: it is what
    torch.distributed.checkpoint's broadcast_from_rank0 does, the files are read once, and the
    interconnect is faster than every node's disk. Under plain `python` (one rank) this is
    load_model then shard_model, nothing more."""
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = (param_dtype or torch.float32) if lora is not None else torch.float32
    model = load_model(name, dtype, device="cpu" if rank == 0 else "meta")
    if lora is not None:
        L.add_adapters(model, lora)  # rank 0's initial adapters reach the other ranks with the weights
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    full = model.state_dict() if rank == 0 and world > 1 else {}  # the full tensors, kept past sharding
    shard_model(model, param_dtype, cpu_offload=cpu_offload)
    if world > 1:
        _fill_from_rank0(model, full, cpu_offload)
    return model


def _fill_from_rank0(model, full: dict, cpu_offload: bool) -> None:
    """Every rank: rank 0's `full` state dict (empty elsewhere) into the FSDP2 shards, then every
    buffer from rank 0."""
    from torch.distributed.tensor import distribute_tensor

    # Untested branch: with a GPU the shards and buffers go to it (as fully_shard put rank 0's) and
    # the broadcasts run over NCCL; this was only ever run on CPU with gloo.
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if dist.get_rank() != 0:
        # Storage, uninitialised, for the meta shards where FSDP2 keeps them (host memory under CPU
        # offload); buffers are not sharded and live on the device, where fully_shard put rank 0's.
        model.to_empty(device="cpu" if cpu_offload else device)
        for name, buf in list(model.named_buffers()):
            owner, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(owner), leaf, torch.empty_like(buf, device=device))
    # Parameters: rank 0 broadcasts each full tensor on the device (NCCL on GPUs), every rank copies
    # its chunk into its shard, wherever FSDP2 keeps it. (torch's set_model_state_dict broadcasts on
    # the shards' device: for --ref-offload's host-memory shards that is gloo, 33-134 GB at start-up.)
    with torch.no_grad():
        for name, param in model.named_parameters():                   # tied weights: once
            t = (full[name].to(device) if dist.get_rank() == 0
                 else torch.empty(param.shape, dtype=param.dtype, device=device))
            dist.broadcast(t, src=0)
            mine = distribute_tensor(t, param.device_mesh, param.placements, src_data_rank=None)  # no communication
            param.to_local().copy_(mine.to_local())
    # Non-persistent buffers, such as the rotary inv_freq of the language model and of the vision
    # tower, are in no state dict and hold garbage after to_empty: rank 0's, computed by
    # from_pretrained, are copied as they are (a few KB), so every rank has exactly a plain load's.
    for buf in model.buffers():
        dist.broadcast(buf, src=0)


def adamw(model, lr: float, betas, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the model's trainable parameters (with LoRA, the adapters), fused: one kernel for all
    of them instead of a Python loop of small ops per tensor (torch's default off CUDA): 9x faster on
    CPU with FSDP2's DTensors."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, betas=tuple(betas), weight_decay=weight_decay, fused=True)


def clip_and_step(model, optimizer, max_norm: float, step: int) -> float:
    """Clip the gradient norm (over all shards), take the optimizer step unless the norm is not
    finite (then the update is skipped, with a message), clear the gradients. Returns the norm."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    if math.isfinite(norm):
        optimizer.step()
    else:
        print0(f"step {step}: non-finite gradient norm, update skipped")
    optimizer.zero_grad(set_to_none=True)
    return norm


def enable_gradient_checkpointing(model) -> None:
    """Recompute each layer's activations in backward (call before shard_model)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


# ---- weights: gathered from the shards one tensor at a time (checkpoints, the weight sync) ----

def full_state_items(model, dtype: torch.dtype | None = None, changed_only: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor) for every parameter and buffer, gathered one at a time from the FSDP2
    shards, so no second full copy of the model ever exists. Every rank must iterate (collectives).
    With LoRA adapters: the merged model's Hugging Face tensors, and with changed_only only the blocks
    that hold adapters (the weight sync); lora.merged_items walks both kinds of model."""
    return L.merged_items(model, dtype, adapted_only=changed_only)
