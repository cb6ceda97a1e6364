"""Checkpoints: Hugging Face directories that transformers and vLLM load as they are, plus the sharded
training state that --resume needs.

Rank 0 writes a checkpoint into a temporary directory and renames it into place, so a killed run
never leaves a half-written one under the final name; its trainer_state.json, written last, lists
every file with its size, so one damaged later (deleted, truncated by a full disk or a partial
copy) is seen as incomplete and skipped. `model_id` names what produced a result (evaluate.py keys
its records on it).
"""

import json
import os
import shutil
import socket
import time
import uuid
from datetime import datetime
from pathlib import Path

import torch
import torch.distributed as dist

import lora as L
from model import full_state_items, print0


def check_shared_out(out: Path, wait: float = 10.0) -> None:
    """Multi-node runs only (torchrun's WORLD_SIZE above its LOCAL_WORLD_SIZE). Every rank saves its
    optimizer shards under --out, and --resume needs all of them in one directory: --out must be one
    directory that every node sees (a shared file system), not a node-local disk. Rank 0 writes a
    file of a fresh name there and every rank looks for it (for up to `wait` seconds: network file
    systems show new files late); if a rank does not see it, every rank stops, before anything is
    trained. All ranks call this, after rank 0 made `out`."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world <= int(os.environ.get("LOCAL_WORLD_SIZE", world)):
        return
    rank, name = dist.get_rank(), [f".shared-check-{uuid.uuid4().hex}"]
    dist.broadcast_object_list(name)
    probe = out / name[0]
    if rank == 0:
        probe.write_text(socket.gethostname())
    dist.barrier()
    deadline = time.time() + wait
    while not probe.exists() and time.time() < deadline:
        time.sleep(0.5)
    seen = [None] * world
    dist.all_gather_object(seen, (probe.exists(), socket.gethostname()))  # every rank has looked
    if rank == 0:
        probe.unlink()
    blind = [f"rank {r} on {host}" for r, (ok, host) in enumerate(seen) if not ok]
    if blind:
        raise SystemExit(f"--out {out} is not one directory that every node sees: {', '.join(blind)} cannot see the "
                         f"file rank 0 wrote there on {seen[0][1]}. Every rank saves its optimizer shards under --out "
                         "and --resume needs them all: put --out on a file system every node mounts at the same path "
                         "(README: Multi-node).")


def save_checkpoint(model, processor, out_dir: str | Path, meta: dict, dtype: torch.dtype = torch.bfloat16,
                    resume_state: dict | None = None) -> None:
    """All ranks call this. The checkpoint is assembled in `.NAME.partial` beside `out_dir`: the
    optional `resume_state` (sharded tensors, e.g. optimizer state) by every rank through
    torch.distributed.checkpoint into `resume/`, then by rank 0 the Hugging Face files (config,
    safetensors in `dtype`, processor and tokenizer files) and trainer_state.json with `meta` and the
    size of every other file, last. Rank 0 then renames it into place: a run killed at any moment
    leaves a complete checkpoint or none under the final name, and a file damaged later (deleted,
    truncated by a full disk or a partial copy) shows in checkpoint_problem."""
    out_dir = Path(out_dir)
    rank = dist.get_rank() if dist.is_initialized() else 0
    tmp = out_dir.with_name(f".{out_dir.name}.partial")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if dist.is_initialized():
        dist.barrier()
    if resume_state is not None:
        import torch.distributed.checkpoint as dcp

        dcp.save(resume_state, checkpoint_id=str(tmp / "resume"))
    state = {}
    for name, tensor in full_state_items(model, dtype):  # every rank gathers (collectives), rank 0 keeps
        if rank == 0:
            state[name] = tensor.cpu()
    adapter = L.adapter_state(model) if L.is_lora(model) else None  # LoRA: merged above, and alone here
    if rank == 0:
        if adapter is not None:
            L.save_adapter(model.lora_config, adapter, tmp / "adapter")
        model.save_pretrained(tmp, state_dict=state)
        config = model.config.__class__.from_dict(model.config.to_dict())
        config.dtype = dtype  # what the weights on disk are: from_pretrained and vLLM read it
        config.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        write_trainer_state(tmp, meta)  # last: it lists every other file, with its size
        if out_dir.exists():  # re-saving the same step: move the old copy aside first
            old = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old)
        else:
            tmp.rename(out_dir)
    state.clear()
    if dist.is_initialized():
        dist.barrier()


def save_training_checkpoint(model, optimizer, processor, path: Path, meta: dict, dtype: torch.dtype,
                             keep_last: int = 0) -> None:
    """A training checkpoint: the Hugging Face directory plus `resume/`, the fp32 model shards and the
    optimizer state through torch.distributed.checkpoint (each rank writes its own shards; frozen
    parameters, such as a LoRA run's base, are left out: --resume reads them from --model again).
    With keep_last, older `step_*` siblings are deleted once this one is complete."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer, options=_trained_only(model))
    save_checkpoint(model, processor, path, meta, dtype=dtype, resume_state={"model": model_sd, "optim": optim_sd})
    if keep_last and (not dist.is_initialized() or dist.get_rank() == 0):
        for old in sorted(path.parent.glob("step_*"))[:-keep_last]:
            shutil.rmtree(old)


def _trained_only(model):
    """The resume state's options: the trainable parameters only (all of them without LoRA)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    frozen = any(not p.requires_grad for p in model.parameters())
    return StateDictOptions(ignore_frozen_params=True, strict=not frozen)


def write_trainer_state(ckpt: Path, meta: dict) -> None:
    """trainer_state.json, the last file of a checkpoint: `meta` plus "files", the size in bytes of
    every other file in it (Hugging Face files and the sharded resume/ state alike)."""
    files = {str(p.relative_to(ckpt)): p.stat().st_size for p in sorted(ckpt.rglob("*"))
             if p.is_file() and p.name != "trainer_state.json"}
    (ckpt / "trainer_state.json").write_text(json.dumps({**meta, "files": files}, indent=2, default=str))


def checkpoint_problem(ckpt: Path, resume: bool = False) -> str | None:
    """Why the checkpoint directory `ckpt` cannot be used, or None when it is complete: its
    trainer_state.json (written last) reads, and every file it lists is there with the size it had
    when saved. resume=True also wants the sharded training state (resume/) that --resume loads."""
    try:
        files = json.loads((ckpt / "trainer_state.json").read_text())["files"]
    except FileNotFoundError:
        return "no trainer_state.json (killed while saving?)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"trainer_state.json has no readable file list ({type(e).__name__})"
    if resume and "resume/.metadata" not in files:
        return "no optimizer state (resume/)"
    for name, size in files.items():
        path = ckpt / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size:,} bytes, {size:,} when saved"
    return None


def complete_checkpoints(checkpoints: Path) -> list[Path]:
    """The complete `step_*` checkpoints under `checkpoints` (checkpoint_problem), oldest first."""
    return [p for p in sorted(checkpoints.glob("step_*")) if checkpoint_problem(p) is None]


def load_training_checkpoint(model, optimizer, checkpoints: Path) -> int:
    """Load the last complete `step_*` checkpoint under `checkpoints` into the sharded model and the
    optimizer; return its step (0 when there is none). A newer one that is incomplete or damaged
    (checkpoint_problem) is skipped with the reason, and the run continues from the one before."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    for ckpt in sorted(checkpoints.glob("step_*"), reverse=True):
        problem = checkpoint_problem(ckpt, resume=True)
        if problem is None:
            break
        print0(f"resume: skipping {ckpt}: {problem}")
    else:
        print0(f"resume: no complete checkpoint in {checkpoints}, starting at step 0")
        return 0
    options = _trained_only(model)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(ckpt / "resume"))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=options)
    step = json.loads((ckpt / "trainer_state.json").read_text())["step"]
    print0(f"resumed from {ckpt} (step {step})")
    return step


def model_id(path: str) -> str:
    """What produced a result, for keying results: a hub id as it is; a local checkpoint as its
    absolute path and the time its weights were written, so a checkpoint saved again under the
    same name (a re-run with --overwrite) counts as another model."""
    local = Path(path)
    if not local.is_dir():
        return path
    written = max((p.stat().st_mtime for p in local.glob("*.safetensors")), default=local.stat().st_mtime)
    return f"{local.resolve()}@{datetime.fromtimestamp(written).isoformat()}"
