"""Sharded checkpoints with torch.distributed.checkpoint (`train.checkpoint=dcp`).

A DCP checkpoint is a folder `step_XXXXXXXX.dcp/`: every rank writes its own shards of the model,
optimizer and EMA tensors (no gather on rank 0), and rank 0 adds `trainer.pt` with everything
that is not a tensor shard (step, data position, RNG states, config, optimizer hyper-parameters).
It loads on any number of ranks: DCP reshards on read.

Nothing here unpickles code. DCP itself reads its `.metadata` with `pickle.load` and non-tensor
entries with `torch.load(weights_only=False)`; we store tensors only in DCP (so no entry is ever
read that way), read `.metadata` with an unpickler that admits only DCP's own metadata classes,
and `trainer.pt` weights-only.
"""
from __future__ import annotations

import io
import os
import pickle
import shutil
from pathlib import Path

import torch

TRAINER_FILE = "trainer.pt"
METADATA_FILE = ".metadata"


def _allowed(module: str, name: str) -> bool:
    import torch.distributed.checkpoint.metadata as md

    if module == "torch":
        return name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)
    if module == "torch.distributed.checkpoint.metadata":
        return isinstance(getattr(md, name, None), type)
    return (module, name) in {("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
                              ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
                              ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath")}


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, f, path):
        super().__init__(f)
        self.path = path

    def find_class(self, module, name):
        if not _allowed(module, name):
            from .checkpoint import UnsafeCheckpointError

            raise UnsafeCheckpointError(f"{self.path}: refused to unpickle (it calls or builds {module}.{name}, which "
                                        "DCP metadata never holds); it is foreign or tampered with: do not load it")
        return super().find_class(module, name)


def _reader(path: Path):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        """FileSystemReader whose metadata is read by the restricted unpickler."""

        def read_metadata(self, *args, **kwargs):
            meta_path = Path(self.path) / METADATA_FILE
            with open(meta_path, "rb") as f:
                metadata = _MetadataUnpickler(io.BytesIO(f.read()), meta_path).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(path))


def _tensor_leaves(tree, prefix=""):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _tensor_leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def save(path, tensors: dict, extra: dict, *, is_main: bool, barrier) -> Path:
    """Write `tensors` (nested dicts of tensors / DTensor shards) with DCP and `extra` beside them, atomically:
    into a temporary folder, renamed once every rank has written. Every rank calls it."""
    import torch.distributed.checkpoint as dcp

    from .checkpoint import _atomic_write

    path = Path(path)
    not_tensors = [k for k, v in _tensor_leaves(tensors) if not isinstance(v, torch.Tensor)]
    if not_tensors:  # DCP would pickle them, and read them back with weights_only=False
        raise TypeError(f"DCP checkpoints hold tensors only; these are not: {not_tensors[:5]}")
    tmp = path.with_name(f".{path.name}.tmp-dcp")
    if is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier()
    dcp.save(tensors, checkpoint_id=str(tmp))
    if is_main:
        _atomic_write(tmp / TRAINER_FILE, lambda f: torch.save(extra, f))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    barrier()
    return path


def metadata(path):
    """DCP's metadata of checkpoint folder `path`, read without running code."""
    return _reader(Path(path)).read_metadata()


def read_extra(path) -> dict:
    """`trainer.pt` (weights-only) plus `tensor_shapes`: flattened key -> shape of every stored tensor."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from .checkpoint import TrainCheckpointError, UnsafeCheckpointError, safe_load

    path = Path(path)
    try:
        extra = safe_load(path / TRAINER_FILE)
        meta = metadata(path)
    except UnsafeCheckpointError:
        raise
    except Exception as e:
        raise TrainCheckpointError(f"{path}: unreadable DCP checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(extra, dict):
        raise TrainCheckpointError(f"{path}/{TRAINER_FILE}: not a microdit DCP checkpoint")
    extra["tensor_shapes"] = {k: tuple(v.size) for k, v in meta.state_dict_metadata.items()
                              if isinstance(v, TensorStorageMetadata)}
    extra["planner_data"] = meta.planner_data
    return extra


def load_into(path, template: dict) -> None:
    """Fill `template` (nested tensors or DTensor shards, as this run lays them out) from checkpoint `path`,
    resharding as needed; every rank calls it."""
    import torch.distributed.checkpoint as dcp

    dcp.load(template, storage_reader=_reader(Path(path)))


def load_full(path) -> dict:
    """A DCP checkpoint as one process's full state: the training-checkpoint dict `load_checkpoint` returns
    for a .pt file (model, optimizer, ema with whole tensors; step, rng, config, ...). For sampling, export
    (`microdit export` of a DCP run) and `train.init_from`; no process group needed."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = Path(path)
    extra = read_extra(path)
    meta = metadata(path)
    template: dict = {}
    for key, md in meta.state_dict_metadata.items():
        if not isinstance(md, TensorStorageMetadata):
            continue
        node = template
        *parents, leaf = extra["planner_data"].get(key, tuple(key.split(".")))
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = torch.empty(md.size, dtype=md.properties.dtype)
    import torch.distributed.checkpoint as dcp

    dcp.load(template, storage_reader=_reader(path), no_dist=True)
    state = {k: v for k, v in extra.items() if k not in ("tensor_shapes", "planner_data", "param_groups", "ema_meta")}
    state["model"] = template.get("model", {})
    state["optimizer"] = {"state": template.get("optimizer", {}), "param_groups": extra.get("param_groups", [])}
    ema = extra.get("ema_meta")
    state["ema"] = dict(ema, shadow=template.get("ema", {})) if ema else None
    return state
