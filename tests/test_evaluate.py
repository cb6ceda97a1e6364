"""evaluate.py: scoring on scripted completions, the tiny model end to end, resuming after a kill,
rows longer than the context (tensor parallel 2), one table over commands, Qwen3-VL from GRPO to
evaluation. Two runs' checkpoints (SFT, GRPO) in one table: tests/test_demo.py."""
import json
from pathlib import Path

import pytest

import evaluate
import model
from conftest import kill_when, make_eval_rows, run_script



def evaluate_cli(args: list[str], ranks: int = 1, **kw):
    return run_script("evaluate.py", args, ranks, **kw)


def test_scoring_scripted_completions():
    rows = make_eval_rows()
    scripted = {
        0: "<think>a</think><answer>A</answer>",        # pmc_vqa, label A: right, formatted
        7: "The answer is: D",                          # pmc_vqa, label D: lenient right via the fallback
        1: "<think>x</think><answer>\nB\n</answer>",    # MMMU label B: lenient right, strict 0 (newline quirk)
        8: "<answer>C</answer>",                        # MMMU two images, label D: wrong
    }
    records = []
    for i, row in enumerate(rows):
        text = scripted.get(i, "<think>no idea</think><answer>Z</answer>")
        records.append(evaluate.score(row, text, tokens=10 + i))
    summary = evaluate.summarize(records)
    labels = {i: row["answer_label"] for i, row in enumerate(rows)}
    assert labels[0] == "A" and labels[7] == "D" and labels[1] == "B" and labels[8] == "D"
    # pmc_vqa rows 0 and 7: both right for the lenient grader; only row 0 is formatted for strict
    assert summary["pmc_vqa"]["lenient"] == 100.0 and summary["pmc_vqa"]["strict"] == 50.0
    assert summary["pmc_vqa"]["format_fail"] == 50.0 and summary["pmc_vqa"]["tokens"] == (10 + 17) / 2
    # MMMU rows 1, 2, 8, 9: lenient right on row 1 only
    assert summary["MMMU-medical"]["rows"] == 4
    assert summary["MMMU-medical"]["lenient"] == 25.0 and summary["MMMU-medical"]["strict"] == 0.0
    for name in ("MedXpertQA-MM", "pathvqa_closed", "slake_closed", "vqa_rad_closed"):
        assert summary[name]["lenient"] == 0.0 and summary[name]["format_fail"] == 0.0
    assert summary["Avg."]["lenient"] == pytest.approx((100 + 25) / 6)
    assert summary["Avg."]["strict"] == pytest.approx(50 / 6)
    assert list(summary)[:6] == evaluate.BENCHMARKS
    table = evaluate.table({"scripted": summary}, compare_paper=True)
    assert "| scripted | lenient | 100.00 | 25.00 |" in table and "| GPT-4o (paper) | lenient | 58.55 |" in table


def test_tiny_end_to_end_counts_match_results(tiny_path, eval_data, tmp_path):
    run = evaluate_cli(["--model", tiny_path, "--data", eval_data, "--max-new-tokens", "8", "--vllm-dtype", "float32",
                        "--out", str(tmp_path)])
    assert run.returncode == 0, run.stderr[-5000:]
    name = tiny_path.strip("/").replace("/", "__")
    records = [json.loads(line) for line in (tmp_path / name / "results.jsonl").read_text().splitlines()]
    summary = json.loads((tmp_path / name / "summary.json").read_text())["mean"]
    assert len(records) == len({r["key"] for r in records}) == 14
    for bench in evaluate.BENCHMARKS:
        assert summary[bench]["rows"] == sum(r["dataset_name"] == bench for r in records)
        assert summary[bench]["lenient"] == 100 * sum(r["lenient"] for r in records if r["dataset_name"] == bench) / summary[bench]["rows"]
    assert all(0 < r["tokens"] <= 8 for r in records)
    assert "| " + tiny_path + " | lenient |" in run.stdout
    # every record names what produced it: a re-run reuses only records of this checkpoint and settings
    checkpoint = json.loads((tmp_path / name / "summary.json").read_text())["checkpoint"]
    assert checkpoint.startswith(str(Path(tiny_path).resolve()) + "@")
    assert all(r["checkpoint"] == checkpoint and r["generation"]["max_new_tokens"] == 8 for r in records)


def test_kill_and_rerun_no_row_twice_none_missing(tiny_path, eval_data, tmp_path):
    args = ["--model", tiny_path, "--data", eval_data, "--max-new-tokens", "6", "--rollout", "hf", "--chunk-rows", "2"]
    reference = evaluate_cli(args + ["--out", str(tmp_path / "ref")])
    assert reference.returncode == 0, reference.stderr[-3000:]
    name = tiny_path.strip("/").replace("/", "__")
    results = tmp_path / "killed" / name / "results.jsonl"
    kill_when("evaluate.py", args + ["--out", str(tmp_path / "killed")],
              lambda: results.exists() and len(results.read_text().splitlines()) >= 4, timeout=300)
    partial = len(results.read_text().splitlines())
    assert 4 <= partial < 14, partial
    with open(results, "a") as f:  # as if the kill had come in the middle of writing a record
        f.write('{"key": "vqa_rad_closed/13", "repeat": 0, "compl')
    rerun = evaluate_cli(args + ["--out", str(tmp_path / "killed")])
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "rows already done" in rerun.stdout and "last line was cut short" in rerun.stdout
    keys = [json.loads(line)["key"] for line in results.read_text().splitlines()]
    assert len(keys) == len(set(keys)) == 14
    ref_summary = json.loads((tmp_path / "ref" / name / "summary.json").read_text())["mean"]
    assert json.loads((tmp_path / "killed" / name / "summary.json").read_text())["mean"] == ref_summary


def test_rows_longer_than_the_context_are_scored_as_failures(tiny_path, eval_data, tmp_path):
    # One vLLM engine over two ranks (tensor parallel 2): chunks of 3 rows give the ranks 2 and 1 rows,
    # then 1 and none; rank 0's rows (two images each) do not fit, rank 1's (text) do. Each rank must
    # run as many group collectives as its partner, whatever its rows (else: a hang).
    run = evaluate_cli(["--model", tiny_path, "--data", eval_data, "--benchmarks", "MMMU-medical", "--max-new-tokens", "4",
                        "--max-model-len", "110", "--vllm-dtype", "float32", "--tensor-parallel", "2",
                        "--chunk-rows", "3", "--out", str(tmp_path)], ranks=2)
    assert run.returncode == 0, run.stderr[-5000:]
    name = tiny_path.strip("/").replace("/", "__")
    records = {r["key"]: r for r in map(json.loads, (tmp_path / name / "results.jsonl").read_text().splitlines())}
    assert len(records) == 4 and run.stdout.count("not evaluated, scored as failed: a prompt of 124 tokens") == 2
    for text_row in ("MMMU-medical/2", "MMMU-medical/9"):
        assert records[text_row]["tokens"] > 0  # fits, and generated beside the partner's refused rows
    for two_images in ("MMMU-medical/1", "MMMU-medical/8"):
        assert records[two_images]["tokens"] == 0 and not records[two_images]["lenient"]
    summary = json.loads((tmp_path / name / "summary.json").read_text())["mean"]
    assert summary["MMMU-medical"]["refused"] == summary["Avg."]["refused"] == 2  # counted, not only logged


def test_models_evaluated_one_command_each_share_one_table(tiny_path, eval_data, tmp_path):
    common = ["--data", eval_data, "--benchmarks", "pmc_vqa", "--rollout", "hf", "--max-new-tokens", "4", "--out", str(tmp_path)]
    # under torchrun several models are refused before anything loads: one process per model
    refused = evaluate_cli(["--model", tiny_path, "tiny"] + common, env={"TORCHELASTIC_RUN_ID": "test"})
    assert refused.returncode != 0 and "one --model per command" in refused.stderr
    for name in (tiny_path, "tiny"):  # a loop of commands, as the README shows for torchrun
        run = evaluate_cli(["--model", name] + common)
        assert run.returncode == 0, run.stderr[-3000:]
    table = (tmp_path / "table.md").read_text()
    assert f"| {tiny_path} | lenient |" in table and "| tiny | lenient |" in table
    assert table.index(f"| {tiny_path} |") < table.index("| tiny |")  # in the order evaluated
    # other rows are another table: a model evaluated on them is not put beside the others
    fewer = evaluate_cli(["--model", "tiny", "--limit", "1"] + common)
    assert fewer.returncode == 0, fewer.stderr[-3000:]
    assert f"| {tiny_path} |" not in (tmp_path / "table.md").read_text()


def test_qwen3_vl_grpo_then_evaluate_its_checkpoint(qwen3_path, toy_data, eval_data, tmp_path):
    """The second family end to end: two GRPO steps with vLLM rollouts and weight syncs (the canary
    holds), a checkpoint that plain transformers loads, and evaluate.py scoring it through vLLM."""
    run = run_script("grpo.py", ["--model", qwen3_path, "--data", toy_data, "--max-steps", "2", "--prompts-per-step", "4",
                                 "--group-size", "2", "--mini-batch", "2", "--micro-batch", "4",
                                 "--max-response-tokens", "12", "--lr", "1e-3", "--vllm-dtype", "float32",
                                 "--out", str(tmp_path / "grpo")])
    assert run.returncode == 0, run.stderr[-5000:]
    metrics = [json.loads(line) for line in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and all(m["canary_max"] < 1e-3 for m in metrics)
    saved = tmp_path / "grpo" / "checkpoints" / "step_000002"
    assert type(model.load_model(str(saved))).__name__ == "Qwen3VLForConditionalGeneration"
    scored = evaluate_cli(["--model", str(tmp_path / "grpo"), "--data", eval_data, "--limit", "1",
                           "--max-new-tokens", "8", "--vllm-dtype", "float32", "--out", str(tmp_path / "eval")])
    assert scored.returncode == 0, scored.stderr[-5000:]
    summary = json.loads(next((tmp_path / "eval").glob("*/summary.json")).read_text())
    assert "step_000002" in summary["checkpoint"] and summary["mean"]["Avg."]["rows"] == 6
