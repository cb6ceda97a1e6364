"""The offline Qwen2.5 tokenizer and the recipe's prompt (SPEC.md section 3), byte for byte."""
from conftest import make_rows

import model

INSTRUCTION = ("You will solve a problem/request. You should provide your thoughts within <think> </think> tags "
               "before providing the answer.\\nWrite your final answer within <answer> </answer> tags.")
HEAD = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
TAIL = "<|im_end|>\n<|im_start|>assistant\n"

GOLDEN = [
    HEAD + IMAGE + INSTRUCTION + "\n\nQuestion: Which organ is shown?\n\nOptions:\n\nA. Liver\n\nB. Lung" + TAIL,
    HEAD + IMAGE + IMAGE + INSTRUCTION + "\n\nQuestion: Do the scans match?\n\nOptions:\n\nA. Yes\n\nB. No" + TAIL,
    HEAD + INSTRUCTION + "\n\nQuestion: First-line therapy for X?\n\nOptions:\n\nA. Aspirin\n\nB. Heparin"
    "\n\nC. Warfarin\n\nD. None" + TAIL,
]


def test_tokenizer_known_ids(processor):
    tok = processor.tokenizer
    assert tok("Hello", add_special_tokens=False)["input_ids"] == [9707]
    assert tok(" world", add_special_tokens=False)["input_ids"] == [1879]
    assert tok("Hello world")["input_ids"] == [9707, 1879]  # no BOS
    specials = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|vision_start|>": 151652,
                "<|vision_end|>": 151653, "<|image_pad|>": 151655, "<|video_pad|>": 151656}
    assert {t: tok.convert_tokens_to_ids(t) for t in specials} == specials
    assert len(tok) == 151665 and tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    ids = tok("<think> x </think><|im_end|>")["input_ids"]
    assert ids[-1] == 151645 and tok.decode(ids, skip_special_tokens=True) == "<think> x </think>"


def test_instruction_has_a_literal_backslash_n():
    assert "\\n" in model.INSTRUCTION and "\n" not in model.INSTRUCTION
    assert model.INSTRUCTION == INSTRUCTION


def test_chat_template_one_image_prompt(processor):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "{text}"}]}]
    rendered = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                        "<|vision_start|><|image_pad|><|vision_end|>{text}<|im_end|>\n<|im_start|>assistant\n")


def test_golden_prompts(processor):
    for row, golden in zip(make_rows(), GOLDEN):
        assert model.render_prompt(processor, row) == golden


def test_qwen3_vl_template_and_golden_prompts(qwen3_path):
    """Qwen3-VL's own template (the hub's, byte for byte): the recipe's user turn unchanged, and no
    default system message; the Qwen3 tokenizer reads <think> as one token."""
    import hashlib

    import tiny

    assert hashlib.sha256(tiny.QWEN3_VL_CHAT_TEMPLATE.encode()).hexdigest().startswith("3636d0f0bd6bef02")
    processor = model.load_processor(qwen3_path)
    for row, golden in zip(make_rows(), GOLDEN):
        assert model.render_prompt(processor, row) == golden.replace("<|im_start|>system\nYou are a helpful assistant."
                                                                     "<|im_end|>\n", "")
    tok = processor.tokenizer
    assert len(tok) == 151669 and tok("<think>")["input_ids"] == [151667] and tok.eos_token == "<|im_end|>"


def test_messages_structure():
    image_row, two_images, text_row = make_rows()
    assert [c["type"] for c in model.build_messages(two_images)[0]["content"]] == ["image", "image", "text"]
    assert model.build_messages(text_row) == [{"role": "user", "content": [{"type": "text",
                                                                            "text": GOLDEN[2][len(HEAD):-len(TAIL)]}]}]
    assert len(model.build_messages({**text_row, "images": None})) == 1


def test_sft_target():
    row = {**make_rows()[0], "reasoning": "The air-filled organ is the lung."}
    assert model.sft_target(row) == "<think> The air-filled organ is the lung. </think>\n<answer> B </answer>"
    # stripped as the official SFT did: a trace from a teacher often ends with a newline
    spaced = {**row, "reasoning": "\n The air-filled organ is the lung.\n\n", "answer_label": " B\n"}
    assert model.sft_target(spaced) == model.sft_target(row)


def test_images_expand_to_their_grids(processor, rows):
    for row in rows:
        enc = model.encode_prompt(processor, row)
        n_image_tokens = int((enc["input_ids"] == 151655).sum())
        assert int(enc["mm_token_type_ids"].sum()) == n_image_tokens
        if row["images"]:
            assert n_image_tokens == int(enc["image_grid_thw"].prod(-1).sum()) // 4  # 2x2 merge
            assert len(enc["image_grid_thw"]) == len(row["images"])
        else:
            assert n_image_tokens == 0 and enc["pixel_values"] is None


def test_prompt_tokens_are_counted_without_pixels(processor, rows):
    from conftest import make_image

    sizes = [(28, 28), (29, 300), (1000, 37), (640, 480), (2000, 1500)]  # odd, thin and resized-down images
    extra = [{**rows[0], "images": [make_image(i, size)]} for i, size in enumerate(sizes)]
    for row in rows + extra:
        assert model.prompt_tokens(processor, row) == len(model.encode_prompt(processor, row)["input_ids"])
