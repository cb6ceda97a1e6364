"""The answer verifier: strings in, numbers out. Shared by training (the GRPO reward) and evaluation.

Two graders, both from the official MedVLThinker code (SPEC.md section 4):

- `reward(completion, row)`: the training reward. Binary; the format is a gate, never a bonus.
  The completion must be exactly `<think>...</think> <answer>...</answer>` (whitespace allowed
  between the blocks), then the first single-line `<answer>` block must equal the label ("B"),
  the option text ("CT") or both ("B. CT"), stripped and case-insensitive. Official quirks kept on
  purpose: a block spanning lines (`<answer>\\nB\\n</answer>`) scores 0, as do "B.", "(B)", "B: CT",
  and the first block wins even if it sits inside <think>. `lenient=True` accepts "(B)", "B.",
  "B: CT" and multi-line blocks, reads only the block after </think>, and still never pays for an
  empty answer or for several letters. The completion is what the engine decoded with
  skip_special_tokens=True and nothing more is stripped (the official reward saw exactly that).
- `is_correct(completion, row)`: the lenient grader behind the paper's tables. No format
  requirement: the last `<answer>` block's first non-empty line, or if there is none, the text
  after the last "answer:", "answer is:", "answer is" or "is:" (tried in that order), with the
  four tags removed, then the same comparison. Truncated completions still get graded.

Rules for this file: pure Python, no torch, never raises (a malformed row or a garbage completion
scores 0), linear time in the completion length (no regex that restarts at every "<answer>":
a 1 MB completion of unclosed tags must take milliseconds).
"""

import json
import re

THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE = "<think>", "</think>", "<answer>", "</answer>"
TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)
# Between </think> and <answer> only whitespace may appear; \s* after a fixed literal is linear.
THINK_THEN_ANSWER = re.compile(r"</think>\s*<answer>")
# Lenient training mode: "B", "(B)", "B.", "B)", "B: CT", "B. CT". ASCII letters only, so a Greek
# "Β" never counts as "B".
LETTER_FORM = re.compile(r"\(?([A-Za-z])\)?(?:\s*[.:)]\s*(.*))?", re.DOTALL)


def options_dict(row: dict) -> dict:
    """The row's options as {letter: text}; `options` may be a JSON string or a dict."""
    options = row["options"]
    if isinstance(options, str):
        options = json.loads(options)
    if not isinstance(options, dict):
        raise ValueError(f"options must be a dict or its JSON string, got {type(options).__name__}")
    return {str(k).strip(): str(v).strip() for k, v in options.items()}


def _targets(row: dict) -> tuple[str, str]:
    label = str(row["answer_label"]).strip()
    return label, options_dict(row)[label]


def _matches(answer: str, label: str, text: str) -> bool:
    """The official comparison: stripped, case-insensitive, against "L. text", "L" or "text"."""
    answer = answer.strip().lower()
    return bool(answer) and answer in {f"{label}. {text}".lower(), label.lower(), text.lower()}


# ---- training reward ----

def _answer_after_think(completion: str) -> int | None:
    """Index just past the `<answer>` of a full-format completion, or None if the format fails.

    Same verdict as re.fullmatch(r"<think>.*?</think>\\s*<answer>.*?</answer>", s, re.DOTALL), in
    linear time: s starts with <think>, ends with </answer>, and somewhere in between (without
    overlapping those two) a </think> is followed by optional whitespace and <answer>.
    """
    if not (completion.startswith(THINK_OPEN) and completion.endswith(ANSWER_CLOSE)):
        return None
    m = THINK_THEN_ANSWER.search(completion, len(THINK_OPEN), len(completion) - len(ANSWER_CLOSE))
    return m.end() if m else None


def _first_single_line_answer(completion: str) -> str | None:
    """re.search(r"<answer>(.*?)</answer>", s) without DOTALL (the official quirk), in linear time:
    a match cannot cross a newline, so look line by line; within a line, if the first <answer> has
    no </answer> after it, no later <answer> on that line has one either."""
    for line in completion.split("\n"):
        start = line.find(ANSWER_OPEN)
        if start >= 0:
            end = line.find(ANSWER_CLOSE, start + len(ANSWER_OPEN))
            if end >= 0:
                return line[start + len(ANSWER_OPEN):end]
    return None


def _lenient_match(answer: str, label: str, text: str) -> bool:
    answer = answer.strip()
    if _matches(answer, label, text):
        return True
    m = LETTER_FORM.fullmatch(answer)
    if not m or m.group(1).upper() != label.upper():
        return False
    rest = (m.group(2) or "").strip().rstrip(".").strip()
    return rest == "" or rest.lower() == text.lower()


def format_ok(completion: str) -> bool:
    """True when the completion is exactly <think>..</think> <answer>..</answer>: the reward's gate."""
    try:
        return _answer_after_think(completion) is not None
    except Exception:
        return False


def reward(completion: str, row: dict, lenient: bool = False) -> float:
    """The GRPO reward: 1.0 for a well-formatted completion whose answer is right, else 0.0.

    `completion` is the text as the rollout engine decoded it (skip_special_tokens=True), and nothing
    more is stripped: like the official reward, text that merely looks like a special token (an
    "<|im_end|>" spelled out in ordinary tokens, which skip_special_tokens leaves in) fails the format."""
    try:
        answer_start = _answer_after_think(completion)
        if answer_start is None:
            return 0.0
        label, text = _targets(row)
        if lenient:  # only the block after </think>, may span lines
            answer = completion[answer_start:completion.index(ANSWER_CLOSE, answer_start)]
            return float(_lenient_match(answer, label, text))
        answer = _first_single_line_answer(completion)
        return float(answer is not None and _matches(answer, label, text))
    except Exception:
        return 0.0


# ---- evaluation grader ----

def extract_answer(completion: str) -> str:
    """The answer string the paper's lenient grader compares (empty when nothing is found)."""
    try:
        last, pos = None, 0
        while True:  # non-overlapping <answer>..</answer> blocks, left to right, linear time
            start = completion.find(ANSWER_OPEN, pos)
            end = completion.find(ANSWER_CLOSE, start + len(ANSWER_OPEN)) if start >= 0 else -1
            if end < 0:
                break
            last, pos = completion[start + len(ANSWER_OPEN):end], end + len(ANSWER_CLOSE)
        if last is not None:
            answer = next((line for line in last.split("\n") if line.strip()), "")
        else:
            answer, lower = completion, completion.lower()
            for marker in ("answer:", "answer is:", "answer is", "is:"):
                i = lower.rfind(marker)
                if i >= 0:
                    answer = completion[i + len(marker):]
                    break
        for tag in TAGS:
            answer = answer.replace(tag, "")
        return answer.strip()
    except Exception:
        return ""


def is_correct(completion: str, row: dict) -> bool:
    """The paper's evaluation verdict (lenient: no format requirement)."""
    try:
        label, text = _targets(row)
        return _matches(extract_answer(completion), label, text)
    except Exception:
        return False
