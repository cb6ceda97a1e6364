"""Per-token log-probs at the real 151,936-token vocabulary: peak memory and time, chunked vs naive.

    python benchmarks/logprob_memory.py                                  # hidden 128 (the tiny model's)
    python benchmarks/logprob_memory.py --hidden 2048 --lengths 256 1024  # Qwen2.5-VL-3B's hidden size

Forward + backward of the per-token log-probs of L completion tokens, two ways:
  naive    the full (1, L+1, V) fp32 logits, log_softmax, gather (what model(...).logits gives)
  chunked  model.token_logprobs (the trainer's code: model.LinearLogprobs), `chunk_tokens` tokens
           of logits at a time, each chunk recomputed in backward, the lm_head gradient summed in
           place into one buffer
The part of the model whose memory grows with the vocabulary is what is measured: random hidden
states (1, L+1, H) that require grad stand for the decoder's output, and a random (V, H) lm_head
(a `model.token_logprobs`-compatible stand-in: `.model(...)` returns them, `.lm_head` is the head).
Both ways also allocate the lm_head's weight gradient (V x H fp32: 78 MB at H 128, 1.2 GB at 2048).

Each measurement runs in a fresh process: peak RSS increase = ru_maxrss after forward+backward
minus ru_maxrss before it (after a small warm-up), so allocator caches of an earlier measurement
cannot hide memory. Seconds are wall time; CPU seconds (user + system) barely move when other work
shares the cores. Threads: OMP_NUM_THREADS (default 1).
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 151936


def measure_one(way: str, length: int, hidden: int, chunk_tokens: int) -> dict:
    """Runs in the child process."""
    sys.path.insert(0, str(ROOT))
    from types import SimpleNamespace

    import torch

    import model

    torch.manual_seed(0)

    class Head(torch.nn.Module):
        """Stands in for Qwen2.5-VL in model.token_logprobs: .model(...) gives the hidden states."""

        def __init__(self, tokens: int, vocab: int = VOCAB):
            super().__init__()
            self.lm_head = torch.nn.Linear(hidden, vocab, bias=False)
            self.hidden = torch.nn.Parameter(torch.randn(1, tokens, hidden))
            self.model = lambda **_: SimpleNamespace(last_hidden_state=self.hidden)

    def batch_of(tokens: int, vocab: int = VOCAB) -> dict:
        mask = torch.ones(1, tokens, dtype=torch.bool)
        mask[0, 0] = False  # one prompt token, then the completion
        return {"input_ids": torch.randint(0, min(vocab, 151643), (1, tokens)), "completion_mask": mask}

    def naive(m, batch) -> torch.Tensor:
        logits = m.lm_head(m.hidden).float()                                          # (1, T, V)
        logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
        return logp * batch["completion_mask"][:, 1:]                                 # (1, T-1)

    def run(m, batch) -> None:
        out = naive(m, batch) if way == "naive" else model.token_logprobs(m, batch, chunk_tokens=chunk_tokens)
        out.sum().backward()

    # First-call kernels and allocator set-up outside the measurement, on a small vocabulary: a
    # full-size warm-up would leave its own weight and gradient in the high-water mark.
    warm = Head(17, vocab=1024)
    run(warm, batch_of(17, vocab=1024))
    del warm
    m, batch = Head(length + 1), batch_of(length + 1)
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    run(m, batch)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    assert m.lm_head.weight.grad is not None and m.hidden.grad.abs().sum() > 0
    return {"way": way, "length": length, "hidden": hidden, "chunk_tokens": chunk_tokens,
            "increase_mb": (after.ru_maxrss - before.ru_maxrss) / 1024, "seconds": seconds, "cpu_seconds": cpu}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096], help="completion tokens")
    p.add_argument("--hidden", type=int, default=128, help="hidden size (128: the tiny model; 2048: Qwen2.5-VL-3B)")
    p.add_argument("--chunks", type=int, nargs="+", default=[256, 1024], help="chunk_tokens values (256: the default)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--table", default=None, help="only print the table of results saved with --json")
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        way, length, hidden, chunk = args.child
        print(json.dumps(measure_one(way, int(length), int(hidden), int(chunk))))
        return
    if args.table:
        saved = json.loads(Path(args.table).read_text())
        return print_table({(r["length"], r["way"], r["chunk_tokens"]): r for r in saved}, args.lengths, args.chunks,
                           saved[0]["hidden"], os.environ.get("OMP_NUM_THREADS", "1"))

    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    results = {}
    for length in args.lengths:
        for way, chunk in [("naive", 0)] + [("chunked", c) for c in args.chunks]:
            out = subprocess.run([sys.executable, __file__, "--child", way, str(length), str(args.hidden), str(chunk)],
                                 capture_output=True, text=True, env=env, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            results[length, way, chunk] = r
            print(json.dumps(r), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(list(results.values()), indent=2))
    print_table(results, args.lengths, args.chunks, args.hidden, env["OMP_NUM_THREADS"])


def print_table(results: dict, lengths: list[int], chunks: list[int], hidden: int, threads: str) -> None:
    print(f"\nper-token log-probs, forward + backward, vocabulary {VOCAB:,}, hidden {hidden}, fp32, "
          f"threads {threads}; peak RSS increase (MiB) and seconds, each in a fresh process")
    head = " | ".join(f"chunked {c}: MiB | s (CPU s) | naive/chunked" for c in chunks)
    print(f"| completion tokens | naive: MiB | s (CPU s) | {head} |")
    print("|---|---|---|" + "---|---|---|" * len(chunks))
    for length in lengths:
        n = results[length, "naive", 0]
        cells = []
        for c in chunks:
            r = results[length, "chunked", c]
            cells.append(f"{r['increase_mb']:,.0f} | {r['seconds']:.2f} ({r['cpu_seconds']:.2f}) | "
                         f"{n['increase_mb'] / max(r['increase_mb'], 1):.1f}x")
        naive_cells = f"{n['increase_mb']:,.0f} | {n['seconds']:.2f} ({n['cpu_seconds']:.2f})"
        print(f"| {length} | {naive_cells} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
