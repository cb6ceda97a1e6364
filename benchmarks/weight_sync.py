"""vLLM weight sync seconds vs parameter count: streamed (ours) vs a full state-dict copy.

    python benchmarks/weight_sync.py                               # tiny, 512 x 4 layers, 1024 x 8 layers
    python benchmarks/weight_sync.py --sizes tiny 2048x4 --repeats 5

The policy is held as grpo.py holds it: fp32, FSDP2-sharded (one rank here), and the engine is
rollout.VLLMEngine (in-process vLLM, fp32). Two ways to push the policy's weights into it:
  streamed   engine.update_weights(policy): one parameter at a time is gathered (full_tensor),
             loaded by vLLM's reload_weights and dropped; then the prefix- and encoder-cache resets
  full copy  the whole state dict gathered first (torch.distributed.checkpoint's
             get_model_state_dict, full_state_dict=True, cpu_offload=True: what a trainer would
             call to "get the weights"), then the same reload_weights call and resets. On one rank
             that gather returns views of the local shards; on N ranks it allocates a full copy,
             so the copy is made explicit here (clone)
Seconds: best and mean of --repeats syncs after one warm-up sync of each way; CPU seconds of the
process alongside (they barely move when other work shares the cores). Extra memory: the largest
RSS seen during the syncs (polled every 2 ms) minus RSS just before them.
Models: `tiny` (model.resolve_model) and random Qwen2.5-VL of text hidden H and L layers ("HxL"),
the real 151,936-token vocabulary, built like tiny.build_tiny and saved to a temporary directory.
Each model is measured in a fresh process. Run with OMP_NUM_THREADS=1 (set by default).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def build_random(hidden: int, layers: int, out: Path) -> str:
    """A random Qwen2.5-VL with the tiny model's tokenizer and processor, text hidden `hidden`,
    `layers` decoder layers, head_dim 128 (Qwen2.5-VL's), 2 KV heads, a 4-block vision tower."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    import model

    tiny = Path(model.resolve_model("tiny"))
    config = json.loads((tiny / "config.json").read_text())
    for key in ("architectures", "transformers_version", "dtype", "model_type"):
        config.pop(key, None)
    text = config["text_config"]
    heads = max(hidden // 128, 1)
    head_dim = hidden // heads
    t = head_dim // 8  # mrope_section in Qwen's 2:3:3 ratio, summing to head_dim / 2
    text.update(hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=min(2, heads), layer_types=["full_attention"] * layers)
    rest = head_dim // 2 - t
    text["rope_parameters"]["mrope_section"] = [t, rest // 2, rest - rest // 2]
    config["vision_config"].update(depth=4, hidden_size=256, intermediate_size=512, num_heads=4,
                                   fullatt_block_indexes=[1, 3], out_hidden_size=hidden)
    torch.manual_seed(0)
    policy = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**config))
    policy.save_pretrained(out)
    for f in tiny.iterdir():  # tokenizer, processor, chat template, generation config
        if f.name not in ("config.json", "model.safetensors"):
            shutil.copy(f, out / f.name)
    return str(out)


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def measure_one(size: str, repeats: int) -> dict:
    """Runs in the child process."""
    sys.path.insert(0, str(ROOT))
    import torch
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    import model
    import rollout

    model.init_distributed()
    tmp = Path(tempfile.mkdtemp(prefix="weight-sync-"))
    try:
        if size == "tiny":
            path = model.resolve_model("tiny")
        else:
            hidden, layers = (int(x) for x in size.split("x"))
            path = build_random(hidden, layers, tmp)
        processor = model.load_processor(path)
        policy = model.load_model(path, dtype=torch.float32)
        params = sum(p.numel() for p in policy.parameters())
        model.shard_model(policy, param_dtype=torch.float32)  # as grpo.py holds it (DTensor shards)
        engine = rollout.VLLMEngine(path, processor, max_model_len=1024, max_images=1, dtype="float32")

        def full_copy() -> None:
            state = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            state = {name: t.clone() for name, t in state.items()}  # 1 rank: the gather returned views; N ranks copy
            engine.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(state.items())})
            engine.llm.reset_prefix_cache()
            engine.llm.llm_engine.reset_encoder_cache()
            del state

        ways = {"streamed": lambda: engine.update_weights(policy), "full copy": full_copy}
        for sync in ways.values():
            sync()  # warm-up
        out = {"size": size, "params": params, "bytes_fp32": params * 4}
        for name, sync in ways.items():
            base, peak, done = rss_bytes(), [0], threading.Event()

            def poll():
                while not done.is_set():
                    peak[0] = max(peak[0], rss_bytes())
                    time.sleep(0.002)

            poller = threading.Thread(target=poll, daemon=True)
            poller.start()
            seconds, cpu = [], []
            for _ in range(repeats):
                start, start_cpu = time.perf_counter(), time.process_time()
                sync()
                seconds.append(time.perf_counter() - start)
                cpu.append(time.process_time() - start_cpu)
            done.set()
            poller.join()
            out[name] = {"best_s": min(seconds), "mean_s": sum(seconds) / len(seconds), "best_cpu_s": min(cpu),
                         "extra_rss_mb": max(peak[0] - base, 0) / 2**20}
        # the engine really holds the policy's weights: greedy text agrees with transformers'
        row = {"images": [], "question": "Which side?", "options": {"A": "left", "B": "right"}, "answer_label": "A"}
        with torch.no_grad():  # nudge the policy so a sync that did nothing would show
            for p in policy.parameters():
                p.mul_(1.01)
        engine.update_weights(policy)
        got = engine.generate([row], n=1, temperature=0.0, max_new_tokens=8)[0][0]
        enc = model.build_batch(processor, [row], [got.token_ids])
        want = model.token_logprobs(policy, enc)[enc["completion_mask"]]
        out["max_logprob_gap_after_sync"] = (torch.tensor(got.logprobs) - want).abs().max().item()
        engine.close()
        return out
    finally:
        model.cleanup_distributed()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["tiny", "512x4", "1024x8"], help="tiny or HIDDENxLAYERS")
    p.add_argument("--repeats", type=int, default=3, help="timed syncs per way")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--table", default=None, help="only print the table of results saved with --json")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print("RESULT " + json.dumps(measure_one(args.child, args.repeats)), flush=True)
        return
    if args.table:
        return print_table(json.loads(Path(args.table).read_text()), args.repeats, os.environ.get("OMP_NUM_THREADS", "1"))

    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    results = []
    for size in args.sizes:
        out = subprocess.run([sys.executable, __file__, "--child", size, "--repeats", str(args.repeats)],
                             capture_output=True, text=True, env=env)
        line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if out.returncode or not line:
            sys.exit(f"{size} failed (rc {out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        results.append(json.loads(line[-1][7:]))
        print(json.dumps(results[-1]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print_table(results, args.repeats, env["OMP_NUM_THREADS"])


def print_table(results: list[dict], repeats: int, threads: str) -> None:
    print(f"\nvLLM weight sync (in-process vLLM, fp32, FSDP2 policy on 1 rank), threads {threads}; "
          f"best of {repeats} after a warm-up (mean), CPU seconds of the best, extra RSS during the syncs")
    print("| model | params | fp32 GiB | streamed s (mean) | CPU s | extra RSS MiB | full copy s (mean) | CPU s | "
          "extra RSS MiB | log-prob gap after sync |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        cells = [r["size"], f"{r['params'] / 1e6:.1f} M", f"{r['bytes_fp32'] / 2**30:.2f}"]
        for way in (r["streamed"], r["full copy"]):
            cells += [f"{way['best_s']:.3f} ({way['mean_s']:.3f})", f"{way['best_cpu_s']:.3f}", f"{way['extra_rss_mb']:,.0f}"]
        print("| " + " | ".join(cells + [f"{r['max_logprob_gap_after_sync']:.1e}"]) + " |")


if __name__ == "__main__":
    main()
