"""The files the stages read and write: unified-schema datasets, per-row results as JSON lines (a
killed run resumes from them), metrics, the run directory; and the checks that stop a stage before
anything heavy loads (missing columns, repeated dataset_index, flags out of range, a --out that
already holds a run).

- `load_rows` reads a dataset: a hub name, a `save_to_disk` directory, or a parquet/jsonl/json/csv file.
- `resumable_map` streams per-row results to a JSON-lines file that a re-run picks up; `read_jsonl`
  drops a line cut short by a kill.
"""

import json
import os
import shutil
import uuid
from pathlib import Path

import torch.distributed as dist

from model import HUB_ID, print0


# ---- datasets and result files ----

def row_key(row: dict, position: int) -> str:
    """The id results join on: dataset_name and dataset_index (the row's position if it has none)."""
    index = row.get("dataset_index")
    return f"{row.get('dataset_name')}/{position if index is None else index}"


def read_jsonl(path: Path, repair: bool = False) -> list[dict]:
    """The records of a JSON-lines file. A last line cut short by a kill (no newline at its end) is
    dropped: its row is simply done again. repair=True also cuts it off the file, so that the next
    record appended starts a line of its own instead of being glued onto it (losing both); a last
    record that is whole but lacks its newline gets one. Other lines that do not parse are skipped
    with a count."""
    if not path.exists():
        return []
    data = path.read_bytes()
    cut = data.rfind(b"\n") + 1  # bytes up to and including the last newline
    records, bad = [], 0
    for line in data[:cut].decode("utf-8", "replace").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            bad += line.strip() != ""
    tail, torn = data[cut:], False
    if tail.strip():
        try:
            records.append(json.loads(tail))
        except ValueError:  # JSONDecodeError, or UnicodeDecodeError for a character cut in half
            torn = True
    if bad:
        print0(f"{path}: {bad} lines that are not JSON skipped")
    if torn:
        print0(f"{path}: its last line was cut short (a kill while writing?): dropped, its row is done again")
    if repair and tail:
        with open(path, "r+b") as f:
            if torn or not tail.strip():
                f.truncate(cut)
            else:
                f.seek(0, os.SEEK_END)
                f.write(b"\n")
    return records


def resumable_map(fn, rows, path: Path, chunk_rows: int = 256, tag: dict | None = None, desc: str = "rows") -> list[dict]:
    """One record per row, computed by `fn(rows, positions) -> records` only for rows that `path`
    (JSON lines) does not hold yet, appended there chunk by chunk as they finish, so a killed run
    resumes with nothing lost and nothing done twice. Each chunk is split over the ranks (every rank
    calls this; without a process group it is one rank); rank 0 writes. Records carry "key" (row_key)
    and the `tag` fields, which select what counts as done: records with another tag (another
    repeat, checkpoint or setting) stay in the file and are never used. `fn` returns None for a row
    it could not do (a failed API call): nothing is written for it, a re-run tries again, and its
    place in the returned list (records in row order, on every rank) is None."""
    from tqdm import tqdm

    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    tag = tag or {}
    keys = [row_key(rows[i], i) for i in range(len(rows))]
    done = [None]
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        records = read_jsonl(path, repair=True)
        done[0] = {r["key"]: r for r in records if all(r.get(k) == v for k, v in tag.items())}
        if len(records) > len(done[0]):
            print(f"{path}: {len(records) - len(done[0])} records of other runs or settings kept, not used", flush=True)
    if world > 1:
        dist.broadcast_object_list(done)
    done = done[0]
    todo = [i for i in range(len(rows)) if keys[i] not in done]
    if done:
        print0(f"{path}: {len(done)} {desc} already done, {len(todo)} to go")
    bar = tqdm(total=len(todo), desc=desc, disable=rank != 0 or not todo)
    for start in range(0, len(todo), chunk_rows):
        mine = todo[start:start + chunk_rows][rank::world]
        new = [{"key": keys[i], **tag, **record} for i, record in zip(mine, fn([rows[i] for i in mine], mine))
               if record is not None]
        if world > 1:
            everyone = [None] * world
            dist.all_gather_object(everyone, new)
            new = [r for part in everyone for r in part]
        if rank == 0:
            with open(path, "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in new)
                f.flush()
                os.fsync(f.fileno())
        done.update((r["key"], r) for r in new)
        bar.update(len(todo[start:start + chunk_rows]))
    bar.close()
    return [done.get(k) for k in keys]


def open_metrics(path: Path, start_step: int):
    """metrics.jsonl for appending (rank 0). Lines of steps after `start_step` are dropped first: a
    resumed run logs them again, and a run that starts at step 0 (fresh, or resumed before any
    checkpoint) starts an empty file. A torn last line (a kill mid-write) is dropped with them."""
    kept = [r for r in read_jsonl(path) if r.get("step", 0) <= start_step] if start_step else []
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    return open(path, "a")


# ---- metrics: metrics.jsonl, and an experiment tracker with --report-to ----

def add_report_args(p) -> None:
    g = p.add_argument_group("experiment tracking")
    g.add_argument("--report-to", choices=["none", "wandb", "tensorboard"], default="none",
                   help="also send every step's record and every evaluation to this tracker (rank 0)")
    g.add_argument("--run-name", default=None, help="the tracker's run name (default: the --out directory's name)")
    g.add_argument("--wandb-project", default=None, help="wandb project (default: $WANDB_PROJECT, else medvlthinker)")


def check_report_args(p, args) -> None:
    """--report-to's package must be installed: say so before anything loads."""
    import importlib.util

    module = {"wandb": "wandb", "tensorboard": "tensorboard"}.get(args.report_to)
    if module and importlib.util.find_spec(module) is None:
        p.error(f"--report-to {args.report_to} needs the {module} package: pip install {module}")


def scalars(record: dict, prefix: str = "") -> dict[str, float]:
    """A metrics record's numbers, nested keys joined with "/" ({"eval": {"Avg.": {"lenient": 75}}} ->
    {"eval/Avg./lenient": 75.0}); strings and nulls left out, "step" is the tracker's own axis."""
    out = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(scalars(value, name + "/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and name != "step":
            out[name] = float(value)
    return out


class Metrics:
    """What a training stage logs, on rank 0: every record appended to out/metrics.jsonl (open_metrics)
    and, with --report-to, sent to wandb or tensorboard as well; on the other ranks `log` does nothing,
    so call sites never branch. The resolved config goes to the tracker once. A resumed run continues
    the same tracker run: tensorboard writes into the same out/tensorboard/ (events after start_step
    purged), wandb resumes the run whose id out/wandb_run_id holds (wandb keeps its steps monotonic:
    steps it already has are dropped with its warning)."""

    def __init__(self, out: Path, start_step: int, args, rank: int, config: dict | None = None) -> None:
        self.file = self.tracker = self.writer = None
        if rank != 0:
            return
        self.file = open_metrics(out / "metrics.jsonl", start_step)
        config = config or vars(args)
        name = args.run_name or out.resolve().name
        if args.report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

            self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=start_step + 1 if start_step else 0)
            self.writer.add_text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```", start_step)
        elif args.report_to == "wandb":
            import wandb

            id_file = out / "wandb_run_id"
            run_id = id_file.read_text().strip() if start_step and id_file.exists() else uuid.uuid4().hex[:8]
            id_file.write_text(run_id)
            self.tracker = wandb.init(project=args.wandb_project or os.environ.get("WANDB_PROJECT", "medvlthinker"),
                                      name=name, id=run_id, resume="allow", dir=str(out), config=config)

    def log(self, record: dict) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        values, step = scalars(record), record.get("step", 0)
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)
            self.writer.flush()
        if self.tracker is not None:
            self.tracker.log(values, step=step)

    def close(self) -> None:
        for closer in (self.file, self.writer):
            if closer is not None:
                closer.close()
        if self.tracker is not None:
            self.tracker.finish()
        self.file = self.writer = self.tracker = None


def load_rows(spec: str, split: str = "train"):
    """A unified-schema dataset: a hub name, a `save_to_disk` directory, or a parquet/jsonl/json/csv
    file (images as PIL, {"bytes"/"path"} dicts or paths; row_images reads all of them)."""
    from datasets import DatasetDict, load_dataset, load_from_disk

    path = Path(spec)
    if path.is_dir():
        data = load_from_disk(spec)
        return data[split] if isinstance(data, DatasetDict) else data
    formats = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}
    if path.suffix in formats and path.is_file():
        return load_dataset(formats[path.suffix], data_files=spec, split="train")
    if path.suffix in formats or not HUB_ID.fullmatch(spec) or (path.parent != Path(".") and path.parent.is_dir()):
        raise FileNotFoundError(f"{spec}: no such dataset directory or file (and not a hub dataset name)")
    return load_dataset(spec, split=split)


# ---- checks before anything heavy loads: rows, flags, output directories ----

ROW_COLUMNS = ("question", "options", "answer_label")  # what the prompt and the graders read


def check_rows(rows, source: str, columns: tuple[str, ...] = ROW_COLUMNS) -> None:
    """Stop (SystemExit) when `rows` (a datasets.Dataset or a list of dicts) lacks one of `columns`,
    or when two rows share a row_key (dataset_name and dataset_index): every resumable stage keys its
    results on it, so one row would get the other's result (a trace, a verdict) and the other none.
    Reads two columns, never the images."""
    dataset = hasattr(rows, "column_names")
    names = rows.column_names if dataset else sorted({k for r in rows for k in r})
    missing = [c for c in columns if c not in names]
    if missing:
        raise SystemExit(f"{source}: no column {', '.join(map(repr, missing))} (it has {', '.join(names)})")
    ids = {c: (rows[c] if c in names else [None] * len(rows)) if dataset else [r.get(c) for r in rows]
           for c in ("dataset_name", "dataset_index")}
    first, repeats = {}, []
    for position, (name, index) in enumerate(zip(ids["dataset_name"], ids["dataset_index"])):
        key = row_key({"dataset_name": name, "dataset_index": index}, position)
        if key in first:
            repeats.append(f"row {position} (dataset_index {index}) repeats row {first[key]}")
        first.setdefault(key, position)
    if repeats:
        raise SystemExit(f"{source}: {len(repeats)} rows share their dataset_name and dataset_index with an earlier row "
                         f"(results are keyed on them): " + "; ".join(repeats[:10])
                         + ". Give every row its own dataset_index (curate.py prepare refuses duplicates).")


def check_flags(parser, args, at_least: dict[str, float], above: dict[str, float] | None = None) -> None:
    """parser.error naming the first flag out of range, before anything loads (a --group-size 0
    otherwise fails a minute later inside vLLM). `at_least`: {dest: lowest allowed}; `above`:
    {dest: bound the value must exceed}."""
    for dest, low in at_least.items():
        if getattr(args, dest) < low:
            parser.error(f"--{dest.replace('_', '-')} must be at least {low}, got {getattr(args, dest)}")
    for dest, low in (above or {}).items():
        if getattr(args, dest) <= low:
            parser.error(f"--{dest.replace('_', '-')} must be above {low}, got {getattr(args, dest)}")


RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "config.json", "rollouts", "eval",  # what sft.py and grpo.py write
               "tensorboard", "wandb", "wandb_run_id")


def check_out_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """A training run's --out must be empty unless --resume (continue that run) or --overwrite (start
    afresh: clear_outputs). A new run into an old one's directory would cut its metrics.jsonl and
    leave its later checkpoints beside the new ones, where --resume and evaluate.py pick them."""
    if out.is_dir() and any(out.iterdir()) and not (resume or overwrite):
        raise SystemExit(f"--out {out} already holds a run ({', '.join(sorted(p.name for p in out.iterdir()))}): "
                         "pass --resume to continue it, --overwrite to replace it, or another --out")


def clear_outputs(out: Path) -> None:
    """--overwrite: delete what an earlier run wrote into `out` (RUN_OUTPUTS; nothing else). Rank 0,
    once every check has passed."""
    for name in RUN_OUTPUTS:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
