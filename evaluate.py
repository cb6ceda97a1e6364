"""Evaluate checkpoints on the six medical VQA benchmarks of MedVLThinker (SPEC.md section 7).

Greedy decoding (temperature 0, max 4096 new tokens, seed 42) with the training prompt, through the
rollout engine (vLLM, or --rollout hf), data parallel over torchrun ranks. Every finished row is
appended to `OUT/NAME/results.jsonl` (completion, extracted answer, both verdicts, token count), so
a killed evaluation picks up where it stopped. Each record names what produced it (the resolved
checkpoint, saved when, and the generation settings): a re-run reuses only records of the same
checkpoint and settings, so a run directory that got a newer checkpoint is evaluated afresh. The
summary gives accuracy per benchmark and their unweighted average with two graders side by side:
`lenient` (reward.is_correct, the paper's metric) and `strict` (reward.reward, the training reward:
format required), plus the format failure rate and the mean response length.

    python evaluate.py --model qwen2.5-vl-3b runs/7b-rl-m23k/checkpoints/step_000320 --compare-paper
    torchrun --nproc_per_node 8 evaluate.py --model qwen2.5-vl-7b --repeats 3
    python evaluate.py --model tiny --data EVAL_DIR --limit 20 --rollout hf       # CPU smoke test

Several --model values are evaluated in turn, each in a process of its own (plain python; under
torchrun, a loop of commands), and `OUT/table.md` gathers every model evaluated into OUT on the same
rows with the same settings. grpo.py calls `run` and `summarize` for in-training eval.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import checkpoints as C
import data as D
import model as M
import rollout
import reward as R

BENCHMARKS = ["pmc_vqa", "MMMU-medical", "MedXpertQA-MM", "pathvqa_closed", "slake_closed", "vqa_rad_closed"]
# The paper's greedy accuracies (%), same column order, then the average.
PAPER = {
    "Qwen2.5-VL-3B-Instruct": [44.77, 44.12, 20.69, 61.96, 61.30, 62.01, 49.14],
    "3B SFT(m23k)": [28.53, 32.55, 16.00, 42.74, 43.91, 33.09, 32.80],
    "3B SFT(PMC)": [54.55, 47.84, 21.46, 52.76, 65.79, 58.58, 50.16],
    "3B RL(m23k)": [47.32, 52.16, 22.90, 62.28, 63.38, 71.08, 53.19],
    "3B RL(PMC)": [54.22, 48.43, 21.51, 51.61, 75.56, 62.38, 52.28],
    "Qwen2.5-VL-7B-Instruct": [49.30, 52.94, 18.89, 65.39, 65.71, 68.75, 53.50],
    "7B SFT(PMC)": [54.67, 49.80, 21.39, 53.02, 67.71, 57.72, 50.72],
    "7B RL(m23k)": [50.67, 56.86, 24.43, 66.83, 65.79, 64.71, 54.88],
    "7B RL(PMC)": [55.38, 55.29, 24.11, 57.09, 66.59, 63.48, 53.66],
    "Qwen2.5-VL-32B-Instruct": [53.28, 63.92, 27.68, 67.98, 73.24, 75.12, 60.20],
    "32B RL(m23k)": [54.37, 70.00, 34.60, 68.82, 73.96, 76.96, 63.12],
    "GPT-4o": [58.55, 68.82, 35.95, 72.43, 76.44, 70.22, 63.74],
}


# ---- scoring: one completion -> one record; records -> a summary ----

def score(row: dict, completion: str, tokens: int, refused: bool = False) -> dict:
    """One result line: both graders' verdicts on one completion (refused: the engine could not take
    the row, scored as failed)."""
    return {"dataset_name": row.get("dataset_name"), "completion": completion, "answer": R.extract_answer(completion),
            "lenient": R.is_correct(completion, row), "strict": R.reward(completion, row) == 1.0,
            "format_ok": R.format_ok(completion), "tokens": tokens, "refused": refused}


def summarize(records: list[dict]) -> dict:
    """Per benchmark (in BENCHMARKS order, then any other dataset_name): rows, lenient and strict
    accuracy (%), format failures (%), mean response tokens, rows the engine refused (scored as
    failed); "Avg." is the unweighted mean, its rows and refused the totals."""
    names = [b for b in BENCHMARKS if any(r["dataset_name"] == b for r in records)]
    names += sorted({r["dataset_name"] for r in records} - set(names))
    out = {}
    for name in names:
        rs = [r for r in records if r["dataset_name"] == name]
        out[name] = {"rows": len(rs), "lenient": 100 * sum(r["lenient"] for r in rs) / len(rs),
                     "strict": 100 * sum(r["strict"] for r in rs) / len(rs),
                     "format_fail": 100 * sum(not r["format_ok"] for r in rs) / len(rs),
                     "tokens": sum(r["tokens"] for r in rs) / len(rs), "refused": sum(r.get("refused", False) for r in rs)}
    if out:
        out["Avg."] = {k: statistics.mean(v[k] for v in out.values()) for k in ("lenient", "strict", "format_fail", "tokens")}
        for total in ("rows", "refused"):
            out["Avg."][total] = sum(v[total] for n, v in out.items() if n != "Avg.")
    return out


def table(summaries: dict[str, dict], compare_paper: bool = False) -> str:
    """Markdown: one row per model and grader (lenient is the paper's metric), paper rows optional.
    A summary value may carry a spread over repeats ("lenient_std")."""
    names = []
    for s in summaries.values():
        names += [n for n in s if n not in names and n != "Avg."]
    head = "| model | grader | " + " | ".join(names) + " | Avg. | format fail % | tokens |"
    lines = [head, "|" + "---|" * (len(names) + 5)]
    for model_name, s in summaries.items():
        for grader in ("lenient", "strict"):
            cells = [f"{s[n][grader]:.2f}" + (f" ± {s[n][grader + '_std']:.2f}" if s[n].get(grader + "_std") else "")
                     if n in s else "" for n in names + ["Avg."]]
            lines.append(f"| {model_name} | {grader} | " + " | ".join(cells)
                         + f" | {s['Avg.']['format_fail']:.1f} | {s['Avg.']['tokens']:.0f} |")
    if compare_paper:
        for paper_name, values in PAPER.items():
            cells = [f"{values[BENCHMARKS.index(n)]:.2f}" if n in BENCHMARKS else "" for n in names]
            lines.append(f"| {paper_name} (paper) | lenient | " + " | ".join(cells) + f" | {values[-1]:.2f} | | |")
    return "\n".join(lines)


# ---- inference: rows -> results.jsonl, resumable ----

def run(engine, rows, results_path: Path, repeat: int = 0, max_new_tokens: int = 4096, seed: int = 42,
        chunk_rows: int = 256, tag: dict | None = None) -> list[dict]:
    """Greedy completions and verdicts for every row, resumable: rows already in `results_path` for
    this repeat and `tag` (what produced them: result_tag) are not run again, new ones are appended
    chunk by chunk with the tag; records of another tag stay in the file, unused. Every rank calls this."""
    def complete(share: list[dict], positions: list[int]) -> list[dict]:
        # Rows the engine would refuse are scored as failures, decided here from the row alone: with
        # tensor parallelism a group generates its ranks' rows together, so one rank's bad row must
        # not fail (or retry apart from) the others'. Any other engine error ends the run.
        refused = [engine.cannot_run(row) for row in share]
        for row, why in zip(share, refused):
            if why:
                print(f"row {row.get('dataset_index')} of {row.get('dataset_name')} not evaluated, scored as failed: "
                      f"{why}", flush=True)
        runnable = [row for row, why in zip(share, refused) if not why]
        outputs = iter(engine.generate(runnable, n=1, temperature=0.0, max_new_tokens=max_new_tokens,
                                       seed=[seed] * len(runnable)))
        none = rollout.Completion([], "", [], "refused")
        return [score(row, out.text, len(out.token_ids), bool(why)) for row, why in zip(share, refused)
                for out in [none if why else next(outputs)[0]]]

    return D.resumable_map(complete, rows, results_path, chunk_rows, tag={**(tag or {}), "repeat": repeat}, desc="rows")


def result_tag(path: str, args) -> dict:
    """What a result depends on besides its row: the checkpoint (model_id: a run directory's newest
    complete checkpoint, saved when) and the generation settings. Every record carries it, and a
    re-run only reuses records with the same one: a newer checkpoint or other settings start afresh
    in the same results.jsonl, and are never mixed with the old records."""
    return {"checkpoint": C.model_id(path), "generation": generation(args)}


def generation(args) -> dict:
    settings = {"engine": args.rollout, "temperature": 0.0, "max_new_tokens": args.max_new_tokens, "seed": args.seed}
    if args.rollout == "vllm":  # what else changes vLLM's outputs: which rows fit, the weights' dtype, the kernels
        settings.update(max_model_len=args.max_model_len, dtype=args.vllm_dtype, tensor_parallel=args.tensor_parallel)
    return settings


def load_eval_rows(args) -> list[dict]:
    data = D.load_rows(args.data, args.split)
    D.check_rows(data, args.data, D.ROW_COLUMNS + ("dataset_name",))  # results are keyed on dataset_index
    if args.benchmarks:
        wanted = set(args.benchmarks)
        data = data.filter(lambda name: name in wanted, input_columns="dataset_name")
    if args.limit:  # the first --limit rows of each benchmark
        seen, keep = {}, []
        for i, name in enumerate(data["dataset_name"]):
            seen[name] = seen.get(name, 0) + 1
            if seen[name] <= args.limit:
                keep.append(i)
        data = data.select(keep)
    return [data[i] for i in range(len(data))]


def write_table(args, out: Path) -> str:
    """OUT/table.md from every OUT/*/summary.json of the same rows and generation settings as this
    run, in the order they were evaluated: one table whether the models ran in one command or in a
    loop of commands. Returns the table."""
    summaries = []
    for f in out.glob("*/summary.json"):
        s = json.loads(f.read_text())
        if s.get("selection") == selection(args) and s["generation"] == generation(args):
            summaries.append((f.stat().st_mtime, s["model"], s["mean"]))
    text = table({name: mean for _, name, mean in sorted(summaries, key=lambda x: x[0])}, args.compare_paper)
    (out / "table.md").write_text(text + "\n")
    return text


def selection(args) -> dict:
    return {"data": args.data, "split": args.split, "benchmarks": args.benchmarks, "limit": args.limit}


def evaluate_each(argv: list[str], args) -> None:
    """Several --model values: `python evaluate.py ... --model NAME` for each in turn, then the one
    table. One process per model because closing a vLLM engine takes torch.distributed's default group
    down with it: a second engine in the same process would need it re-created (which can hang under
    torchrun), and with sleep mode vLLM allows one engine per process."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        raise SystemExit("under torchrun, evaluate one --model per command (a loop of commands, README: Evaluation); "
                         "their table in --out combines them")
    # a one-rank group this process may have made (tests call main in-process) is not the child's
    env = {k: v for k, v in os.environ.items() if k not in M.ONE_RANK_ENV}
    for name in args.model:
        print(f"== {name}", flush=True)
        done = subprocess.run([sys.executable, str(Path(__file__).resolve())] + argv + ["--model", name], env=env)
        if done.returncode:
            raise SystemExit(f"evaluating {name} failed (exit code {done.returncode}); the models before it are done")
    print(write_table(args, Path(args.out)))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", default=["qwen2.5-vl-3b"], help="one or more aliases, hub ids or checkpoints")
    p.add_argument("--data", default="UCSC-VLAA/MedVLThinker-Eval", help="hub name, save_to_disk dir, or parquet/jsonl file")
    p.add_argument("--split", default="test", help="split of a hub dataset or DatasetDict")
    p.add_argument("--benchmarks", nargs="*", default=None, help=f"dataset_name values to keep ({', '.join(BENCHMARKS)})")
    p.add_argument("--limit", type=int, default=0, help="at most this many rows per benchmark (0: all)")
    p.add_argument("--repeats", type=int, default=1, help="greedy runs to average (the paper: 3)")
    p.add_argument("--max-new-tokens", type=int, default=4096, help="response budget")
    p.add_argument("--seed", type=int, default=42, help="engine seed")
    p.add_argument("--rollout", choices=["vllm", "hf"], default="vllm", help="inference engine")
    p.add_argument("--tensor-parallel", type=int, default=1, help="vLLM tensor parallel size (4 for 32B on 8 GPUs)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="vLLM's share of GPU memory")
    p.add_argument("--vllm-dtype", default="auto", help="vLLM weights dtype")
    p.add_argument("--max-model-len", type=int, default=0,
                   help="vLLM context, prompt + response (0: the model's own, at most 32,768: the 4096-token budget "
                        "holds for prompts up to 28,672 tokens; an unresized image can take 16,384)")
    p.add_argument("--chunk-rows", type=int, default=256, help="rows per engine call (results are written per chunk)")
    p.add_argument("--compare-paper", action="store_true", help="print the paper's rows beside ours")
    p.add_argument("--out", default="runs/eval", help="output directory")
    args = p.parse_args(argv)
    D.check_flags(p, args, {"limit": 0, "repeats": 1, "max_new_tokens": 1, "tensor_parallel": 1, "max_model_len": 0,
                            "chunk_rows": 1}, above={"gpu_memory_utilization": 0})
    # every --model named and the data checked before any model loads
    paths = {name: M.resolve_model(name, flag="--model") for name in args.model}
    rows = load_eval_rows(args)
    if len(paths) > 1:
        return evaluate_each(argv, args)
    name, path = next(iter(paths.items()))

    rank, world, device = M.init_distributed()
    engine = None
    try:
        M.print0(f"{len(rows)} rows: " + ", ".join(f"{n} {sum(r['dataset_name'] == n for r in rows)}"
                                                  for n in dict.fromkeys(r["dataset_name"] for r in rows)))
        processor = M.load_processor(path)
        policy = M.load_model(path, device=device) if args.rollout == "hf" else None
        engine = rollout.make_engine(args.rollout, path, processor, model=policy, **(dict(
            max_model_len=args.max_model_len, max_images=max([len(r.get("images") or []) for r in rows] + [1]),
            tensor_parallel_size=args.tensor_parallel, gpu_memory_utilization=args.gpu_memory_utilization,
            seed=args.seed, dtype=args.vllm_dtype) if args.rollout == "vllm" else {}))
        out = Path(args.out) / name.strip("/").replace("/", "__")
        tag = result_tag(path, args)
        M.print0(f"{name}: {tag['checkpoint']}")
        runs = [summarize(run(engine, rows, out / "results.jsonl", repeat, args.max_new_tokens, args.seed,
                              args.chunk_rows, tag)) for repeat in range(args.repeats)]
        summary = {bench: {k: statistics.mean(r[bench][k] for r in runs) for k in runs[0][bench]} for bench in runs[0]}
        if args.repeats > 1:  # spread of the repeated greedy runs
            for bench in summary:
                for grader in ("lenient", "strict"):
                    summary[bench][grader + "_std"] = statistics.pstdev(r[bench][grader] for r in runs)
        if rank == 0:
            (out / "summary.json").write_text(json.dumps({"model": name, **tag, "selection": selection(args),
                                                          "repeats": runs, "mean": summary}, indent=2))
            print(write_table(args, Path(args.out)), flush=True)
    except BaseException as e:
        M.exit_on_error(e)  # several ranks: print it and end the job now, not at the barrier below
        raise
    finally:
        if engine is not None:
            engine.close()
        M.cleanup_distributed()


if __name__ == "__main__":
    main(sys.argv[1:])
