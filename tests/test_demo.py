"""`make demo`, small: toy data -> SFT on the imperfect teacher's traces -> pass counts + filter ->
GRPO from the SFT model with vLLM rollouts and greedy evaluations (evaluate.py's) before the first
step and after the last -> evaluate.py over both runs' last checkpoints, one table. The demo's stage
scripts and flags; fewer pass-count samples, prompts per step and steps. GRPO must raise the sampled
reward over the run and the greedy test accuracy above the SFT start: a wrong advantage sign, a
stale weight sync or a broken loss shows up as a flat or falling curve. The same GRPO with LoRA
adapters (one-GPU runs), on two ranks, must raise the test accuracy as well."""
import json

import torch
from safetensors.torch import load_file

import model
from conftest import run_script
from tools.demo_report import trend

STEPS = "6"
TWO_THREADS = {"OMP_NUM_THREADS": "2"}  # like `make demo`


def test_small_demo_learns(tmp_path):
    d = str(tmp_path)
    stages = [
        ("curate.py", ["toy", "--out", f"{d}/data", "--train", "512", "--test", "32"]),
        ("sft.py", ["--model", "tiny", "--data", f"{d}/data/sft", "--global-batch", "8", "--micro-batch", "8",
                    "--epochs", "2", "--lr", "3e-3", "--out", f"{d}/sft"]),
        ("curate.py", ["passcount", "--model", f"{d}/sft", "--data", f"{d}/data/train", "--samples", "2",
                       "--max-new-tokens", "64", "--vllm-dtype", "float32", "--out", f"{d}/data/passcount"]),
        ("curate.py", ["filter", "--data", f"{d}/data/passcount", "--min", "1", "--max", "1", "--out", f"{d}/data/grpo"]),
        ("grpo.py", ["--model", f"{d}/sft", "--data", f"{d}/data/grpo", "--prompts-per-step", "4", "--group-size", "8",
                     "--mini-batch", "4", "--micro-batch", "16", "--lr", "3e-4", "--warmup-steps", "3", "--kl-coef", "0.1",
                     "--max-response-tokens", "64", "--max-steps", STEPS, "--eval-data", f"{d}/data/test",
                     "--eval-every", STEPS, "--save-every", "0", "--vllm-dtype", "float32", "--out", f"{d}/grpo"]),
        ("evaluate.py", ["--model", f"{d}/grpo", f"{d}/sft", "--data", f"{d}/data/test", "--max-new-tokens", "64",
                         "--vllm-dtype", "float32", "--out", f"{d}/eval"]),
    ]
    for script, args in stages:
        run = run_script(script, args, env=TWO_THREADS)
        assert run.returncode == 0, f"{script} {args[0]}\n" + run.stdout[-2000:] + run.stderr[-4000:]
    lines = [json.loads(line) for line in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
    rewards = [m["reward"] for m in lines if "reward" in m]
    accuracy = {m["step"]: m["eval"]["Avg."]["lenient"] for m in lines if "eval" in m}
    print("rewards", rewards, "test accuracy", accuracy)
    assert_lora_grpo_learns(d, stages[4][1], accuracy[0])
    assert len(rewards) == int(STEPS) and sorted(accuracy) == [0, int(STEPS)]
    assert 50 <= accuracy[0] <= 90, "the SFT start must be middling: the teacher mistakes most H&E tiles"
    assert trend(rewards) > 0, rewards
    assert accuracy[int(STEPS)] >= accuracy[0] + 10, accuracy
    # evaluate.py on the two run directories (their last checkpoints) in one table: the saved models
    # score what grpo.py's in-training evaluations of the same weights scored (greedy, same rows)
    table = (tmp_path / "eval" / "table.md").read_text()
    for run, step in ((f"{d}/grpo", int(STEPS)), (f"{d}/sft", 0)):
        assert f"| {run} | lenient | {accuracy[step]:.2f} | {accuracy[step]:.2f} |" in table, table


def assert_lora_grpo_learns(d: str, grpo_flags: list[str], start_accuracy: float) -> None:
    """The demo's GRPO with rank-8 LoRA adapters (10x the learning rate, as LoRA wants) on two ranks:
    the engines get the merged adapted blocks after each update (canary), the reference is the policy
    with its adapters off, and the test accuracy rises like the full run's (75 -> 100 measured)."""
    flags = grpo_flags[:grpo_flags.index("--out")] + ["--lora-rank", "8", "--lr", "1e-2", "--out", f"{d}/grpo-lora"]
    run = run_script("grpo.py", flags, ranks=2)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    assert "reference model: the policy with its LoRA adapters off" in run.stdout
    lines = [json.loads(line) for line in open(f"{d}/grpo-lora/metrics.jsonl")]
    accuracy = {m["step"]: m["eval"]["Avg."]["lenient"] for m in lines if "eval" in m}
    print("LoRA test accuracy", accuracy)
    assert accuracy[0] == start_accuracy and accuracy[int(STEPS)] >= start_accuracy + 10, accuracy
    assert all(m["canary_mean"] < 1e-3 and m["canary_max"] < 1e-2 for m in lines if "reward" in m)
    # the merged checkpoint: only the adapted projections moved; the adapters beside it, for peft
    ckpt = f"{d}/grpo-lora/checkpoints/step_{int(STEPS):06d}"
    saved, before = (load_file(f"{path}/model.safetensors") for path in (ckpt, model.resolve_model(f"{d}/sft")))
    moved = [k for k in saved if not torch.equal(saved[k], before[k])]
    assert moved and all(k.startswith("model.layers.") and k.endswith("_proj.weight") for k in moved), moved
    assert json.loads(open(f"{ckpt}/adapter/adapter_config.json").read())["r"] == 8
