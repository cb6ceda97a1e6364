"""plan.py: parameter counts against transformers' models, FLOPs against torch's FlopCounterMode, the
memory plan against memory measured while training the tiny model on two ranks, refusals before
anything is loaded, and the README's table.

Run as a script (under torchrun) this file is the measuring worker of
test_plan_matches_memory_measured_on_two_ranks."""
import json
import re
import sys
import time

import pytest
import torch

from conftest import MEASURE_ENV, ROOT, make_image, make_toy_rows, run_script  # first: run as a script, it puts ROOT on sys.path
import model  # noqa: E402
import plan  # noqa: E402


@pytest.mark.parametrize("hub_id", sorted(plan.SHAPES))
def test_builtin_shapes_build_the_published_models(hub_id):
    config, model_class = plan.builtin_config(hub_id)
    with torch.device("meta"):
        m = model_class(config)
    counts = plan.param_counts(plan.shapes(hub_id))
    blocks = [*m.model.visual.blocks, *m.model.language_model.layers]
    assert counts["total"] == sum(p.numel() for p in m.parameters())       # tied weights counted once
    assert counts["vision"] == sum(p.numel() for p in m.model.visual.parameters())
    assert counts["layer"] == sum(p.numel() for p in m.model.language_model.layers[0].parameters())
    assert counts["root"] == counts["total"] - sum(p.numel() for b in blocks for p in b.parameters())
    # the checkpoints' parameter counts as loaded by transformers (the hub's numParameters for Qwen2.5-VL-7B
    # and Qwen3-VL-8B; the others agree with the hub's rounded sizes)
    published = {"Qwen2.5-VL-3B": 3_754_622_976, "Qwen2.5-VL-7B": 8_292_166_656, "Qwen2.5-VL-32B": 33_452_718_336,
                 "Qwen3-VL-2B": 2_127_532_032, "Qwen3-VL-4B": 4_437_815_808, "Qwen3-VL-8B": 8_767_123_696,
                 "Qwen3-VL-32B": 33_357_390_064}[hub_id.split("/")[1].removesuffix("-Instruct")]
    assert counts["total"] == published


def test_tiny_shapes_come_from_its_config(tiny_path, tiny_model):
    counts = plan.param_counts(plan.shapes("tiny"))
    assert counts["total"] == sum(p.numel() for p in tiny_model.parameters())
    assert counts["vision"] == sum(p.numel() for p in tiny_model.model.visual.parameters())


def assert_flops_counted(m, shapes, batch):
    from torch.utils.flop_counter import FlopCounterMode

    for backward in (False, True):
        with FlopCounterMode(display=False) as counter:
            logp = model.token_logprobs(m, batch)
            if backward:
                logp.sum().backward()
        recompute = backward * 2 * shapes.hidden * shapes.vocab * int(batch["completion_mask"][:, 1:].sum())
        assert plan.batch_flops(shapes, batch, backward) == pytest.approx(counter.get_total_flops() - recompute, rel=1e-9)


def test_qwen3_vl_shapes_and_flops(qwen3_path):
    """Qwen3-VL's tiny model: its parameters counted from its config (q/k norms, LayerNorms, the position
    grid, the DeepStack merger), and the matmuls of its GELU vision MLP, full attention in every vision
    block and the DeepStack merger as torch counts them."""
    from transformers import AutoModelForImageTextToText

    m = AutoModelForImageTextToText.from_pretrained(qwen3_path, attn_implementation="eager").train()
    shapes = plan.shapes(qwen3_path)
    assert (shapes.family, shapes.deepstack, shapes.window, shapes.v_mlp_mats) == ("qwen3-vl", 1, 0, 2)
    counts = plan.param_counts(shapes)
    assert counts["total"] == sum(p.numel() for p in m.parameters())
    assert counts["vision"] == sum(p.numel() for p in m.model.visual.parameters())
    rows = make_toy_rows(4)[:3:2]
    rows[0]["images"], rows[1]["images"] = [make_image(7, (224, 160))], [make_image(8, (224, 160))]
    batch = model.build_batch(model.load_processor(qwen3_path), rows, [[100 + i for i in range(25)], [300 + i for i in range(25)]])
    assert batch["attention_mask"].all() and len(batch["image_grid_thw"]) == 2
    assert_flops_counted(m, shapes, batch)


def test_flops_equal_torch_flop_counter(tiny_path, processor):
    """plan.flops counts exactly the matmuls torch's FlopCounterMode sees in forward and backward
    (eager attention, so that attention runs as counted matmuls; no padding), less the log-prob
    head's recomputation of its logits in backward, which plan.flops leaves out like any
    recomputation."""
    from transformers import AutoModelForImageTextToText

    m = AutoModelForImageTextToText.from_pretrained(tiny_path, attn_implementation="eager").train()
    rows = make_toy_rows(4)[:3:2]  # two image rows of the same length
    rows[0]["images"], rows[1]["images"] = [make_image(7, (224, 168))], [make_image(8, (224, 168))]
    batch = model.build_batch(processor, rows, [[100 + i for i in range(25)], [300 + i for i in range(25)]])
    assert batch["attention_mask"].all() and batch["image_grid_thw"].tolist() == [[1, 12, 16]] * 2
    # a 12 x 16 patch grid is 6 x 8 merged tokens: windows of 4 x 4, 4 x 4, 2 x 4, 2 x 4 (uneven edges)
    shapes = plan.shapes(tiny_path)
    assert plan.vision_attention_spans(shapes, 1, 12, 16) == ((12 * 16) ** 2, 2 * 64 ** 2 + 2 * 32 ** 2)
    assert_flops_counted(m, shapes, batch)
    # padding is not counted: the same two rows padded in a batch with a longer third one
    padded = model.build_batch(processor, rows + [rows[0]], [[100] * 25, [300] * 25, [5] * 60])
    assert padded["input_ids"].shape[1] > batch["input_ids"].shape[1]
    first_two = {k: padded[k][:2] for k in ("attention_mask", "completion_mask", "image_grid_thw")}
    assert plan.batch_flops(shapes, first_two) == plan.batch_flops(shapes, batch)


def test_peak_flops_and_the_performance_line():
    assert plan.peak_tflops(torch.device("cpu")) is None        # no honest peak on CPU: MFU is null
    assert plan.peak_tflops(torch.device("cpu"), 2.5) == 2.5
    assert next(t for k, t in plan.PEAK_TFLOPS if k in "NVIDIA H100 80GB HBM3") == 989.0
    assert next(t for k, t in plan.PEAK_TFLOPS if k in "NVIDIA H100 PCIe") == 756.0
    m = {"rollout_tok_s": 512.4, "train_tok_s": 100.0, "tflops": 0.25, "mfu": None, "peak_mem_gb": None,
         "peak_rss_mb": 2048.7, "s_rollout": 1.25, "s_update": 2.0}
    assert plan.perf_line(m) == ("rollout 512 tok/s train 100 tok/s 0.25 TFLOP/s mfu - mem - GB rss 2049 MB "
                                 "time rollout 1.2s update 2.0s")
    assert "mfu 38.2% mem 71.5 GB" in plan.perf_line(m | {"mfu": 0.382, "peak_mem_gb": 71.5})


# ---- the plan against memory measured on CPU: two ranks train the tiny model ----

MICRO, COMPLETION, ACCUMULATION = 4, 120, 2


def worker(lora_rank: int = 0) -> None:
    """One rank: RSS before the model exists, then FSDP2 training like sft.py's (fp32, gradient
    checkpointing, AdamW, MICRO x ACCUMULATION sequences per step, 3 steps; with lora_rank, LoRA
    adapters on the frozen base); prints the exact bytes of this rank's trained and frozen parameter,
    gradient and optimizer shards and the peak RSS increase."""
    import lora
    import peft  # noqa: F401  (imported before the RSS baseline: its modules are not training memory)

    rank, world, device = model.init_distributed()
    path = model.resolve_model("tiny")
    processor = model.load_processor(path)
    batch = model.build_batch(processor, make_toy_rows(MICRO), [[100 + i] * COMPLETION for i in range(MICRO)])
    before = plan.peak_rss_mb()
    policy = model.load_model(path, dtype=torch.float32).train()
    if lora_rank:
        lora.add_adapters(policy, lora.lora_config(lora_rank, 2 * lora_rank, lora.TARGETS))
    model.enable_gradient_checkpointing(policy)
    model.shard_model(policy, param_dtype=torch.float32)
    optimizer = model.adamw(policy, 1e-4, (0.9, 0.999), 0.0)
    for step in range(3):
        for _ in range(ACCUMULATION):
            logp = model.token_logprobs(policy, batch)
            (-(logp * batch["completion_mask"]).sum() / batch["completion_mask"].sum()).backward()
        grads = sum(p.grad.to_local().nbytes for p in policy.parameters() if p.grad is not None)
        model.clip_and_step(policy, optimizer, 1.0, step + 1)
    shard_bytes = lambda params: sum(p.to_local().nbytes for p in params)  # noqa: E731
    print(json.dumps({"rank": rank, "params": shard_bytes(p for p in policy.parameters() if p.requires_grad),
                      "frozen": shard_bytes(p for p in policy.parameters() if not p.requires_grad), "grads": grads,
                      "optimizer": sum(v.to_local().nbytes for s in optimizer.state.values() for v in s.values()
                                       if hasattr(v, "to_local")),
                      "rss_increase_mib": plan.peak_rss_mb() - before, "seq_len": batch["input_ids"].shape[1],
                      "image_tokens": int(batch["image_grid_thw"][:, 1:].prod(1).max()) // 4}), flush=True)
    del policy, optimizer
    model.cleanup_distributed()


@pytest.mark.parametrize("lora_rank", [0, 8])
def test_plan_matches_memory_measured_on_two_ranks(tiny_path, lora_rank):
    # without MEASURE_ENV, LoRA's peak read 11-14% over the plan: glibc's slack, not the plan's
    run = run_script("tests/test_plan.py", ["worker", str(lora_rank)], ranks=2, env=MEASURE_ENV)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [json.loads(line) for line in re.findall(r'\{"rank"[^{}]*\}', run.stdout)]  # the ranks' lines may interleave
    assert len(ranks) == 2, run.stdout[-3000:]
    shapes = plan.shapes(tiny_path)
    P = plan.param_counts(shapes)["total"]
    T = plan.lora_params(shapes, lora_rank) or P  # the trained parameters
    r = plan.Run("sft", world=2, micro_batch=MICRO, seq_len=ranks[0]["seq_len"], logit_tokens=COMPLETION,
                 image_tokens=ranks[0]["image_tokens"], compute_bytes=4, reserve_gib=0.0, lora_params=T if lora_rank else 0)
    predicted = plan.plan_memory(shapes, r)
    rows = {what.split(" (")[0]: gib * plan.GiB for what, gib, _ in predicted.rows}
    for rank in ranks:
        # exact: the sharded state is 4 bytes per parameter / 2 ranks (FSDP2 pads dim 0 to even shards)
        trained = rows["LoRA adapter weights" if lora_rank else "policy weights"]
        assert rank["params"] == pytest.approx(trained, rel=1e-3) == pytest.approx(4 * T / 2, rel=1e-3)
        assert rank["frozen"] == pytest.approx(rows.get("frozen base weights", 0), rel=1e-3)
        assert rank["grads"] == pytest.approx(rows["gradients"], rel=1e-3)
        assert rank["optimizer"] == pytest.approx(rows["AdamW m and v"], rel=1e-3)
        # the whole training peak, measured as the RSS increase over the process before the model
        # existed, is within 10% of the plan (measured on 2026-12-06: 1% over it, LoRA 3% over)
        measured, planned = rank["rss_increase_mib"], predicted.phases["update"] * 1024
        print(f"rank {rank['rank']}: measured {measured:.0f} MiB, planned {planned:.0f} MiB")
        assert 0.9 * planned < measured < 1.1 * planned


def test_train_step_benchmark_counts_its_tokens_and_flops(tiny_path, tmp_path):
    """benchmarks/train_step.py (the GPU MFU benchmark) on CPU with the tiny model: it trains, and its
    tokens/s and TFLOP/s are the batches' real tokens and plan.flops over its step time."""
    out = tmp_path / "step.json"
    flags = ["--model", "tiny", "--dtype", "float32", "--seq-len", "96", "--image-tokens", "6", "--completion", "32",
             "--micro-batch", "2", "--micro-batches", "2", "--steps", "2", "--skip", "1", "--json", str(out)]
    refused = run_script("benchmarks/train_step.py", flags + ["--gpu-memory-gb", "0.01"])  # the planner, first
    assert refused.returncode == 2 and "DOES NOT FIT" in refused.stdout and not out.exists(), refused.stderr[-3000:]
    run = run_script("benchmarks/train_step.py", flags + ["--gpu-memory-gb", "80"])
    assert run.returncode == 0, run.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["tokens_per_s_per_gpu"] * r["s_per_step"] == pytest.approx(2 * 2 * 96)
    grids = [(1, 2 * 2, 2 * 3)] * 2  # 6 merged tokens: 2 x 3, of 4 patches each
    expected = 2 * plan.flops(plan.shapes(tiny_path), [96, 96], 2 * 32, grids)
    assert r["tflops_per_gpu"] * 1e12 * r["s_per_step"] == pytest.approx(expected)
    assert r["mfu"] is None and "| tiny | 1 | cpu | float32 | on | 2 x 2 x 96 |" in run.stdout


# ---- refusals and the command line ----

def test_impossible_configuration_is_refused_before_anything_loads(toy_data, tmp_path):
    started = time.time()
    plan_only = run_script("sft.py", ["--plan", "--model", "qwen2.5-vl-32b", "--world-size", "1"])
    assert plan_only.returncode == 2, plan_only.stderr[-2000:]
    assert "DOES NOT FIT: the update phase needs" in plan_only.stdout and "33.45 B parameters" in plan_only.stdout
    assert f"update {recipe_plan('sft', 'qwen2.5-vl-32b', 1, 1, 1)[1].phases['update']:.1f} GiB" in plan_only.stdout
    # a real run (not --plan) checks the same plan first: on CPU when --gpu-memory-gb is given
    run = run_script("grpo.py", ["--model", "tiny", "--data", toy_data, "--out", str(tmp_path / "run"),
                                 "--gpu-memory-gb", "0.5"])
    assert run.returncode == 2, run.stderr[-2000:]
    assert "DOES NOT FIT" in run.stdout and "rows," not in run.stdout and not (tmp_path / "run").exists()
    assert time.time() - started < 120  # two interpreter start-ups; nothing is loaded


def test_plan_flag_fits_and_prints_the_table():
    run = run_script("grpo.py", ["--plan", "--model", "qwen2.5-vl-7b", "--world-size", "8", "--tensor-parallel", "2",
                                 "--ref-offload"])
    assert run.returncode == 0, run.stderr[-2000:]
    assert "8 GPUs x 80 GiB" in run.stdout and "bf16 compute" in run.stdout and run.stdout.rstrip().endswith("fits")
    assert re.search(r"vLLM KV cache \([\d,]+ tokens\)", run.stdout)
    _, p = recipe_plan("grpo", "qwen2.5-vl-7b", 8, 2, 32)  # the flags map onto the plan the README's table shows
    assert f"peak: rollout {p.phases['rollout']:.1f} GiB, update {p.phases['update']:.1f} GiB of 80 GiB" in run.stdout


RECIPES = {  # the README's table: stage, model, GPUs, vLLM tensor parallel, micro-batch[, token budget]; the recipe's
    "GRPO 3B, 8 x 80 GiB": ("grpo", "qwen2.5-vl-3b", 8, 2, 32),          # other defaults
    "GRPO 7B, 8 x 80 GiB": ("grpo", "qwen2.5-vl-7b", 8, 2, 32),
    "GRPO 7B, 8 x 80 GiB, --max-tokens-per-forward 0": ("grpo", "qwen2.5-vl-7b", 8, 2, 32, 0),
    "GRPO 32B, 8 x 80 GiB": ("grpo", "qwen2.5-vl-32b", 8, 4, 16),
    "GRPO 32B, 4 x 8 x 80 GiB": ("grpo", "qwen2.5-vl-32b", 32, 4, 16),
    "SFT 3B, 8 x 80 GiB": ("sft", "qwen2.5-vl-3b", 8, 1, 1),
    "SFT 7B, 8 x 80 GiB": ("sft", "qwen2.5-vl-7b", 8, 1, 1),
    "SFT 32B, 8 x 80 GiB": ("sft", "qwen2.5-vl-32b", 8, 1, 1),
    "SFT 32B, 4 x 8 x 80 GiB": ("sft", "qwen2.5-vl-32b", 32, 1, 1),
    "GRPO Qwen3-VL 4B, 8 x 80 GiB": ("grpo", "qwen3-vl-4b", 8, 2, 32),  # the recipe's flags on Qwen3-VL
    "GRPO Qwen3-VL 8B, 8 x 80 GiB": ("grpo", "qwen3-vl-8b", 8, 2, 32),
    "GRPO Qwen3-VL 32B, 4 x 8 x 80 GiB": ("grpo", "qwen3-vl-32b", 32, 4, 16),
    "SFT Qwen3-VL 8B, 8 x 80 GiB": ("sft", "qwen3-vl-8b", 8, 1, 1),
    "SFT Qwen3-VL 32B, 4 x 8 x 80 GiB": ("sft", "qwen3-vl-32b", 32, 1, 1),
}


def recipe_plan(stage: str, name: str, W: int, tp: int, micro: int,
                budget: int = plan.DEFAULT_TOKENS_PER_FORWARD) -> tuple[plan.Shapes, plan.Plan]:
    """What `grpo.py --plan --ref-offload` / `sft.py --plan` compute for these flags (bf16, 80 GiB)."""
    s = plan.shapes(name)
    if stage == "grpo":  # 2048 prompt + 4096 response tokens, images filling the prompt, vLLM at 0.6, packed
        r = plan.Run("grpo", W, micro, 6144, 4096, 2048, packed=True, tokens_per_forward=budget, ref="host", vllm=True,
                     tensor_parallel=tp, max_model_len=6144, step_sequences=256 * 8 // W)
    else:                # 32768 tokens, 2048 of them image tokens
        r = plan.Run("sft", W, micro, 32768, 32768, 2048)
    return s, plan.plan_memory(s, r)


def readme_row(s: plan.Shapes, p: plan.Plan, label: str) -> str:
    rows = {what.split(" (")[0]: gib for what, gib, _ in p.rows}
    state = rows["policy weights"] + rows["gradients"] + rows["AdamW m and v"]
    activations = sum(gib for what, gib, _ in p.rows if what.startswith("activations"))
    rollout = f"{p.phases['rollout']:.1f}" if "rollout" in p.phases else "-"
    return (f"| {label} | {rollout} | {p.phases['update']:.1f} | {state:.1f} | {activations:.1f} | "
            f"{f'{p.kv_tokens:,}' if p.kv_tokens else '-'} | {p.host_peak:.0f} | {'yes' if p.fits else 'no'} |")


def test_recipe_plans_are_sane_and_match_the_readme():
    readme = (ROOT / "README.md").read_text()
    for label, recipe in RECIPES.items():
        stage, name, W, tp = recipe[:4]
        s, p = recipe_plan(*recipe)
        P = plan.param_counts(s)["total"]
        rows = {what.split(" (")[0]: gib for what, gib, _ in p.rows}
        assert rows["policy weights"] * plan.GiB == pytest.approx(4 * P / W, rel=0.01)
        assert rows["AdamW m and v"] == pytest.approx(2 * rows["policy weights"])
        if stage == "grpo":
            assert rows["vLLM weights"] * plan.GiB == pytest.approx(2 * P / tp, rel=0.01)   # bf16: 2 bytes a parameter
            assert p.phases["rollout"] == pytest.approx(0.6 * 80 + 3 * rows["policy weights"] + plan.RESERVE_GIB)
        assert p.phases["update"] > 3 * rows["policy weights"] + rows["activations: saved layer inputs"]
        assert readme_row(s, p, label) in readme, f"README's memory table is stale: {readme_row(s, p, label)}"
    fits = {label: recipe_plan(*recipe)[1].fits for label, recipe in RECIPES.items()}
    assert fits["GRPO 7B, 8 x 80 GiB"] and not fits["GRPO 32B, 8 x 80 GiB"] and fits["SFT 32B, 4 x 8 x 80 GiB"]
    # every recipe model fits 80 GiB GPUs with the default token budget; 32 unsplit sequences do not
    assert fits["GRPO 3B, 8 x 80 GiB"] and fits["GRPO 32B, 4 x 8 x 80 GiB"]
    assert not fits["GRPO 7B, 8 x 80 GiB, --max-tokens-per-forward 0"]
    assert all(fit for label, fit in fits.items() if "Qwen3-VL" in label)


def test_offload_moves_a_lora_base_to_host_memory_too():
    """FSDP2's CPU offload takes every sharded parameter, the frozen base with the adapters: with LoRA,
    --offload frees c P / W of GPU memory and holds it in host memory instead."""
    import dataclasses

    s = plan.shapes("qwen2.5-vl-7b")
    P, T = plan.param_counts(s)["total"], plan.lora_params(s, 64)
    lora = plan.Run("sft", 1, 1, 4096, 4096, 512, lora_params=T)
    on_gpu, offloaded = plan.plan_memory(s, lora), plan.plan_memory(s, dataclasses.replace(lora, offload=True))
    saved = on_gpu.phases["update"] - offloaded.phases["update"]
    assert saved * plan.GiB == pytest.approx(2 * P + 16 * T, rel=1e-6)  # the bf16 base, the adapters' fp32 state
    host = lambda p: sum(gib for _, gib in p.host[1:])  # noqa: E731  (what is held after the start-up read)
    assert (host(offloaded) - host(on_gpu)) * plan.GiB == pytest.approx(2 * P + 16 * T, rel=1e-6)


ONE_GPU = ["--plan", "--world-size", "1", "--gpu-memory-gb", "80"]
NO_OFFLOAD = "python grpo.py --model qwen2.5-vl-3b --ref-offload --data ROWS --out runs/grpo-3b"  # the starting point


def one_gpu_row(command: str, capsys) -> tuple[str, bool]:
    """The README's one-GPU table row of `command`: what its --plan prints for one 80 GiB GPU."""
    import grpo
    import sft

    script, *args = command.split()[1:]
    with pytest.raises(SystemExit) as stop:
        {"grpo.py": grpo.main, "sft.py": sft.main}[script](args + ONE_GPU)
    out = capsys.readouterr().out
    peak = re.search(r"peak: (?:rollout ([\d.]+) GiB, )?update ([\d.]+) GiB", out)
    host = float(re.search(r"peak per node: ([\d.]+) GiB", out)[1])
    label = re.sub(r" --(data|out) \S+", "", command)
    fits = stop.value.code == 0
    return f"| `{label}` | {peak[1] or '-'} | {peak[2]} | {host:.0f} | {'yes' if fits else 'no'} |", fits


def test_one_gpu_commands_plan_as_fitting_and_match_the_readme(capsys):
    section = (ROOT / "README.md").read_text().split("## One GPU")[1].split("\n## ")[0]
    commands = re.findall(r"^python (?:sft|grpo)\.py .*$", section, re.M)
    assert len(commands) == 5 and any("--offload" in c for c in commands) and any("--lora-rank" in c for c in commands)
    for command in commands + [NO_OFFLOAD]:
        row, fits = one_gpu_row(command, capsys)
        assert row in section, f"README's one-GPU table is stale: {row}"
        assert fits == (command != NO_OFFLOAD), row  # 3B's GRPO needs --offload on one card; the rest fit


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    worker(int(sys.argv[2]))
