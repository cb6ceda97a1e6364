"""The demo's closing table (and plot): the SFT start against the GRPO result on the toy test split.

    python tools/demo_report.py runs/demo      # reads eval-sft/, eval-grpo/, grpo/metrics.jsonl

Writes DEMO/report.md and, when matplotlib is installed, DEMO/curve.png (reward per step and test
accuracy per evaluation). `make demo` runs it last.
"""

import json
import sys
from pathlib import Path


def summary(eval_dir: Path) -> dict:
    """evaluate.py's mean summary of the one model evaluated into `eval_dir`."""
    found = sorted(eval_dir.glob("*/summary.json"))
    if len(found) != 1:
        raise SystemExit(f"{eval_dir}: expected one evaluated model, found {len(found)}")
    return json.loads(found[0].read_text())["mean"]["Avg."]


def curves(metrics: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(step, mean training reward) and (step, test accuracy %) from grpo.py's metrics.jsonl."""
    rewards, accuracy = [], []
    for line in metrics.read_text().splitlines():
        m = json.loads(line)
        if "eval" in m:
            accuracy.append((m["step"], m["eval"]["Avg."]["lenient"]))
        elif "reward" in m:
            rewards.append((m["step"], m["reward"]))
    return rewards, accuracy


def trend(values: list[float]) -> float:
    """Least-squares slope per step: > 0 means the values go up over the run."""
    n = len(values)
    if n < 2:
        return 0.0
    mx, my = (n - 1) / 2, sum(values) / n
    return sum((i - mx) * (v - my) for i, v in enumerate(values)) / sum((i - mx) ** 2 for i in range(n))


def report(demo: Path) -> dict:
    before, after = summary(demo / "eval-sft"), summary(demo / "eval-grpo")
    rewards, accuracy = curves(demo / "grpo" / "metrics.jsonl")
    k = max(1, len(rewards) // 4)  # first and last quarter of the run
    first, last = [r for _, r in rewards[:k]], [r for _, r in rewards[-k:]]
    rows = [("test accuracy, greedy (%)", before["lenient"], after["lenient"]),
            ("test format rate (%)", 100 - before["format_fail"], 100 - after["format_fail"]),
            ("test mean reward (strict, %)", before["strict"], after["strict"]),
            (f"train reward, sampled T=1 (mean of {k} steps, %)", 100 * sum(first) / k, 100 * sum(last) / k)]
    lines = ["| toy task | SFT start | after GRPO | change |", "|---|---|---|---|"]
    lines += [f"| {name} | {a:.1f} | {b:.1f} | {b - a:+.1f} |" for name, a, b in rows]
    text = "\n".join(lines)
    (demo / "report.md").write_text(text + "\n")
    print(text)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(no plot: `pip install matplotlib` to get curve.png)")
    else:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([s for s, _ in rewards], [100 * r for _, r in rewards], label="train reward (sampled, %)")
        ax.plot([0] + [s for s, _ in accuracy], [before["lenient"]] + [a for _, a in accuracy], "o-",
                label="test accuracy (greedy, %)")
        ax.set_xlabel("GRPO step")
        ax.set_ylim(0, 100)
        ax.legend(loc="lower right")
        fig.tight_layout()
        fig.savefig(demo / "curve.png", dpi=100)
        print(f"plot: {demo / 'curve.png'}")
    return {"before": before, "after": after, "reward_slope": trend([r for _, r in rewards])}


if __name__ == "__main__":
    report(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/demo"))
