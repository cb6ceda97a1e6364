"""sft.py: the loss mask, 1 vs 2 ranks, gradient accumulation, overfitting, kill and resume."""
import json

import pytest
import torch
from safetensors.torch import load_file

import model
import sft
from conftest import kill_when, run_script, make_toy_rows



def trace_rows(k: int = 8) -> list[dict]:
    rows = make_toy_rows(k)
    for row in rows:
        row["reasoning"] = f"The lesion in study {row['dataset_index']} sits on the {row['answer'].lower()} side."
    return rows


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory) -> str:
    from datasets import Dataset

    path = tmp_path_factory.mktemp("sft") / "traces"
    # two rows without a trace at the end (reasoning None, as prepare and filter leave it): every run
    # skips them with a count and trains on the same 8 rows as without them
    untraced = [{**row, "dataset_index": 8 + i} for i, row in enumerate(make_toy_rows(2))]
    Dataset.from_list(trace_rows() + untraced).save_to_disk(str(path))
    return str(path)


def sft_cli(args: list[str], ranks: int = 1, **kw):
    return run_script("sft.py", args, ranks, **kw)


def final_weights(out) -> dict:
    last = sorted((out / "checkpoints").glob("step_*"))[-1]
    return load_file(str(last / "model.safetensors"))


def losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_loss_mask_is_exactly_the_assistant_turn(processor):
    tok = processor.tokenizer
    text_row = trace_rows()[1]
    assert not text_row["images"]
    full = processor.apply_chat_template(model.build_messages(text_row) + [
        {"role": "assistant", "content": [{"type": "text", "text": model.sft_target(text_row)}]}], tokenize=False)
    assert full.endswith("<|im_end|>\n")  # the newline is trained on too, as the official collator did
    enc = tok(full, return_offsets_mapping=True)
    start = full.rindex(sft.ASSISTANT_HEADER) + len(sft.ASSISTANT_HEADER)
    expected = [s >= start for s, _ in enc["offset_mapping"]]
    prompt, target = sft.encode(processor, text_row)
    batch = model.collate([prompt], [target], tok.pad_token_id)
    assert batch["input_ids"][0].tolist() == enc["input_ids"]  # same tokens as the rendered chat
    assert batch["completion_mask"][0].tolist() == expected
    assert tok.decode(batch["input_ids"][0][batch["completion_mask"][0]]) == model.sft_target(text_row) + "<|im_end|>\n"
    assert target[-2:] == tok("<|im_end|>\n")["input_ids"] and len(tok("<|im_end|>\n")["input_ids"]) == 2


def test_pre_rendered_text_rows_encode_like_reasoning_rows(processor):
    for row in trace_rows()[:2]:  # an image row and a text row
        full = processor.apply_chat_template(model.build_messages(row) + [
            {"role": "assistant", "content": [{"type": "text", "text": model.sft_target(row)}]}], tokenize=False)
        rendered = {**row, "reasoning": None, "text": full}
        (p1, t1), (p2, t2) = sft.encode(processor, row), sft.encode(processor, rendered)
        assert t1 == t2 and p1["input_ids"].tolist() == p2["input_ids"].tolist()
        assert (p1["pixel_values"] is None) == (p2["pixel_values"] is None)


COMMON = ["--dtype", "float32", "--lr", "1e-3", "--warmup-ratio", "0.25"]


LORA = ["--lora-rank", "8"]


@pytest.mark.parametrize("flags, two_rank_flags", [([], ["--offload"]), (LORA, LORA)], ids=["full", "lora"])
def test_one_rank_and_two_ranks_train_the_same(tiny_path, sft_data, tmp_path, flags, two_rank_flags):
    # No clipping here: the gradient norm is summed in another order over shards than in one process
    # (equal to ~1e-7 relative), and a clip scale that differs in its last bit moves every weight a bit.
    # Full fine-tuning's two ranks keep their shards, gradients and AdamW state in host memory
    # (--offload): where the state lives changes nothing.
    args = COMMON + ["--model", tiny_path, "--data", sft_data, "--global-batch", "4", "--micro-batch", "2",
                     "--epochs", "2", "--max-steps", "3", "--save-every", "100", "--grad-clip", "1e9"]
    one = sft_cli(args + flags + ["--out", str(tmp_path / "one")])
    two = sft_cli(args + two_rank_flags + ["--out", str(tmp_path / "two")], ranks=2)
    assert one.returncode == 0 and two.returncode == 0, one.stderr[-3000:] + two.stderr[-3000:]
    assert "2 ranks x 2 sequences x 1 accumulation" in two.stdout and "1 ranks x 2 sequences x 2 accumulation" in one.stdout
    assert "skipping 2 of 10 rows with no reasoning trace" in one.stdout and "8 rows, 2 steps per epoch" in one.stdout
    assert losses(tmp_path / "one") == pytest.approx(losses(tmp_path / "two"), rel=1e-6)
    a, b = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_gradient_accumulation_gives_the_same_update(tiny_path, sft_data, tmp_path):
    args = COMMON + ["--model", tiny_path, "--data", sft_data, "--global-batch", "8", "--epochs", "1", "--max-steps", "1"]
    whole = sft_cli(args + ["--micro-batch", "8", "--out", str(tmp_path / "whole")])
    split = sft_cli(args + ["--micro-batch", "2", "--out", str(tmp_path / "split"), "--peak-tflops", "0.5",
                            "--report-to", "tensorboard"])
    assert whole.returncode == 0 and split.returncode == 0, whole.stderr[-3000:] + split.stderr[-3000:]
    (w,), (s,) = [[json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
                  for d in ("whole", "split")]
    # telemetry: the same tokens either way; MFU only with a peak (none on CPU), no device memory on CPU
    assert w["train_tok_s"] * w["s_step"] == pytest.approx(s["train_tok_s"] * s["s_step"], rel=1e-2)
    assert w["mfu"] is None and s["mfu"] == pytest.approx(s["tflops"] / 0.5) and s["peak_mem_gb"] is None
    # --report-to tensorboard: the step's record in tensorboard's event file too
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / "split" / "tensorboard")).Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, pytest.approx(s["loss"]))]
    assert losses(tmp_path / "whole") == pytest.approx(losses(tmp_path / "split"), rel=1e-5)
    a, b, init = final_weights(tmp_path / "whole"), final_weights(tmp_path / "split"), load_file(f"{tiny_path}/model.safetensors")
    # AdamW's first step is lr * g / (|g| + eps): where a gradient is near eps, the last bits of its sum
    # (4 micro-batches or 1) move the update by up to ~1e-3 lr (measured 1.02e-6 at lr 1e-3)
    assert all(torch.allclose(a[k], b[k], atol=2e-6, rtol=0) for k in a)
    assert sum(not torch.equal(a[k], init[k]) for k in a) == len(a)


QUESTIONS = ["Which side is the nodule on?", "Where does the effusion collect?", "Which lobe shows consolidation?",
             "What does the fracture line cross?"]


def with_a_trained_scale_head(tiny_path: str, out) -> str:
    """The tiny model with lm_head x 10, the logit scale of a trained model. LoRA leaves lm_head and the
    final norm frozen, and the random init's logits (|h| |w| <= 2.6 against 151,936 others) bound its
    loss above ~9.4: a trained model's head is what LoRA works through."""
    m = model.load_model(tiny_path)
    with torch.no_grad():
        m.lm_head.weight.mul_(10)
    m.save_pretrained(out)
    model.load_processor(tiny_path).save_pretrained(out)
    return str(out)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_overfits_a_few_traces_and_generates_them(tiny_path, processor, tmp_path, lora):
    from datasets import Dataset

    rows = [{**row, "question": q} for row, q in zip(trace_rows(4), QUESTIONS)]
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "four"))
    out = tmp_path / "overfit"
    start, flags = ((with_a_trained_scale_head(tiny_path, tmp_path / "start"), LORA + ["--epochs", "60", "--lr", "1e-2"])
                    if lora else (tiny_path, ["--epochs", "120", "--lr", "5e-3"]))
    run = sft_cli(["--model", start, "--data", str(tmp_path / "four"), "--global-batch", "4", "--micro-batch", "4",
                   "--warmup-ratio", "0", "--dtype", "float32", "--save-every", "1000", "--out", str(out)] + flags,
                  env={"OMP_NUM_THREADS": "2"})  # one process alone: both cores
    assert run.returncode == 0, run.stderr[-3000:]
    curve = losses(out)
    assert curve[-1] < curve[0] / 20, curve
    trained = model.load_model(str(sorted((out / "checkpoints").glob("step_*"))[-1]))  # plain transformers
    exact = []
    for row in rows:  # two image rows, two text rows
        enc = processor(text=[model.render_prompt(processor, row)], images=model.row_images(row) or None,
                        return_tensors="pt")
        ids = trained.generate(**enc, do_sample=False, max_new_tokens=64, eos_token_id=151645)[0, enc["input_ids"].shape[1]:]
        exact.append(processor.tokenizer.decode(ids, skip_special_tokens=True) == model.sft_target(row))
    # a 2-layer, 128-wide model: most traces come back word for word (4 of 4 measured; at 80 epochs the
    # two text rows, which differ only in the question, came back 3 of 4 or 2 of 4, by the seed's luck)
    assert sum(exact) >= 3, exact


@pytest.mark.parametrize("flags", [[], LORA], ids=["full", "lora"])
def test_kill_and_resume_is_bit_identical(tiny_path, sft_data, tmp_path, flags):
    args = COMMON + ["--model", tiny_path, "--data", sft_data, "--global-batch", "4", "--micro-batch", "2",
                     "--epochs", "2", "--save-every", "1"] + flags
    full = sft_cli(args + ["--out", str(tmp_path / "full")])
    assert full.returncode == 0, full.stderr[-3000:]
    out = tmp_path / "killed"
    kill_when("sft.py", args + ["--out", str(out)], (out / "checkpoints" / "step_000002" / "trainer_state.json").exists)
    assert not (out / "checkpoints" / "step_000004").exists()
    resumed = sft_cli(args + ["--out", str(out), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = final_weights(tmp_path / "full"), final_weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses(out)[-1] == losses(tmp_path / "full")[-1]
    last = sorted((out / "checkpoints").glob("step_*"))[-1]
    resume = sum(f.stat().st_size for f in (last / "resume").rglob("*") if f.is_file())
    if flags:  # LoRA: the resume state is the adapters and their AdamW state; the frozen base comes from --model
        assert resume < (last / "model.safetensors").stat().st_size / 50
