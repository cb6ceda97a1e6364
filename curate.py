"""Data for MedVLThinker: prepare rows, count passes, filter by difficulty, distill traces, toy data.

Every subcommand reads and writes the unified row schema (SPEC.md section 1): images, question,
options (JSON string), answer_label, answer, reasoning, dataset_name, dataset_index.

    python curate.py prepare --source pmc-raw --csv train.csv --images figures/ --out data/pmc
    python curate.py prepare --source rows --data rows.jsonl --out data/mine       # any unified rows
    torchrun --nproc_per_node 8 curate.py passcount --data data/pmc --out data/pmc-pc   # 16 samples per row
    python curate.py filter --data data/pmc-pc --out data/pmc-medium                # 1 <= passes <= 7
    python curate.py distill --data data/pmc-medium --api-base https://HOST/v1 --teacher gpt-4o --out data/pmc-sft
    python curate.py toy --out data/toy                                             # the demo's data

`prepare` never stops on a bad row: it goes to OUT.rejects.jsonl (written as it comes) with its
source position, dataset_index and the reason, and the summary counts rejects per reason. Refused:
missing or blank fields, options that do not parse, a label not among the options, an answer that
is not the label's option, images that do not decode or are over 64 megapixels (read from the
header, never decoded), a dataset_index that is not an integer or repeats an earlier row's (every
later stage keys its results on it), a jsonl line that is not JSON. `passcount` and `distill` write
results as they finish (OUT.results.jsonl) and resume where a killed run stopped; a teacher request
that failed is not recorded (a re-run asks again), and an auth error (HTTP 401/403) stops at once.
"""

import argparse
import base64
import csv
import hashlib
import http.client
import io
import itertools
import json
import os
import random
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

import checkpoints as C
import data as D
import model as M
import rollout
import reward as R

MAX_IMAGE_PIXELS = 64_000_000  # larger images are refused (decompression bombs), not decoded
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS


# ---- rows: validation, resizing, saving ----

def resize_rule(image: Image.Image) -> Image.Image:
    """SPEC section 1: a side under 28 px -> shortest side 28; else a side over 1024 -> longest side
    1024; bilinear, aspect ratio kept (PIL does the resampling)."""
    w, h = image.size
    if min(w, h) < 28:
        scale = 28 / min(w, h)
    elif max(w, h) > 1024:
        scale = 1024 / max(w, h)
    else:
        return image
    return image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)


def image_name(image, k: int) -> str:
    """How a reject names an image: its path, or its place in the row when it has none."""
    if isinstance(image, dict) and image.get("path") and not image.get("bytes"):
        return str(image["path"])
    return str(image) if isinstance(image, (str, Path)) else f"images[{k}]"


def open_image(image) -> Image.Image:
    """A PIL image, {"bytes"/"path"} dict, bytes or path -> a decoded RGB image (raises on bad data).
    An image over Image.MAX_IMAGE_PIXELS is refused from its header, before it is decoded: PIL itself
    refuses only at twice its limit and merely warns in between (a 100 MP image decodes to 1.1 GB)."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, dict):
        image = image.get("bytes") or image.get("path")
    image = Image.open(io.BytesIO(image) if isinstance(image, bytes) else image)
    if image.width * image.height > Image.MAX_IMAGE_PIXELS:
        raise Image.DecompressionBombError(f"{image.width}x{image.height} pixels")
    image.load()  # decode now: a truncated file fails here, not during training
    return image.convert("RGB")


def dataset_index_of(row: dict) -> int | None:
    """The row's dataset_index as an int (None when it has none); ValueError when it is not an integer."""
    index = row.get("dataset_index")
    if index is None or isinstance(index, int) and not isinstance(index, bool):
        return index
    if isinstance(index, float) and index.is_integer():
        return int(index)
    if isinstance(index, str) and index.strip().lstrip("-").isdigit():
        return int(index)
    raise ValueError(f"dataset_index {index!r} is not an integer")


def validate(row: dict) -> tuple[dict | None, dict | None]:
    """(clean row, None) or (None, reject): a reject is {"reason": ...} plus what it concerns (the
    image's path, the bad value). Options become a JSON string, images decoded RGB."""
    try:
        for field in ("question", "options", "answer_label"):
            if row.get(field) is None or str(row[field]).strip() == "":  # a question of only spaces too
                return None, {"reason": f"missing {field}"}
        try:
            index = dataset_index_of(row)
        except ValueError:
            return None, {"reason": "dataset_index is not an integer", "value": repr(row.get("dataset_index"))[:60]}
        options = R.options_dict(row)
        if not options or any(not text for text in options.values()):
            return None, {"reason": "empty options"}
        label = str(row["answer_label"]).strip()
        if label not in options:
            return None, {"reason": "answer_label not among options"}
        if row.get("answer") not in (None, "") and str(row["answer"]).strip() != options[label]:
            return None, {"reason": "answer != options[answer_label]"}
        images = []
        for k, image in enumerate(row.get("images") or []):
            try:
                images.append(resize_rule(open_image(image)))
            except Image.DecompressionBombError as e:
                return None, {"reason": "image too large (decompression bomb)", "image": image_name(image, k),
                              "detail": str(e)[:120]}
            except FileNotFoundError:
                return None, {"reason": "image file not found", "image": image_name(image, k)}
            except Exception as e:
                return None, {"reason": f"image does not decode ({type(e).__name__})", "image": image_name(image, k)}
        return {"images": images, "question": str(row["question"]).strip(), "options": json.dumps(options),
                "answer_label": label, "answer": options[label], "reasoning": row.get("reasoning"),
                "dataset_name": row.get("dataset_name") or "rows", "dataset_index": index}, None
    except Exception as e:  # options that do not parse, wrong types, ...
        return None, {"reason": f"malformed ({type(e).__name__}: {e})"[:120]}


PMC_STRIP = " \t\r\n\"'\xa0\u200a"


def pmc_raw_rows(csv_path: str, image_dir: str):
    """PMC-VQA's train.csv (Figure_path, Question, Answer, Answer_label, Choice A..D) -> raw rows,
    with the official cleaning: strip whitespace, quotes, \\xa0, \\u200a; a choice "B:Focal uptake" is
    split on its first ":", and its letter must be the column's."""
    with open(csv_path, newline="", encoding="utf-8") as f:
        for position, rec in enumerate(csv.DictReader(f)):
            rec = {k.strip(PMC_STRIP): (v or "").strip(PMC_STRIP) for k, v in rec.items() if k}
            options, reason = {}, None
            for letter in "ABCD":
                letter_seen, _, text = rec.get(f"Choice {letter}", "").partition(":")
                if letter_seen.strip(PMC_STRIP) != letter:
                    reason = f"choice {letter} has prefix {letter_seen.strip(PMC_STRIP)[:10]!r}"
                options[letter] = text.strip(PMC_STRIP)
            row = {"images": [str(Path(image_dir) / rec.get("Figure_path", ""))], "question": rec.get("Question"),
                   "options": options, "answer_label": rec.get("Answer_label"), "answer": rec.get("Answer"),
                   "dataset_name": "pmc_vqa", "dataset_index": position}
            yield position, row, reason


def jsonl_rows(path: str):
    """A JSON-lines file read line by line: a line that is not a JSON object is one reject (with its
    line number), where datasets' reader would stop the whole run (and on mixed types, too)."""
    with open(path, encoding="utf-8") as f:
        for position, line in enumerate(f):
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError(f"a JSON {type(row).__name__}, not an object")
                yield position, row, None
            except ValueError as e:  # JSONDecodeError included
                yield position, {}, {"reason": "not a JSON object", "line": position + 1, "detail": str(e)[:80]}


def prepare(args) -> None:
    """Validate every row; a bad one goes to OUT.rejects.jsonl, written as it comes (a crash later
    keeps every reason so far), with its position, its dataset_index and why. A row whose
    dataset_name and dataset_index repeat an earlier row's is a reject too: every later stage keys
    its results on them. Stops without writing OUT when no row is left."""
    if args.source == "pmc-raw":
        source = ((i, row, {"reason": reason} if reason else None) for i, row, reason in pmc_raw_rows(args.csv, args.images))
    elif args.data.endswith(".jsonl"):
        source = jsonl_rows(args.data)
    else:
        data = D.load_rows(args.data, args.split)
        source = ((i, data[i], None) for i in range(len(data)))
    rejects_path = Path(f"{args.out}.rejects.jsonl")
    kept, first_at, seen, duplicates, reasons = [], {}, {}, 0, Counter()
    with open(rejects_path, "w") as rejects:
        for position, row, reject in source:
            clean, reject = (None, reject) if reject else validate(row)
            if clean is not None:
                if clean["dataset_index"] is None:
                    clean["dataset_index"] = position
                key = D.row_key(clean, position)
                if key in first_at:
                    clean, reject = None, {"reason": "duplicate dataset_index", "first_position": first_at[key]}
                first_at.setdefault(key, position)
            if clean is None:
                rejects.write(json.dumps({"position": position, "dataset_index": row.get("dataset_index"), **reject},
                                         default=str) + "\n")
                rejects.flush()
                reasons[reject["reason"]] += 1
                continue
            digest = hashlib.sha256((clean["question"] + "\0" + clean["answer"]).encode()).hexdigest()
            duplicates += digest in seen
            seen.setdefault(digest, position)
            kept.append(clean)
    total = len(kept) + sum(reasons.values())
    print(f"kept {len(kept)} rows -> {args.out}; rejected {sum(reasons.values())} -> {rejects_path}")
    for reason, count in reasons.most_common():
        print(f"  {count:6d}  {reason}")
    if not kept:
        raise SystemExit(f"all {total} rows were rejected, nothing written to {args.out}: the reasons are in {rejects_path}")
    save_rows(kept, args.out)
    print(f"duplicate questions (same question and answer): {duplicates}")


def save_rows(rows: list[dict], out: str) -> None:
    """Unified rows (PIL images) -> an HF dataset on disk or a parquet file (save_dataset)."""
    from datasets import Dataset, Features, Image as ImageFeature, List, Value

    features = Features({"images": List(ImageFeature()), "question": Value("string"), "options": Value("string"),
                         "answer_label": Value("string"), "answer": Value("string"), "reasoning": Value("string"),
                         "dataset_name": Value("string"), "dataset_index": Value("int64")})
    save_dataset(Dataset.from_list([{k: row.get(k) for k in features} for row in rows], features=features), out)


def save_dataset(data, out: str) -> None:
    """A directory (save_to_disk) or, for a name ending in .parquet, a parquet file."""
    data.to_parquet(out) if out.endswith(".parquet") else data.save_to_disk(out)


# ---- pass counts: how often the 3B model answers right in 16 samples ----

def sampling_tag(args, model: str) -> dict:
    """What a pass count or a trace depends on besides its row: the model (checkpoints.model_id: a local
    one with the time its weights were written) and the sampling. Every record carries it; a re-run into
    the same --out reuses only records with the same tag, so another model's counts never pass as these."""
    return {"model": model, "samples": args.samples, "seed": args.seed, "max_new_tokens": args.max_new_tokens}


def passcount(args) -> None:
    rows = D.load_rows(args.data, args.split)  # rows are decoded one at a time, when their chunk runs
    D.check_rows(rows, args.data)  # results join on dataset_index
    path = M.resolve_model(args.model, flag="--model")
    rank, world, device = M.init_distributed()
    engine = None
    try:
        engine = rollout.make_engine(args.rollout, path, M.load_processor(path),
                                     model=M.load_model(path, device=device) if args.rollout == "hf" else None,
                                     **(dict(max_model_len=args.max_model_len, seed=args.seed, dtype=args.vllm_dtype,
                                             max_images=args.max_images) if args.rollout == "vllm" else {}))

        def count(share: list[dict], positions: list[int]) -> list[dict]:
            # each row's seed depends on its position only: the same counts on 1 or 8 ranks
            outputs = engine.generate(share, n=args.samples, temperature=1.0, top_p=1.0,
                                      max_new_tokens=args.max_new_tokens,
                                      seed=rollout.request_seeds(args.seed, positions, args.samples))
            return [{"pass_count": sum(R.is_correct(c.text, row) for c in group)} for row, group in zip(share, outputs)]

        results = D.resumable_map(count, rows, Path(f"{args.out}.results.jsonl"), args.chunk_rows, desc="rows",
                                  tag=sampling_tag(args, C.model_id(path)))
        if rank == 0:
            counts = [r["pass_count"] for r in results]
            save_dataset(rows.remove_columns([c for c in ["pass_count"] if c in rows.column_names])
                         .add_column("pass_count", counts), args.out)
            histogram = Counter(counts)
            print(f"pass counts of {len(rows)} rows ({args.samples} samples each) -> {args.out}")
            for k in range(args.samples + 1):
                print(f"  {k:3d} {histogram.get(k, 0):7d} " + "#" * round(50 * histogram.get(k, 0) / len(rows)))
    except BaseException as e:
        M.exit_on_error(e)  # several ranks: print it and end the job now, not at the barrier below
        raise
    finally:
        if engine is not None:
            engine.close()
        M.cleanup_distributed()


# ---- difficulty filter ----

def filter_rows(args) -> None:
    rows = D.load_rows(args.data, args.split)
    D.check_rows(rows, args.data, ("pass_count", "dataset_name"))
    kept = rows.filter(lambda n: n is not None and args.min <= n <= args.max, input_columns="pass_count")
    if args.easy_to_hard:  # the paper's ablation: shuffle (seed 42), then most passes first (stable sort)
        kept = kept.shuffle(seed=args.seed).flatten_indices()
        kept = kept.sort("pass_count", reverse=True)  # Arrow's sort is stable: ties keep the shuffle
    save_dataset(kept, args.out)
    before, after = Counter(rows["dataset_name"]), Counter(kept["dataset_name"])
    print(f"kept {len(kept)} of {len(rows)} rows with {args.min} <= pass_count <= {args.max} -> {args.out}")
    for name in sorted(before):
        print(f"  {name}: {after.get(name, 0)} of {before[name]}")


# ---- reasoning traces from a teacher ----

def think_content(text: str) -> str | None:
    start, end = text.find("<think>"), text.find("</think>")
    return text[start + len("<think>"):end].strip() if 0 <= start < end else None


def api_complete(args, row: dict, stop: threading.Event) -> list[str] | None:
    """`samples` completions from an OpenAI-compatible chat endpoint, images as base64 PNG, with
    retries and exponential backoff; None when every try failed (the HTTP status or error is
    printed). The key comes from the environment and is never printed. `stop` is set by the first
    auth error: requests that a worker picks up after it are never sent."""
    content = []
    for image in M.row_images(row):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        content.append({"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                                                  + base64.b64encode(buffer.getvalue()).decode()}})
    content.append({"type": "text", "text": M.prompt_text(row)})
    body = json.dumps({"model": args.teacher, "messages": [{"role": "user", "content": content}],
                       "n": args.samples, "temperature": 1.0, "max_tokens": args.max_new_tokens}).encode()
    headers = {"Content-Type": "application/json"}
    if os.environ.get(args.api_key_env):
        headers["Authorization"] = "Bearer " + os.environ[args.api_key_env]
    for attempt in range(args.retries + 1):
        if stop.is_set():
            return None
        try:
            request = urllib.request.Request(args.api_base.rstrip("/") + "/chat/completions", body, headers)
            with urllib.request.urlopen(request, timeout=args.timeout) as response:
                return [choice["message"]["content"] or "" for choice in json.load(response)["choices"]]
        except urllib.error.HTTPError as e:
            if e.code in (401, 403):  # a missing or wrong key fails every row alike: stop at once
                stop.set()
                raise SystemExit(f"teacher endpoint {args.api_base}: HTTP {e.code} {e.reason}; "
                                 f"check the key in ${args.api_key_env} and --api-base")
            error = f"HTTP {e.code} {e.reason}"
        except (urllib.error.URLError, OSError, http.client.HTTPException, KeyError, TypeError, json.JSONDecodeError) as e:
            error = f"{type(e).__name__}: {getattr(e, 'reason', e)}"[:120]
        if attempt == args.retries:
            print(f"row {row.get('dataset_index')}: no answer after {attempt + 1} tries ({error})", flush=True)
            return None
        stop.wait(args.backoff * 2 ** attempt)  # a backoff ends early when the run stops


def api_teach(args, rows: list[dict]) -> list[list[str] | None]:
    """api_complete for every row, --concurrency requests at a time. An auth error stops the run:
    the requests not started yet are cancelled, and none is sent after it (a worker may already have
    picked up the next row before the cancel). So does Ctrl-C or any other error: the workers' pending
    retries and backoffs end instead of holding the pool open."""
    stop = threading.Event()
    with ThreadPoolExecutor(args.concurrency) as pool:
        futures = [pool.submit(api_complete, args, row, stop) for row in rows]
        try:
            return [f.result() for f in futures]
        except BaseException:
            stop.set()
            for f in futures:
                f.cancel()
            raise


def distill(args) -> None:
    rows = D.load_rows(args.data, args.split)
    D.check_rows(rows, args.data)  # results join on dataset_index: a duplicate would get another row's trace
    path = None if args.api_base else M.resolve_model(args.teacher, flag="--teacher")
    rank, world, device = M.init_distributed()
    engine = None
    try:
        if path is not None:
            engine = rollout.make_engine(args.rollout, path, M.load_processor(path),
                                         model=M.load_model(path, device=device) if args.rollout == "hf" else None,
                                         **(dict(max_model_len=args.max_model_len, seed=args.seed,
                                                 dtype=args.vllm_dtype, max_images=args.max_images)
                                            if args.rollout == "vllm" else {}))

        def teach(share: list[dict], positions: list[int]) -> list[dict | None]:
            if engine is not None:
                texts = [[c.text for c in group] for group in engine.generate(
                    share, n=args.samples, temperature=1.0, max_new_tokens=args.max_new_tokens,
                    seed=rollout.request_seeds(args.seed, positions, args.samples))]
            else:
                texts = api_teach(args, share)
            # the first sample the eval grader accepts gives the trace; rows without one get None;
            # a row whose request failed (None) is not recorded, so a re-run asks again
            return [None if samples is None else
                    {"reasoning": next((think_content(t) for t in samples if R.is_correct(t, row) and think_content(t)),
                                       None), "samples": len(samples)} for row, samples in zip(share, texts)]

        results = D.resumable_map(teach, rows, Path(f"{args.out}.results.jsonl"), args.chunk_rows, desc="rows",
                                  tag=sampling_tag(args, args.teacher if path is None else C.model_id(path)))
        if rank == 0:
            traces = [r["reasoning"] if r else None for r in results]
            kept = rows.remove_columns([c for c in ["reasoning"] if c in rows.column_names]).add_column("reasoning", traces)
            kept = kept.filter(lambda t: t is not None, input_columns="reasoning")
            save_dataset(kept, args.out)
            failed = sum(r is None for r in results)
            print(f"{len(kept)} of {len(rows)} rows got a correct trace -> {args.out}; {len(rows) - len(kept)} left out "
                  f"({sum(r is not None and r['samples'] == 0 for r in results)} with no answer at all)")
            if failed:
                raise SystemExit(f"{failed} rows got no answer from the teacher (errors above) and are not recorded as "
                                 f"done: run the same command again to retry them")
    except BaseException as e:
        M.exit_on_error(e)  # several ranks: print it and end the job now, not at the barrier below
        raise
    finally:
        if engine is not None:
            engine.close()
        M.cleanup_distributed()


# ---- the toy dataset of the demo ----
# A tile of a stained tissue section; the question is the same for every row, so only the image
# tells the answer: the stain's colour, a property of every visual token. Two colour channels
# decide it: red (H&E and Congo red high, trichrome and silver low) and blue (H&E and trichrome
# high, Congo red and silver low). A tiny model learns such whole-image colours on CPU in a few
# dozen SFT steps; it did not learn "where is the lesion" (at 4x4 visual tokens its rotary
# positions barely tell left from right), and learned texture far more slowly than colour.
# The `sft` split holds traces of a simulated imperfect teacher that is right about trichrome, silver
# and Congo red but calls H&E "Congo red" 3 times in 5 (in turn: A, A, C, C, C). SFT imitates it: the
# model learns every stain's colour, and for H&E tiles it learns the teacher's odds, about 0.4 A and
# 0.6 C, so its greedy answer (C) is wrong on every H&E tile and it stops near 75%. GRPO's verifiable
# reward on `train` (the true labels) then has a concrete job: the right answer is already sampled
# 40% of the time on exactly the H&E tiles, and reinforcing it flips the greedy answer within a few
# steps. (A teacher that could not tell the two apart at all, a coin flip for both, gave the same
# 75% but the model then had no blue-channel feature for red tiles: GRPO needed ~24 steps of 64
# completions and got there only with some seeds.)

TOY_OPTIONS = {"A": "Hematoxylin and eosin", "B": "Masson trichrome", "C": "Congo red", "D": "Silver stain"}
TOY_STAINS = {"A": (200, 90, 190), "B": (70, 100, 190), "C": (200, 80, 60), "D": (70, 60, 50)}  # RGB
TOY_REASONING = "The colour tells the stain."
TOY_QUESTION = "This tile is from a stained tissue section. Which stain was used?"
TOY_TEACHER = {"A": "AACCC", "B": "B", "C": "C", "D": "D"}  # true label -> the answers it picks from


def toy_tile(rng: random.Random, label: str, size: int = 112) -> Image.Image:
    """A field of the stain's colour (jittered) with darker nuclei scattered over it."""
    colour = tuple(min(255, max(0, c + rng.randint(-15, 15))) for c in TOY_STAINS[label])
    image = Image.new("RGB", (size, size), colour)
    draw = ImageDraw.Draw(image)
    nucleus = tuple(max(0, c - 50) for c in colour)
    for _ in range(30):
        x, y, r = rng.randrange(size), rng.randrange(size), rng.randint(2, 5)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=nucleus)
    return image.filter(ImageFilter.GaussianBlur(1))


def toy(args) -> None:
    """Deterministic rows with balanced labels: train (true labels), test, and sft (the train images
    with the imperfect teacher's answers and a template reasoning trace)."""
    from datasets import DatasetDict, load_from_disk

    rng = random.Random(args.seed)
    splits = {}
    for split, count in (("train", args.train), ("test", args.test)):
        rows = []
        for i in range(count):
            label = "ABCD"[i % 4] if split == "test" else "ABCD"[rng.randrange(4)]
            rows.append({"images": [toy_tile(rng, label)], "question": TOY_QUESTION, "options": json.dumps(TOY_OPTIONS),
                         "answer_label": label, "answer": TOY_OPTIONS[label], "reasoning": TOY_REASONING,
                         "dataset_name": "toy", "dataset_index": i + (0 if split == "train" else args.train)})
        save_rows(rows, f"{args.out}/{split}")
        splits[split] = load_from_disk(f"{args.out}/{split}")
    teacher, turns = [], {k: itertools.cycle(v) for k, v in TOY_TEACHER.items()}  # each label's answers in turn
    for row in splits["train"]:
        label = next(turns[row["answer_label"]])
        teacher.append(dict(row, answer_label=label, answer=TOY_OPTIONS[label]))
    save_rows(teacher, f"{args.out}/sft")
    splits["sft"] = load_from_disk(f"{args.out}/sft")
    DatasetDict(splits).save_to_disk(f"{args.out}/all")
    print(f"toy data: {args.train} train, {args.test} test and {args.train} sft rows -> {args.out}/{{train,test,sft,all}}")


# ---- command line ----

def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def common(q, out_help: str, data_required: bool = True) -> None:
        q.add_argument("--data", required=data_required, help="unified rows: hub name, save_to_disk dir, parquet/jsonl/csv")
        q.add_argument("--split", default="train", help="split of a hub dataset or DatasetDict")
        q.add_argument("--out", required=True, help=out_help)

    def engine_flags(q, default_model: str) -> None:
        q.add_argument("--rollout", choices=["vllm", "hf"], default="vllm", help="sampling engine")
        q.add_argument("--samples", type=int, default=16 if default_model else 3, help="samples per row")
        q.add_argument("--max-new-tokens", type=int, default=4096, help="tokens per sample")
        q.add_argument("--max-model-len", type=int, default=0,
                       help="vLLM context, prompt + sample (0: the model's own, at most 32,768, as in evaluate.py)")
        q.add_argument("--vllm-dtype", default="auto", help="vLLM weights dtype")
        q.add_argument("--seed", type=int, default=42, help="sampling seed (row i uses seed + i)")
        q.add_argument("--chunk-rows", type=int, default=256, help="rows per engine call (results written per chunk)")
        q.add_argument("--max-images", type=int, default=8, help="most images in one row (vLLM's per-prompt limit)")

    q = sub.add_parser("prepare", help="raw sources -> validated unified rows")
    common(q, "output: a directory (HF dataset) or a .parquet file; rejects go to OUT.rejects.jsonl", data_required=False)
    q.add_argument("--source", choices=["rows", "pmc-raw"], default="rows", help="unified rows (--data), or PMC-VQA's csv")
    q.add_argument("--csv", help="pmc-raw: the train.csv")
    q.add_argument("--images", help="pmc-raw: the folder Figure_path is relative to")
    q = sub.add_parser("passcount", help="sample each row n times, store how many are right")
    common(q, "output rows with pass_count (results stream to OUT.results.jsonl)")
    q.add_argument("--model", default="qwen2.5-vl-3b", help="the model whose passes define difficulty")
    engine_flags(q, "qwen2.5-vl-3b")
    q = sub.add_parser("filter", help="keep the medium rows")
    common(q, "output rows")
    q.add_argument("--min", type=int, default=1, help="lowest pass_count kept")
    q.add_argument("--max", type=int, default=7, help="highest pass_count kept")
    q.add_argument("--easy-to-hard", action="store_true", help="order by pass_count, most first (after a seeded shuffle)")
    q.add_argument("--seed", type=int, default=42, help="shuffle seed for --easy-to-hard")
    q = sub.add_parser("distill", help="reasoning traces from a teacher's first correct sample")
    common(q, "output rows with reasoning (results stream to OUT.results.jsonl)")
    q.add_argument("--teacher", default="gpt-4o", help="model name for the API, or a model the rollout engine loads")
    q.add_argument("--api-base", default=None, help="OpenAI-compatible base URL (.../v1); without it the engine runs the teacher")
    q.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    q.add_argument("--concurrency", type=int, default=8, help="parallel API requests")
    q.add_argument("--retries", type=int, default=4, help="retries per request, with exponential backoff")
    q.add_argument("--backoff", type=float, default=1.0, help="first retry delay in seconds")
    q.add_argument("--timeout", type=float, default=300, help="seconds per request")
    engine_flags(q, "")
    q = sub.add_parser("toy", help="write the demo's synthetic dataset")
    q.add_argument("--out", required=True, help="output directory (train/, test/, all/)")
    q.add_argument("--train", type=int, default=512, help="training rows")
    q.add_argument("--test", type=int, default=128, help="test rows")
    q.add_argument("--seed", type=int, default=0, help="generator seed")
    args = p.parse_args(argv)
    if args.command == "prepare" and args.source == "pmc-raw" and not (args.csv and args.images):
        p.error("prepare --source pmc-raw needs --csv (PMC-VQA's train.csv) and --images (its figures folder)")
    if args.command == "prepare" and args.source == "pmc-raw" and not Path(args.csv).is_file():
        p.error(f"--csv {args.csv}: no such file")
    if args.command == "prepare" and args.source == "rows" and not args.data:
        p.error("prepare --source rows needs --data")
    if args.command in ("passcount", "distill"):
        D.check_flags(p, args, {"samples": 1, "max_new_tokens": 1, "chunk_rows": 1, "max_images": 1})
    if args.command == "distill":
        D.check_flags(p, args, {"concurrency": 1, "retries": 0, "backoff": 0}, above={"timeout": 0})
    {"prepare": prepare, "passcount": passcount, "filter": filter_rows, "distill": distill, "toy": toy}[args.command](args)


if __name__ == "__main__":
    main(sys.argv[1:])
