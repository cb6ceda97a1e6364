"""reward.py: the official training reward and eval grader (SPEC.md section 4), their quirks,
reward hacks, speed on adversarial input, and a property test that nothing ever raises."""
import re
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import reward
from reward import extract_answer, format_ok, is_correct

ROW = {"options": '{"A": "Liver", "B": "Lung", "C": "Heart", "D": "Kidney"}', "answer_label": "B", "answer": "Lung"}


def wrap(answer: str, think: str = "the scan shows air") -> str:
    return f"<think>{think}</think><answer>{answer}</answer>"


@pytest.mark.parametrize("completion", [
    wrap("B"), wrap(" b "), wrap("Lung"), wrap("lung"), wrap("B. Lung"), wrap("b. lung"),
    "<think>\nmulti\nline\n</think>\n\n<answer> B </answer>",
    "<think>a</think><answer>A</answer><answer>B</answer>",  # .*? spans the first block: format ok, first answer A
])
def test_official_reward_accepts(completion):
    expected = 0.0 if "<answer>A</answer>" in completion else 1.0
    assert reward.reward(completion, ROW) == expected


@pytest.mark.parametrize("completion", [
    wrap("A"), wrap("Liver"), wrap("B. Liver"),
    wrap("\nB\n"),                      # official quirk: the answer search does not cross newlines
    wrap("B."), wrap("(B)"), wrap("B: Lung"), wrap("B) Lung"),  # official quirks
    wrap(""), wrap("   "),              # empty
    wrap("A or B"), wrap("B or A"), wrap("AB"), wrap("A, B, C, D"),  # several letters
    wrap("\u0392"), wrap("\u0412"), wrap("\uff22"),  # Greek Beta, Cyrillic Ve, fullwidth B
    "<answer>B</answer>",               # no think
    "<think>x</think>",                 # no answer
    wrap("B") + " extra",               # trailing text
    "So: " + wrap("B"),                 # leading text
    "<think>x</think> and then <answer>B</answer>",  # text between the blocks
    "<think>x<answer>B</answer>",       # no </think>
    "B", "", "<think></think><answer>B",  # truncated
    # Special-token text after the answer. The engines decode with skip_special_tokens=True, so a
    # real end-of-turn token never reaches the reward; this text can only be the policy spelling it
    # out in ordinary tokens, and the official reward (verl's decode, nothing stripped) scored it 0.
    # (These two were accepted while reward.py stripped such text itself.)
    wrap("B") + "<|im_end|>", wrap("B") + "<|endoftext|>",
])
def test_official_reward_rejects(completion):
    assert reward.reward(completion, ROW) == 0.0


def test_spelled_out_special_tokens_fail_the_format_not_the_eval_grader():
    # SPEC section 4: the reward and its format gate see the decoded text as it is; the paper's eval
    # grader has no format requirement and still reads the answer block.
    spelled = wrap("B") + "<|im_end|>"
    assert reward.reward(spelled, ROW) == 0.0 and reward.reward(spelled, ROW, lenient=True) == 0.0
    assert not format_ok(spelled) and format_ok(wrap("B"))
    assert is_correct(spelled, ROW)
    assert reward.reward("<|im_start|>" + wrap("B"), ROW) == 0.0


def test_official_quirk_first_block_wins_even_inside_think():
    # The official search takes the first single-line <answer> block, wherever it is. Kept by
    # default for fidelity; lenient mode reads only the block after </think>.
    hack = "<think>maybe <answer>B</answer></think><answer>A</answer>"
    assert reward.reward(hack, ROW) == 1.0
    assert reward.reward(hack, ROW, lenient=True) == 0.0


@pytest.mark.parametrize("answer", ["B", "(B)", "B.", "B)", "B: Lung", "B. Lung", "b: lung.", "Lung", "\nB\n",
                                    "(b)"])
def test_lenient_reward_accepts(answer):
    assert reward.reward(wrap(answer), ROW, lenient=True) == 1.0


@pytest.mark.parametrize("answer", ["", " ", "A or B", "AB", "A, B", "B: Liver", "(A)", "C.", "\u0392", "(\u0392)",
                                    "B or C", "B and C", "Lung or Liver"])
def test_lenient_reward_rejects(answer):
    assert reward.reward(wrap(answer), ROW, lenient=True) == 0.0
    assert reward.reward("<think>x<answer>B</answer></think><answer>" + answer + "</answer>", ROW,
                         lenient=True) == 0.0


@pytest.mark.parametrize("completion,expected", [
    (wrap("B"), True),
    ("<answer>A</answer> on reflection <answer>B</answer>", True),   # the LAST block
    ("<answer>B</answer> on reflection <answer>A</answer>", False),
    ("<answer>\n\n B \nbecause the lung...</answer>", True),         # its first non-empty line
    ("no tags at all. Final answer: Lung", True),                   # fallbacks, no format needed
    ("The answer is: B", True),
    ("so the answer is B", True),
    ("the organ is: lung", True),
    ("<think>long reasoning</think><answer> B", False),              # truncated: fallback finds no marker
    ("<answer> B", True),                                            # ... whole text, tags stripped
    ("Answer: B. Lung", True),
    (wrap(""), False), (wrap("A or B"), False), (wrap("\u0392"), False), ("", False),
])
def test_eval_grader(completion, expected):
    assert is_correct(completion, ROW) is expected


def test_eval_grader_marker_priority():
    # "answer:" is tried before "is:", whatever their positions
    assert extract_answer("answer: B ... this is: C") == "B ... this is: C"
    assert extract_answer("it is: C") == "C"


def test_options_as_dict_and_bad_rows():
    assert reward.reward(wrap("B"), {**ROW, "options": {"A": "Liver", "B": "Lung"}}) == 1.0
    for bad in [{}, {"options": "not json", "answer_label": "B"}, {"options": "[1, 2]", "answer_label": "A"},
                {"options": '{"A": "x"}', "answer_label": "Z"}, {"options": None, "answer_label": "A"}]:
        assert reward.reward(wrap("B"), bad) == 0.0
        assert is_correct(wrap("B"), bad) is False


ADVERSARIAL = {
    "unclosed answers": "<answer>" * 125_000,
    "unclosed answers on one line after think": "<think>x</think>" + "<answer>" * 120_000 + "</answer>",
    "think/answer pairs": "<think>" + "</think><answer>" * 60_000 + "x",
    "closers": "</answer>" * 110_000,
    "markers": "answer is " * 100_000,
    "whitespace": "<think>x</think>" + " " * 1_000_000 + "<answer",
}


@pytest.mark.parametrize("name", ADVERSARIAL)
def test_linear_time_on_1mb_adversarial_completions(name):
    text = ADVERSARIAL[name]
    assert len(text) >= 900_000
    start = time.perf_counter()
    reward.reward(text, ROW)
    reward.reward(text, ROW, lenient=True)
    is_correct(text, ROW)
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, f"{name}: {elapsed:.2f}s (a quadratic scan takes minutes here)"


PIECES = st.sampled_from(["<think>", "</think>", "<answer>", "</answer>", "B", "A", " ", "\n", "x", "Lung", "(",
                          ").", ":", "<|im_end|>", "answer is", "\u0392", "<", ">"])
TEXT = st.lists(PIECES, max_size=14).map("".join) | st.text(max_size=60)


@settings(max_examples=400, deadline=None)
@given(TEXT)
def test_linear_scans_agree_with_the_official_regexes(text):
    official_format = re.fullmatch(r"<think>.*?</think>\s*<answer>.*?</answer>", text, re.DOTALL) is not None
    assert format_ok(text) == official_format  # special-token text included: nothing is stripped
    m = re.search(r"<answer>(.*?)</answer>", text)
    assert reward._first_single_line_answer(text) == (m.group(1) if m else None)
    blocks = re.findall(r"<answer>(.*?)</answer>", text, re.DOTALL)
    if blocks:
        first_line = next((line for line in blocks[-1].split("\n") if line.strip()), "")
        for tag in reward.TAGS:
            first_line = first_line.replace(tag, "")
        assert extract_answer(text) == first_line.strip()


@settings(max_examples=300, deadline=None)
@given(TEXT, st.sampled_from([ROW, {"options": {"A": "x", "B": ""}, "answer_label": "B"}, {"options": "{"},
                              {"options": '{"A": 1}', "answer_label": 1}, {}]), st.booleans())
def test_never_raises_and_returns_binary(text, row, lenient):
    assert reward.reward(text, row, lenient=lenient) in (0.0, 1.0)
    assert is_correct(text, row) in (True, False)
    assert isinstance(extract_answer(text), str)
