"""The tiny real-architecture Qwen2.5-VL: forward, generate, batches, chunked log-probs, save/load."""
import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForImageTextToText

import checkpoints
import model
import tiny
from conftest import ROOT, SCRIPT_ENV


def completions_for(rows, seed=0, lengths=(9, 4, 13)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 151643, (n,), generator=g).tolist() for n in lengths[:len(rows)]]


def naive_logprobs(m, batch):
    """The obvious way: the full (B, T, V) fp32 logits, log_softmax, gather."""
    inputs = {k: batch[k] for k in model.MODEL_INPUTS if k in batch}
    logits = m(**inputs).logits.float()                                    # (B, T, V)
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    out = torch.zeros(batch["input_ids"].shape)
    out[:, 1:] = logp * batch["completion_mask"][:, 1:]
    return out


def test_forward_with_labels_and_backward(tiny_model, processor, rows):
    batch = model.build_batch(processor, rows, completions_for(rows))
    labels = batch["input_ids"].masked_fill(~batch["completion_mask"], -100)
    inputs = {k: batch[k] for k in model.MODEL_INPUTS if k in batch}
    out = tiny_model(**inputs, labels=labels)
    assert torch.isfinite(out.loss) and 10 < out.loss.item() < 14  # ~ln(151936) = 11.9 for random weights
    out.loss.backward()
    grads = {n: p.grad for n, p in tiny_model.named_parameters()}
    assert grads["model.visual.patch_embed.proj.weight"].abs().sum() > 0  # the image reached the loss
    tiny_model.zero_grad(set_to_none=True)


def test_collate_layout(processor, rows):
    comps = completions_for(rows)
    batch = model.build_batch(processor, rows, comps)
    for i, (row, comp) in enumerate(zip(rows, comps)):
        prompt = model.encode_prompt(processor, row)["input_ids"]
        P, n = len(prompt), len(comp)
        assert batch["input_ids"][i, :P].tolist() == prompt.tolist()
        assert batch["input_ids"][i, P:P + n].tolist() == comp
        assert batch["completion_mask"][i].nonzero()[:, 0].tolist() == list(range(P, P + n))
        assert batch["attention_mask"][i].sum() == P + n
        assert batch["mm_token_type_ids"][i, P:].sum() == 0
        assert batch["mm_token_type_ids"][i].sum() == (batch["input_ids"][i] == 151655).sum()
    assert len(batch["image_grid_thw"]) == 3  # 1 + 2 images, in the order of their tokens


def test_mm_token_type_ids_change_the_positions(tiny_model, processor, rows):
    # Qwen2.5-VL silently uses 1-D positions without mm_token_type_ids: the batch must carry them.
    batch = model.build_batch(processor, rows[:1], completions_for(rows[:1]))
    with torch.no_grad():
        with_ids = model.token_logprobs(tiny_model, batch)
        without = model.token_logprobs(tiny_model, {k: v for k, v in batch.items() if k != "mm_token_type_ids"})
    assert (with_ids - without).abs().max() > 1e-4


@pytest.mark.parametrize("chunk_tokens", [1, 7, 1024])
def test_chunked_logprobs_equal_naive(tiny_model, processor, rows, chunk_tokens):
    batch = model.build_batch(processor, rows, completions_for(rows))
    params = [tiny_model.lm_head.weight, tiny_model.model.visual.patch_embed.proj.weight]
    naive = naive_logprobs(tiny_model, batch)
    naive_grads = torch.autograd.grad(naive.sum(), params)
    chunked = model.token_logprobs(tiny_model, batch, chunk_tokens=chunk_tokens)
    chunked_grads = torch.autograd.grad(chunked.sum(), params)
    assert chunked.shape == batch["input_ids"].shape
    assert (chunked[~batch["completion_mask"]] == 0).all()
    torch.testing.assert_close(chunked, naive, atol=1e-5, rtol=0)
    for a, b in zip(chunked_grads, naive_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)



@pytest.mark.parametrize("packed", [False, True])
def test_sequences_sharing_a_prompt_share_its_pixels(tiny_model, processor, rows, packed):
    """A GRPO group's completions share their prompt: its pixels are in the batch once and the vision
    tower runs once on them, with the same log-probs and gradients as one copy per sequence."""
    encoded = [model.encode_prompt(processor, r) for r in rows[:2]]   # one image, two images
    prompts = [encoded[0], encoded[1], encoded[0], encoded[1], encoded[0]]
    completions = completions_for(rows, lengths=(5, 3, 7)) + completions_for(rows, seed=1, lengths=(4, 6))
    shared = model.collate(prompts, completions, processor.tokenizer.pad_token_id)
    copies = model.collate([dict(p) for p in prompts], completions, processor.tokenizer.pad_token_id)
    assert len(shared["pixel_values"]) == sum(len(e["pixel_values"]) for e in encoded)
    assert len(copies["pixel_values"]) == sum(len(p["pixel_values"]) for p in prompts) and "image_index" not in copies
    assert shared["image_index"].tolist() == [0, 1, 2, 0, 1, 2, 0]
    params = [tiny_model.lm_head.weight, tiny_model.model.visual.patch_embed.proj.weight,
              tiny_model.model.visual.merger.mlp[0].weight]
    results = []
    for batch in (shared, copies):
        batch = model.pack(tiny_model, batch) if packed else batch
        logp = model.token_logprobs(tiny_model, batch)
        results.append((logp, torch.autograd.grad(logp.sum(), params)))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=0)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_qwen3_vl_logprobs_match_transformers(qwen3_path, rows):
    """The second family through the same code: chunked log-probs (padded and packed) equal the full
    logits of transformers' own forward, gradients included (DeepStack's mergers too), and a group's
    shared prompt gives the same numbers as copies."""
    m, processor = model.load_model(qwen3_path), model.load_processor(qwen3_path)
    batch = model.build_batch(processor, rows, completions_for(rows))
    params = [m.lm_head.weight, m.model.visual.patch_embed.proj.weight,
              m.model.visual.deepstack_merger_list[0].linear_fc2.weight]
    naive = naive_logprobs(m, batch)
    naive_grads = torch.autograd.grad(naive.sum(), params)
    assert all(g.abs().sum() > 0 for g in naive_grads)
    for b in (batch, model.pack(m, batch)):
        ours = model.token_logprobs(m, b, chunk_tokens=7)
        grads = torch.autograd.grad(ours.sum(), params)
        torch.testing.assert_close(ours[b["completion_mask"]], naive[batch["completion_mask"]], atol=1e-5, rtol=0)
        for a, g in zip(grads, naive_grads):
            torch.testing.assert_close(a, g, atol=1e-5, rtol=1e-4)
    encoded = model.encode_prompt(processor, rows[1])  # two images, shared by three sequences
    shared = model.collate([encoded] * 3, completions_for(rows), processor.tokenizer.pad_token_id)
    copies = model.collate([dict(encoded) for _ in range(3)], completions_for(rows), processor.tokenizer.pad_token_id)
    assert "image_index" in shared
    torch.testing.assert_close(model.token_logprobs(m, model.pack(m, shared)),
                               model.token_logprobs(m, model.pack(m, copies)), atol=1e-5, rtol=0)


def test_update_logprobs_are_the_old_ones(tiny_path, processor, rows):
    """grpo.py's on-policy shortcut (one update per step: old log-probs = the update's own, detached)
    holds only if train mode, gradient checkpointing and autograd change no value: bit for bit."""
    m = model.load_model(tiny_path)
    model.enable_gradient_checkpointing(m)
    batch = model.build_batch(processor, rows, completions_for(rows))
    m.eval()
    with torch.no_grad():
        old = model.token_logprobs(m, batch)
    m.train()
    logp = model.token_logprobs(m, batch)
    assert logp.requires_grad and torch.equal(logp.detach(), old)

def test_linear_logprobs_backward_with_temperature():
    """LinearLogprobs' hand-written backward (chunks of 8, temperature 2, uneven upstream gradient)
    against autograd through the full log_softmax, twice through one graph."""
    torch.manual_seed(0)
    h, w, t, g = torch.randn(37, 16, requires_grad=True), torch.randn(50, 16, requires_grad=True), \
        torch.randint(0, 50, (37,)), torch.randn(37)
    ours = model.LinearLogprobs.apply(h, w, t, 2.0, 8)
    ref = torch.log_softmax(h @ w.T / 2.0, -1).gather(-1, t[:, None])[:, 0]
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    loss = (ours * g).sum()
    first = torch.autograd.grad(loss, (h, w), retain_graph=True)
    again = torch.autograd.grad(loss, (h, w))  # a second backward through the same graph
    for a, b, c in zip(first, torch.autograd.grad((ref * g).sum(), (h, w)), again):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
        assert torch.equal(a, c)


def test_linear_logprobs_weight_gradient_is_summed_in_fp32():
    """In bf16 (the compute dtype under FSDP2 mixed precision) the lm_head gradient of 1024 tokens in
    64 chunks: within a few bf16 roundings of the fp32 gradient of the same bf16 inputs, as one
    final cast would be, not 64 roundings of a running sum."""
    torch.manual_seed(0)
    h, w = torch.randn(1024, 64).bfloat16(), (torch.randn(256, 64) / 8).bfloat16()
    t, g = torch.randint(0, 256, (1024,)), torch.randn(1024)
    hb, wb = h.clone().requires_grad_(), w.clone().requires_grad_()
    (model.LinearLogprobs.apply(hb, wb, t, 1.0, 16) * g).sum().backward()
    hf, wf = h.float().requires_grad_(), w.float().requires_grad_()
    (torch.log_softmax(hf @ wf.T, -1).gather(-1, t[:, None])[:, 0] * g).sum().backward()
    assert wb.grad.dtype == torch.bfloat16
    one_rounding = (wf.grad.bfloat16().float() - wf.grad).norm()   # the error of the final cast alone
    error = (wb.grad.float() - wf.grad).norm()
    assert error < 3 * one_rounding, (error / one_rounding).item()


def test_temperature_scales_logits(tiny_model, processor, rows):
    batch = model.build_batch(processor, rows[2:], completions_for(rows[2:], lengths=(5,)))
    with torch.no_grad():
        hot = model.token_logprobs(tiny_model, batch, temperature=2.0)
        logits = tiny_model(**{k: batch[k] for k in model.MODEL_INPUTS if k in batch}).logits[0, :-1] / 2.0
    ref = torch.log_softmax(logits, -1).gather(-1, batch["input_ids"][0, 1:, None])[:, 0]
    mask = batch["completion_mask"][0, 1:]
    torch.testing.assert_close(hot[0, 1:][mask], ref[mask], atol=1e-5, rtol=0)


MEMORY_PROBE = r"""
import json, resource, sys, torch
sys.path.insert(0, sys.argv[1])
import model
from test_model import naive_logprobs
torch.manual_seed(0)
processor = model.load_processor(sys.argv[2]); m = model.load_model(sys.argv[2])
rows = [{"images": [], "question": "q " * 40, "options": {"A": "a", "B": "b"}, "answer_label": "A"}] * 2
batch = model.build_batch(processor, rows, [torch.randint(0, 151643, (768,)).tolist()] * 2)
fn = naive_logprobs if sys.argv[3] == "naive" else (lambda m, b: model.token_logprobs(m, b, chunk_tokens=64))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # high-water mark before the computation
fn(m, batch).sum().backward()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"tokens": int(batch["completion_mask"].sum()), "increase_mb": round((peak - base) / 1024)}))
"""


def test_chunked_logprobs_use_less_memory(tiny_path):
    """Peak RSS of forward+backward at the real 151,936 vocabulary, each way in a fresh process."""
    peaks = {}
    for way in ("naive", "chunked"):
        out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(ROOT / "tests"), tiny_path, way],
                             capture_output=True, text=True, check=True, env=SCRIPT_ENV)
        peaks[way] = json.loads(out.stdout.strip().splitlines()[-1])
    print("log-prob peak RSS (forward+backward, 2 x 768 completion tokens):", peaks)
    # naive holds (B, T, V) fp32 logits, their log_softmax and its grad (0.93 GB each); chunked one
    # 64-token chunk's (39 MB) at a time; both hold the weight gradients of embeddings and lm_head (156 MB)
    assert peaks["chunked"]["increase_mb"] * 4 < peaks["naive"]["increase_mb"]


def test_generate_with_image(tiny_model, processor, rows):
    enc = processor(text=[model.render_prompt(processor, rows[0])], images=model.row_images(rows[0]),
                    return_tensors="pt")
    torch.manual_seed(0)
    out = tiny_model.generate(**enc, do_sample=True, temperature=1.0, max_new_tokens=12, min_new_tokens=12,
                              suppress_tokens=list(range(151643, 151665)))
    new = out[0, enc["input_ids"].shape[1]:]
    assert len(new) == 12 and (new < 151643).all()
    assert isinstance(processor.tokenizer.decode(new), str)


def test_save_load_round_trip(tiny_model, processor, tmp_path):
    out = tmp_path / "ckpt"
    checkpoints.save_checkpoint(tiny_model, processor, out, {"step": 7, "config": {"lr": 1e-6}}, dtype=torch.float32)
    assert json.loads((out / "trainer_state.json").read_text())["step"] == 7
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind
    back = AutoModelForImageTextToText.from_pretrained(out)  # plain transformers, no project code
    ref = tiny_model.state_dict()
    assert set(back.state_dict()) == set(ref)
    assert all(torch.equal(back.state_dict()[k], ref[k]) for k in ref)
    assert model.load_processor(str(out)).tokenizer("Hello")["input_ids"] == [9707]
    # saving the same directory again replaces it whole
    checkpoints.save_checkpoint(tiny_model, processor, out, {"step": 8}, dtype=torch.bfloat16)
    assert json.loads((out / "trainer_state.json").read_text())["step"] == 8
    assert AutoModelForImageTextToText.from_pretrained(out).lm_head.weight.dtype == torch.bfloat16


def test_tied_embeddings_are_saved_once(tiny_path, processor, tmp_path):
    """Like the hub's 3B: no lm_head.weight beside the tied embeddings (full_state_items gathers both
    names as separate tensors; save_pretrained drops the tied one by the config), and the loaded model
    ties them again."""
    from safetensors import safe_open

    config = AutoConfig.from_pretrained(tiny_path)
    config.tie_word_embeddings = config.text_config.tie_word_embeddings = True
    torch.manual_seed(0)
    tied = AutoModelForImageTextToText.from_config(config)
    assert tied.lm_head.weight is tied.model.language_model.embed_tokens.weight
    checkpoints.save_checkpoint(tied, processor, tmp_path / "ckpt", {"step": 1}, dtype=torch.float32)
    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys  # transformers writes the hub's names
    back = AutoModelForImageTextToText.from_pretrained(tmp_path / "ckpt")
    assert back.lm_head.weight is back.model.language_model.embed_tokens.weight
    assert all(torch.equal(v, tied.state_dict()[k]) for k, v in back.state_dict().items())


def test_tiny_is_deterministic_per_seed(tmp_path):
    a = tiny.build_tiny(tmp_path / "a", seed=3)
    b = tiny.build_tiny(tmp_path / "b", seed=3)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()


def test_aliases():
    assert model.resolve_model("qwen2.5-vl-7b") == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert model.resolve_model("some/local-dir") == "some/local-dir"


def test_run_directory_resolves_to_its_last_complete_checkpoint(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text("{}")  # the stages save their flags there
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        model.resolve_model(str(run))
    for step, complete in ((9, True), (10, True), (11, False)):  # step 11 was being written when killed
        d = run / "checkpoints" / f"step_{step:06d}"
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"weights")
        if complete:
            checkpoints.write_trainer_state(d, {"step": step})
    assert model.resolve_model(str(run)) == str(run / "checkpoints" / "step_000010")
    (run / "checkpoints" / "step_000010" / "model.safetensors").write_bytes(b"weigh")  # damaged after the save
    assert model.resolve_model(str(run)) == str(run / "checkpoints" / "step_000009")
    assert model.resolve_model(str(run / "checkpoints" / "step_000009")) == str(run / "checkpoints" / "step_000009")
