"""grpo.py end to end on CPU: two ranks with vLLM rollouts, kill -9 and resume, prompt-length policy."""
import json

import pytest
import torch
from safetensors.torch import load_file

import data
import model
from batching import balanced_order
from conftest import kill_when, run_script

SMALL = ["--prompts-per-step", "4", "--group-size", "4", "--mini-batch", "2", "--micro-batch", "4",
         "--max-response-tokens", "20", "--lr", "1e-3", "--dump-every", "1", "--vllm-dtype", "float32"]


def grpo(args: list[str], ranks: int = 1, **kw):
    return run_script("grpo.py", args, ranks, **kw)


def weights(path) -> dict:
    return load_file(str(path / "model.safetensors"))


def metrics_of(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_update(packed: list[dict], padded: list[dict]) -> None:
    """Packed and padded forwards train on the same numbers: the first step's loss, KL and gradient
    norm to 1e-5 relative, and so the second step samples the same completions (the same rewards)."""
    for key in ("loss", "kl", "grad_norm"):
        assert abs(packed[0][key] - padded[0][key]) <= 1e-5 * abs(padded[0][key]) + 1e-9, key
    assert [m["reward"] for m in packed] == [m["reward"] for m in padded]
    assert [m["response_len"] for m in packed] == [m["response_len"] for m in padded]


def test_two_steps_on_two_ranks_with_vllm(sft_tiny, toy_data, tmp_path):
    out = tmp_path / "run"
    flags = ["--model", sft_tiny, "--data", toy_data, "--max-steps", "2", "--save-every", "2", "--weight-decay", "0",
             "--filter-zero-variance"] + SMALL
    run = grpo(flags + ["--out", str(out)], ranks=2)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    assert "reference model: frozen copy" in run.stdout
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    print(metrics)
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        # finite, no NaN; on CPU there is no device memory and no peak FLOP/s: those two are null
        assert all(isinstance(v, (int, float)) and v == v or v is None and k in ("mfu", "peak_mem_gb") for k, v in m.items())
        assert m["rollout_tok_s"] > 0 and m["train_tok_s"] >= 0 and m["tflops"] >= 0 and m["peak_rss_mb"] > 500
        assert all(m[f"s_{phase}"] >= 0 for phase in ("rollout", "reward", "logprobs", "update", "sync"))
        # engine == trainer after each sync (fp32 rounding in different kernels; one update moves ~0.1)
        assert m["canary_mean"] < 1e-3 and m["canary_max"] < 1e-2
        dumped = [json.loads(line) for line in (out / "rollouts" / f"step_{m['step']:06d}.jsonl").read_text().splitlines()]
        groups = [[d["reward"] for d in dumped[i:i + 4]] for i in range(0, len(dumped), 4)]
        assert len(groups) == 4 and m["reward"] == sum(map(sum, groups)) / 16
        assert m["zero_var_groups"] == sum(len(set(g)) == 1 for g in groups) / 4
        # verl's balance: every sequence trained on the rank balanced_order gives it, by its valid tokens
        order = balanced_order([d["tokens"] for d in dumped], 2)
        assert [d["rank"] for d in dumped] == [order.index(j) // 8 for j in range(16)]
        assert all(d["tokens"] > 20 for d in dumped)  # prompt (with its image tokens) + completion
    assert 0 < sum(m["reward"] for m in metrics) < 2, "the start model must be right only sometimes"
    assert sum(m["train_tok_s"] for m in metrics) > 0 and sum(m["tflops"] for m in metrics) > 0
    before, after = weights(model.Path(sft_tiny)), weights(out / "checkpoints" / "step_000002")
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, unchanged  # no weight decay: every tensor moved through its gradient
    assert metrics[0]["kl"] > 0 and metrics[0]["grad_norm"] > 0  # the second update moved away from the reference


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_kill_and_resume_is_bit_identical(sft_tiny, toy_data, tmp_path, lora):
    common = ["--model", sft_tiny, "--data", toy_data, "--max-steps", "3", "--save-every", "1", "--rollout", "hf",
              "--kl-coef", "0", "--warmup-steps", "2"] + SMALL + ["--mini-batch", "4"]  # one update a step: on-policy
    common += ["--lora-rank", "8", "--lr", "1e-2"] if lora else []  # LoRA: resume/ holds the adapters alone
    full = grpo(common + ["--out", str(tmp_path / "full")])
    assert full.returncode == 0, full.stderr[-5000:]
    assert "reference model: none" in full.stdout
    if not lora:
        padded = grpo(common + ["--out", str(tmp_path / "padded"), "--no-packing", "--max-steps", "2"])
        assert padded.returncode == 0, padded.stderr[-5000:]
        assert_same_update(metrics_of(tmp_path / "full")[:2], metrics_of(tmp_path / "padded"))
        lrs = [json.loads(line)["lr"] for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
        assert lrs == [5e-4, 1e-3, 1e-3]  # linear warm-up over 2 steps, then --lr
    # the same run, killed with SIGKILL as soon as its first checkpoint is complete
    out = tmp_path / "killed"
    kill_when("grpo.py", common + ["--out", str(out)], (out / "checkpoints" / "step_000001" / "trainer_state.json").exists)
    assert not (out / "checkpoints" / "step_000003").exists()
    resumed = grpo(common + ["--out", str(out), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-5000:]
    assert "resumed from" in resumed.stdout
    a, b = weights(tmp_path / "full" / "checkpoints" / "step_000003"), weights(out / "checkpoints" / "step_000003")
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[-2:] == [2, 3]


def test_over_long_prompts_stop_or_skip(tiny_path, processor, toy_data, tmp_path):
    rows = data.load_rows(toy_data)
    lengths = [len(model.encode_prompt(processor, r)["input_ids"]) for r in rows]
    limit = max(n for n, r in zip(lengths, rows) if not r["images"])  # text rows fit, image rows do not
    assert limit < min(n for n, r in zip(lengths, rows) if r["images"])
    args = ["--model", tiny_path, "--data", toy_data, "--max-steps", "1", "--rollout", "hf", "--kl-coef", "0",
            "--max-prompt-tokens", str(limit), "--out", str(tmp_path / "run")] + SMALL
    stopped = grpo(args)
    assert stopped.returncode != 0
    assert "4 prompts exceed --max-prompt-tokens" in stopped.stderr and "dataset_index 0" in stopped.stderr
    skipped = grpo(args + ["--skip-long-prompts"])
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    assert f"skipping 4 prompts over {limit} tokens" in skipped.stdout and "4 rows, 1 steps per epoch" in skipped.stdout
