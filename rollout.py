"""The rollout engines: vLLM in the trainer's process, or transformers' generate (`--rollout hf`).

Both take unified-schema rows and return, per row, n `Completion`s (token ids, text, per-token
log-probs, finish reason). `VLLMEngine.update_weights` is the one place where trained weights reach
vLLM; every step of it is commented with the failure it prevents.
"""

import logging
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lora import is_lora
from model import full_state_items, prompt_tokens, render_prompt, row_images, to_device

# ---- rollouts: vLLM in the trainer's process, or transformers' generate ----
#
# Both engines take unified-schema rows and return, per row, n completions. The log-probs they
# report are the model's own (temperature 1, nothing masked): the trainer's token_logprobs at
# temperature 1 must reproduce them, which is how a stale weight sync is caught (SPEC section 8).

# The policy may emit text tokens and end its turn, nothing else: a sampled <|image_pad|> would make
# the training batch's image tokens outnumber the image features. The embedding rows past the
# tokenizer are padding and are excluded too.
END_IDS = {151643, 151645}  # <|endoftext|>, <|im_end|>


def blocked_token_ids(tokenizer, vocab_size: int) -> list[int]:
    """The ids the policy may not emit (~280 of ~152k): the tokenizer's special tokens but the two that
    end a turn, and the embedding rows past the tokenizer. Text and the added tokens that are not
    special stay open (<tool_call>, <|fim_*|>; Qwen3's <think>, </think>, <tool_response>): Qwen2.5-VL
    blocks 151644, 151646..151656 and 151665 on; Qwen3-VL the same specials and 151669 on."""
    special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return sorted((special - END_IDS) | set(range(len(tokenizer), vocab_size)))


@dataclass
class Completion:
    token_ids: list[int]   # sampled tokens, the final <|im_end|> included when the model stopped
    text: str              # decoded without special tokens
    logprobs: list[float]  # log p(token) under the engine's weights, one per token
    finish_reason: str     # "stop" (end of turn) or "length" (max_new_tokens reached)


def request_seeds(seed: int, positions, n: int) -> list[int]:
    """The seeds of requests of n samples each, at `positions` in a run's numbering of its requests.
    vLLM samples completion k of a request seeded s with seed s + k, so consecutive request seeds
    would give sample k of one request the noise of sample k-1 of the next: request p gets seed + p * n."""
    return [seed + p * n for p in positions]


def row_seeds(rows: list[dict], seed: int | list[int] | None) -> list[int | None]:
    """Per-row sampling seeds: an int gives seed + i (i = position in `rows`); a list is used as is."""
    if seed is None or isinstance(seed, list):
        return seed or [None] * len(rows)
    return [seed + i for i in range(len(rows))]


def not_the_threads_warning(record: logging.LogRecord) -> bool:
    """vLLM's CPU worker swaps torch.set_num_threads for a warning, which its own renderer then
    triggers twice per multimodal request (~1000 identical lines per pass-count run): drop those."""
    return "torch.set_num_threads" not in record.getMessage()


@contextmanager
def quiet(logger: str):
    """The named logger (and its children) at ERROR level for the block."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


MAX_CONTEXT = 32768  # the default context of evaluation and curation engines, when the model's own is longer


def context_length(model_path: str, cap: int = MAX_CONTEXT) -> int:
    """The model's own context (its text config's max_position_embeddings: Qwen2.5-VL 128,000, the tiny
    models 8,192), at most `cap`: room for a 4096-token budget after any realistic prompt, without sizing
    vLLM's KV cache for a 128k-token sequence."""
    from transformers import AutoConfig

    return min(cap, AutoConfig.from_pretrained(model_path).get_text_config().max_position_embeddings)


class VLLMEngine:
    """vLLM's LLM in this process. Under torchrun every group of `tensor_parallel_size` consecutive
    ranks hosts one engine through vLLM's external launcher (one worker per rank, the existing
    torch.distributed world); the ranks of a group generate for the group's rows together.
    max_model_len 0: context_length(model_path)."""

    def __init__(self, model_path: str, processor, max_model_len: int = 0, max_images: int = 8,
                 tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.6, seed: int = 0,
                 dtype: str = "auto", kv_cache_bytes: int | None = None):
        # In-process engine (weights are pushed by reference, no serialisation). KV cache: on GPU the
        # rest of gpu_memory_utilization; on CPU kv_cache_bytes, default 1 GiB (vLLM's
        # VLLM_CPU_KVCACHE_SPACE, in GiB, overrides it).
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        logging.getLogger("vllm.v1.worker.cpu_worker").addFilter(not_the_threads_warning)
        from vllm import LLM

        max_model_len = max_model_len or context_length(model_path)
        self.processor, self.tp = processor, tensor_parallel_size
        self.max_model_len, self.max_images = max_model_len, max_images
        self.on_gpu = torch.cuda.is_available()
        rank, world = dist.get_rank(), dist.get_world_size()
        if world % tensor_parallel_size:
            raise ValueError(f"world size {world} is not a multiple of tensor_parallel_size {tensor_parallel_size}")
        self.group = None  # the ranks sharing this engine, to gather their rows (every rank makes every group)
        for start in range(0, world, tensor_parallel_size) if tensor_parallel_size > 1 else ():
            group = dist.new_group(list(range(start, start + tensor_parallel_size)), backend="gloo")
            if start <= rank < start + tensor_parallel_size:
                self.group = group
        self.llm = LLM(model=model_path, dtype=dtype, seed=seed, max_model_len=max_model_len,
                       tensor_parallel_size=tensor_parallel_size, distributed_executor_backend="external_launcher",
                       gpu_memory_utilization=gpu_memory_utilization, limit_mm_per_prompt={"image": max_images, "video": 0},
                       kv_cache_memory_bytes=None if self.on_gpu else kv_cache_bytes or 2 ** 30,
                       enable_prefix_caching=True, enable_sleep_mode=self.on_gpu, enforce_eager=not self.on_gpu,
                       # CPU only: a prompt split over scheduler steps rewinds its request's seeded
                       # generator by an offset, which CPU generators lack ("CPU Generator does not use
                       # offset"): schedule whole prompts.
                       enable_chunked_prefill=self.on_gpu)
        self.dtype = self.llm.llm_engine.model_config.dtype
        # The blocked tokens as a -inf logit bias (~290 ids), not as allowed_token_ids (~152k): vLLM
        # deep-copies each request's parameters and builds each sample's mask from the list, ~20 ms
        # each on CPU (1.9x the time of 128 rows x 4 samples). Same logits, same samples.
        vocab_size = self.llm.llm_engine.model_config.get_vocab_size()
        blocked = blocked_token_ids(processor.tokenizer, vocab_size)
        self.logit_bias = dict.fromkeys(blocked, float("-inf"))

    def cannot_run(self, row: dict) -> str | None:
        """Why vLLM would refuse this row, or None: what its input validation rejects (a prompt with no
        room left for one new token, more images than the engine takes). A prompt that fits runs, and
        stops at the context if its budget does not fit (finish reason "length"). A function of the row
        alone, so every rank of a tensor-parallel group decides alike, before any collective."""
        if len(row.get("images") or []) > self.max_images:
            return f"{len(row['images'])} images, the engine takes {self.max_images}"
        n = prompt_tokens(self.processor, row)
        if n >= self.max_model_len:
            return f"a prompt of {n} tokens leaves no room in the context of {self.max_model_len}"
        return None

    def generate(self, rows: list[dict], n: int = 1, temperature: float = 1.0, top_p: float = 1.0,
                 max_new_tokens: int = 4096, seed: int | list[int] | None = None) -> list[list[Completion]]:
        """n completions per row; temperature 0 is greedy. Every rank of a tensor-parallel group calls
        it once per batch of rows, with its own rows (maybe none): the group generates them all."""
        from vllm import SamplingParams

        seeds = row_seeds(rows, seed)
        mine = len(rows)
        if self.tp > 1:  # all ranks of an engine must submit the same requests
            shares = [None] * self.tp
            dist.all_gather_object(shares, (rows, seeds), group=self.group)
            offset = sum(len(r) for r, _ in shares[:dist.get_rank(self.group)])
            rows, seeds = [r for rs, _ in shares for r in rs], [s for _, ss in shares for s in ss]
        if not rows:  # the whole group has nothing to do
            return []
        requests = []
        for row in rows:
            request = {"prompt": render_prompt(self.processor, row)}
            if row.get("images"):
                request["multi_modal_data"] = {"image": row_images(row)}
            requests.append(request)
        params = [SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens, seed=s,
                                 logprobs=0, logit_bias=self.logit_bias, skip_special_tokens=True) for s in seeds]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        results = [[Completion(list(c.token_ids), c.text,
                               [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)],
                               "stop" if c.finish_reason == "stop" else "length") for c in out.outputs]
                   for out in outputs]
        return results[offset:offset + mine] if self.tp > 1 else results

    def update_weights(self, model) -> None:
        """Push the training model's current weights into the engine (all ranks call this)."""
        if self.on_gpu:
            self.llm.wake_up(tags=["weights"])  # weights first, the KV cache after: lower peak memory
        # 1. Stream parameters: each FSDP2 shard set is gathered into one full tensor, cast to the
        #    engine's dtype, loaded (vLLM re-shards it for tensor parallelism, fuses q/k/v and
        #    gate/up) and dropped, so at most one full parameter exists beyond the engine's copy.
        #    collective_rpc reaches the in-process worker; reload_weights is vLLM's in-place reload
        #    (a direct model.load_weights fails on the CPU backend and leaves a half-updated model).
        #    With LoRA only the blocks holding adapters are streamed; vLLM keeps the other layers'
        #    weights and warns about each of them (those warnings are dropped: that is the intent).
        with quiet("vllm.model_executor.model_loader.reload") if is_lora(model) else nullcontext():
            self.llm.collective_rpc("reload_weights",
                                    kwargs={"weights_iterator": full_state_items(model, self.dtype, changed_only=True)})
        # 2. Drop every cached activation computed with the old weights. Without the prefix-cache
        #    reset, prompts sharing a cached prefix reuse old KV blocks (wrong outputs, no error);
        #    without the encoder-cache reset, vLLM's scheduler and worker disagree on cached image
        #    features and the engine fails with "Encoder cache miss".
        self.llm.reset_prefix_cache()
        self.llm.llm_engine.reset_encoder_cache()
        if self.on_gpu:
            # the streamed full tensors' cached blocks back to the device first: the KV cache wakes
            # into that memory (verl empties the cache at the same point)
            torch.cuda.empty_cache()
            self.llm.wake_up(tags=["kv_cache"])

    def sleep(self) -> None:
        """Free GPU memory for training (weights kept in host memory: level 1). A no-op on CPU."""
        if self.on_gpu:
            self.llm.sleep(level=1)

    def close(self) -> None:
        """Shut the engine down before cleanup_distributed. vLLM's teardown destroys its process
        groups and torch.distributed's default group too; left to interpreter exit, it fails on
        groups that are already gone."""
        dist.barrier()
        self.llm.llm_engine.engine_core.shutdown()


class HFEngine:
    """transformers' generate on the training model itself (FSDP2-sharded or not): slow, but needs
    nothing beyond transformers. Same interface as VLLMEngine; weights are always current."""

    def __init__(self, model, processor):
        self.model, self.processor = model, processor
        self.suppress = blocked_token_ids(processor.tokenizer, model.config.text_config.vocab_size)

    def cannot_run(self, row: dict) -> str | None:
        return None  # transformers takes any prompt and any number of images

    @torch.no_grad()
    def generate(self, rows: list[dict], n: int = 1, temperature: float = 1.0, top_p: float = 1.0,
                 max_new_tokens: int = 4096, seed: int | list[int] | None = None) -> list[list[Completion]]:
        model, tok = self.model, self.processor.tokenizer
        device = next(model.parameters()).device
        stop = {tok.convert_tokens_to_ids("<|im_end|>"), tok.pad_token_id}
        seeds = row_seeds(rows, seed)
        # A sharded model's forward is a collective: every rank must run the same modules in the same
        # order. So all ranks generate all ranks' rows, in one order with the same seeds, each keeping
        # its own share; synced_gpus keeps them stepping together until every sequence is done.
        from torch.distributed.fsdp import FSDPModule

        offset, mine = 0, len(rows)
        sharded = isinstance(model, FSDPModule) and dist.get_world_size() > 1
        if sharded:
            shares = [None] * dist.get_world_size()
            dist.all_gather_object(shares, (rows, seeds))
            offset = sum(len(r) for r, _ in shares[:dist.get_rank()])
            rows, seeds = [r for rs, _ in shares for r in rs], [s for _, ss in shares for s in ss]
        was_training = model.training
        model.eval()
        results = []
        for row, row_seed in zip(rows, seeds):
            enc = to_device(dict(self.processor(text=[render_prompt(self.processor, row)],
                                                images=row_images(row) or None, return_tensors="pt")), device)
            if row_seed is not None:
                torch.manual_seed(row_seed)
            sample = temperature > 0
            # Every sampling setting given: generate fills the others from the checkpoint's
            # generation_config.json (Qwen2.5-VL's: repetition_penalty 1.05), which vLLM ignores
            out = model.generate(**enc, do_sample=sample, temperature=temperature if sample else None,
                                 top_p=top_p if sample else None, top_k=None, repetition_penalty=1.0,
                                 num_return_sequences=n,
                                 max_new_tokens=max_new_tokens, suppress_tokens=self.suppress, use_cache=True,
                                 output_logits=True, return_dict_in_generate=True, synced_gpus=sharded,
                                 pad_token_id=tok.pad_token_id, eos_token_id=sorted(stop))
            new = out.sequences[:, enc["input_ids"].shape[1]:]                               # (n, L)
            logp = torch.log_softmax(torch.stack(out.logits, 1).float(), -1)                 # (n, L, V) raw
            logp = logp.gather(-1, new[..., None])[..., 0]                                   # (n, L)
            completions = []
            for ids, lps in zip(new.tolist(), logp.tolist()):
                end = next((j + 1 for j, t in enumerate(ids) if t in stop), None)
                ids, lps = ids[:end], lps[:end]
                completions.append(Completion(ids, tok.decode(ids, skip_special_tokens=True), lps,
                                              "stop" if end else "length"))
            results.append(completions)
        model.train(was_training)
        return results[offset:offset + mine]

    def update_weights(self, model) -> None:
        """Nothing to do: generation runs on the training model itself."""

    def sleep(self) -> None:
        pass

    def close(self) -> None:
        pass


def make_engine(kind: str, model_path: str, processor, model=None, **vllm_kwargs):
    """`vllm` (default everywhere vLLM is installed) or `hf` (transformers' generate on `model`)."""
    if kind == "vllm":
        return VLLMEngine(model_path, processor, **vllm_kwargs)
    if kind == "hf":
        return HFEngine(model, processor)
    raise ValueError(f"unknown rollout engine {kind!r} (vllm or hf)")
