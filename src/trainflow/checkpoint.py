"""Checkpoint files: written atomically and durably, loaded safely, found again by ``resume``.

Writing: the state goes to a temporary file in the same directory, which is fsynced, renamed
over the final name with ``os.replace`` (atomic), and the directory is fsynced. A crash at any
moment leaves either the previous complete file or the new complete file, never a torn one;
the temporary file's name starts with a dot and never matches a checkpoint name.

A disk that fills up during the write raises an ``OSError`` (``errno.ENOSPC``) naming the
checkpoint and saying the disk is full; the earlier checkpoints are untouched.

Loading: the archive's CRC-32 of every member (written by ``torch.save``) is verified first, so
a flipped bit anywhere in a tensor is refused, not loaded; then ``torch.load(...,
weights_only=True)``: a file that would need to run pickled code to load is refused, never
executed. Errors name the file and say what is wrong with it.

Sharded checkpoints (``distributed="fsdp"``): :func:`save_sharded` writes a folder
``ckpt-u<updates>-e<epoch>.dcp`` through ``torch.distributed.checkpoint`` (DCP): every rank
writes the slices of the sharded tensors it holds (``__<rank>_0.distcp``, with DCP's
``.metadata``), and rank 0 writes the rest of the state (loop, data position, every rank's
random generators, schedules, metrics, the tensors that are not sharded) as a
:func:`save` file ``trainflow.pt`` inside it. The folder is built under a temporary name and
renamed by rank 0 once every rank's part and the rest are complete and fsynced, so a kill at
any moment leaves the newest complete checkpoint loadable. :func:`load` reads such a folder
whole (every tensor full, in one process, without a process group): a ``Trainer`` in one
process loads it as it loads a file (``world_size_change="allow"``). An fsdp ``Trainer`` reads
it with ``load(folder, mesh=...)``: every rank together, each reading only the rows of its own
shards. DCP's ``.metadata`` is a pickle: it is checked to hold nothing
but DCP's own metadata classes before DCP reads it.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import sys
import re
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["FORMAT", "INDEX", "latest", "load", "path_for", "read_index", "remove", "save", "save_sharded"]

#: the marker and version of trainflow's checkpoint layout
FORMAT = "trainflow-checkpoint-1"
#: the file in a checkpoint folder that lists its checkpoints (written by the ``Checkpoint`` callback)
INDEX = "index.json"
INDEX_FORMAT = "trainflow-checkpoint-index-1"
_NAME = re.compile(r"^ckpt-u(\d{9})(?:-e(\d+))?\.(?:pt|dcp)$")
#: the suffix of a sharded checkpoint's folder, and the file in it that holds the rest of the state
SHARDED = ".dcp"
REST = "trainflow.pt"


def path_for(directory: str | Path, updates: int, epoch: int | None = None) -> Path:
    """The file name of the checkpoint taken after ``updates`` updates (sorts by update count).

    Example:
        >>> path_for("runs/gan/checkpoints", 1200, epoch=3).name
        'ckpt-u000001200-e3.pt'
    """
    suffix = "" if epoch is None else f"-e{epoch}"
    return Path(directory) / f"ckpt-u{updates:09d}{suffix}.pt"


def checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoints in ``directory`` (files, and sharded checkpoints' folders), oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if _NAME.match(p.name)]
    return sorted(found, key=lambda p: tuple(int(g or -1) for g in _NAME.match(p.name).groups()))


def latest(directory: str | Path) -> Path | None:
    """The newest complete checkpoint in ``directory`` (None when there is none).

    Example:
        >>> import tempfile, torch
        >>> folder = tempfile.mkdtemp()
        >>> latest(folder) is None
        True
        >>> _ = save({"w": torch.ones(1)}, path_for(folder, 10))
        >>> _ = save({"w": torch.ones(1)}, path_for(folder, 20))
        >>> latest(folder).name
        'ckpt-u000000020.pt'
    """
    found = checkpoints(directory)
    return found[-1] if found else None


def resume_path(resume: Any, out_dir: Path | None) -> Path | None:
    """The file ``fit(..., resume=resume)`` continues from (None: nothing to resume yet).

    ``"latest"`` is the newest complete checkpoint in ``<out_dir>/checkpoints`` (None on a first
    run, which then starts fresh); a path is that file.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> resume_path("latest", Path(tempfile.mkdtemp())) is None
        True
        >>> resume_path("runs/a/checkpoints/ckpt-u000000020.pt", None).name
        'ckpt-u000000020.pt'
    """
    if resume == "latest":
        if out_dir is None:
            raise ValueError(
                "fit: resume='latest' looks in <out_dir>/checkpoints, but the trainer has no out_dir. "
                "Received: out_dir=None. Pass Trainer(..., out_dir='runs/my-run')."
            )
        return latest(Path(out_dir) / "checkpoints")
    if isinstance(resume, (str, Path)):
        return Path(resume)
    raise TypeError(f"fit: `resume` must be 'latest', a checkpoint path or None. Received: resume={resume!r}.")


def read_index(directory: str | Path) -> list[dict[str, Any]]:
    """The entries of ``<directory>/index.json``, oldest first; ``[]`` when there is no index.

    Each entry is a dict as the ``Checkpoint`` callback writes it: ``file``, ``update``,
    ``epoch``, ``time``, ``value`` (the monitored value or None), ``reason`` (why it was saved:
    ``"epoch"``, ``"update"``, ``"signal"``, ``"requested"``, ``"nonfinite"``...), ``best``
    and ``last`` (the newest one, which ``resume="latest"`` picks). The index is
    informational: :func:`latest` finds the newest complete file without it.

    Raises a ValueError naming the file when it is not a readable index.

    Example:
        >>> import tempfile, torch
        >>> from trainflow import Step, Trainer
        >>> from trainflow.callbacks import Checkpoint
        >>> model = torch.nn.Linear(2, 1)
        >>> step = Step(lambda x: model(x).pow(2).mean(), torch.optim.SGD(model.parameters(), lr=0.1))
        >>> tmp = tempfile.TemporaryDirectory()
        >>> Trainer(model, step, callbacks=[Checkpoint()], out_dir=tmp.name).fit([torch.ones(4, 2)] * 3, epochs=2)
        >>> [(e["file"], e["update"], e["epoch"], e["reason"], e["last"]) for e in read_index(f"{tmp.name}/checkpoints")]
        [('ckpt-u000000003-e1.pt', 3, 1, 'epoch', False), ('ckpt-u000000006-e2.pt', 6, 2, 'epoch', True)]
        >>> read_index(tmp.name)  # no index there
        []
        >>> tmp.cleanup()
    """
    path = Path(directory) / INDEX
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    try:
        entries = json.loads(text)["checkpoints"]
        if not isinstance(entries, list):
            raise TypeError(type(entries).__name__)
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(
            f"{str(path)!r} is not a trainflow checkpoint index ({type(error).__name__}: {error}). Received: a "
            "file without a 'checkpoints' list. Delete it: the Checkpoint callback rebuilds it from the files."
        ) from None
    return [e for e in entries if isinstance(e, dict) and "file" in e]


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` to ``path`` atomically and durably; errors are raised, never swallowed.

    Example:
        >>> import tempfile, torch
        >>> folder = tempfile.mkdtemp()
        >>> p = save({"w": torch.ones(2)}, path_for(folder, 7))
        >>> load(p)["w"]
        tensor([1., 1.])
    """
    path = Path(path)
    if "torch.distributed.tensor" in sys.modules:  # no DTensor can exist before that import
        from trainflow.fsdp import is_sharded_state

        if is_sharded_state(state):
            raise ValueError(
                f"checkpoint.save: `state` holds sharded tensors (DTensor), the state of a distributed='fsdp' "
                f"run; a file written by one rank would hold that rank's slices only. Received: a sharded state "
                f"for path={str(path)!r}. Call checkpoint.save_sharded(state, path) on every rank (the "
                "Checkpoint callback does), or save a state from distributed='replicate' or one process."
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; a checkpoint is an ordinary file
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, "state": state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        if _disk_full(error, path.parent):
            raise _no_space(path, error) from error
        raise
    _fsync_dir(path.parent)
    return path


def _disk_full(error: BaseException, directory: Path) -> bool:
    """Whether ``error`` comes from a full disk.

    ``torch.save`` reports a failed write as ``RuntimeError: [enforce fail at
    inline_container.cc] . unexpected pos ...``; the ``OSError(ENOSPC)`` it hit is in the
    exception's context. Where it is not, a folder with no space left says the same.
    """
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen = seen.__cause__ or seen.__context__
    if not isinstance(error, (RuntimeError, OSError)):
        return False
    try:
        return shutil.disk_usage(directory).free == 0
    except OSError:
        return False


def _no_space(path: Path, error: BaseException) -> OSError:
    """The error for a checkpoint (or its index) that did not fit on the disk."""
    try:
        free = f"{shutil.disk_usage(path.parent).free} bytes free"
    except OSError:
        free = "free space unknown"
    return OSError(
        errno.ENOSPC,
        f"The disk is full: writing {str(path)!r} failed ({free}; {type(error).__name__}: "
        f"{str(error).splitlines()[0][:120] if str(error) else 'no detail'}). Nothing was replaced: the earlier "
        "checkpoints in that folder are intact. Free some space (or lower Checkpoint(keep_last=...), or write to "
        "another disk with Checkpoint(dir=...)) and resume with fit(..., resume='latest').",
    )


def _corrupt(path: Path, detail: str) -> ValueError:
    return ValueError(
        f"Checkpoint {str(path)!r} is truncated or corrupt and cannot be read ({detail}). "
        "Resume from an earlier checkpoint in the same folder."
    )


def _unpickler_reason(error: Exception) -> str:
    """The line of torch's message that names what was refused, without colour codes or advice."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(error).splitlines()]
    named = [line for line in lines if line.startswith("WeightsUnpickler error:")]
    return (named or lines or ["no detail"])[0][:200]


def _verify_crc(path: Path) -> None:
    """Check every archive member against the CRC-32 ``torch.save`` wrote for it.

    ``torch.load`` does not: a flipped bit inside a tensor would load as a changed weight.
    """
    with zipfile.ZipFile(path) as archive:
        bad = archive.testzip()
    if bad is not None:
        raise zipfile.BadZipFile(f"CRC-32 mismatch in {bad!r}: the file changed after it was written")


def load(path: str | Path, mesh: Any = None) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save`, without ever running pickled code.

    A sharded checkpoint's folder (:func:`save_sharded`) is read whole, every tensor full, in
    this process alone (no process group is needed). With ``mesh`` (a one-dimensional
    ``DeviceMesh``: the one ``fully_shard`` shards over), every rank of it reads the folder
    together (a collective) and each reads only its own slices: every sharded tensor comes back
    as a ``DTensor`` sharded on dimension 0 over ``mesh``, as FSDP2 shards a parameter (under
    another world size than the one that wrote it, too). A checkpoint file ignores ``mesh``.

    Example:
        >>> import tempfile, torch
        >>> p = save({"step": 3, "w": torch.zeros(2)}, path_for(tempfile.mkdtemp(), 3))
        >>> load(p)["step"]
        3
    """
    path = Path(path)
    if path.is_dir() and path.suffix == SHARDED:
        return _load_sharded(path, mesh)
    if not path.is_file():
        raise FileNotFoundError(
            f"Checkpoint not found. Received: path={str(path)!r}. "
            "Pass a file written by trainflow.callbacks.Checkpoint, or resume='latest'."
        )
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; anything else is damaged
        raise _corrupt(path, "not a zip archive")
    try:
        _verify_crc(path)
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"Checkpoint {str(path)!r} was refused: loading it would run pickled code or build objects "
            f"other than tensors and plain containers ({_unpickler_reason(error)}). "
            "trainflow never loads such files; re-create the checkpoint with trainflow."
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as error:
        detail = str(error).splitlines()[0][:200] if str(error) else "no detail"
        raise _corrupt(path, f"{type(error).__name__}: {detail}") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT or "state" not in obj:
        raise ValueError(
            f"{str(path)!r} is not a trainflow checkpoint (expected a file written by trainflow.checkpoint.save, "
            f"format {FORMAT!r}). Received: an object of type {type(obj).__name__}"
            f"{' with keys ' + str(sorted(obj)[:8]) if isinstance(obj, dict) else ''}."
        )
    return obj["state"]


def remove(path: str | Path) -> None:
    """Delete a checkpoint: a file, or a sharded checkpoint's folder (nothing if it is gone).

    Example:
        >>> import tempfile, torch
        >>> p = save({"w": torch.ones(1)}, path_for(tempfile.mkdtemp(), 1))
        >>> remove(p); p.exists()
        False
    """
    path = Path(path)
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _sharded_leaves(state: Any, at: tuple = ()) -> Any:
    """``state`` with every ``DTensor`` replaced by None, and the paths of those tensors."""
    from torch.distributed.tensor import DTensor

    if isinstance(state, DTensor):
        return None, [list(at)]
    if isinstance(state, dict):
        out, paths = {}, []
        for k, v in state.items():
            out[k], found = _sharded_leaves(v, (*at, k))
            paths += found
        return out, paths
    return state, []


def save_sharded(state: dict[str, Any], path: str | Path) -> Path:
    """Write a state holding sharded tensors (``distributed="fsdp"``) as a DCP checkpoint folder,
    atomically: a collective, called by every rank. Returns the folder (``path`` with the
    suffix ``.dcp``).

    Every rank writes its slices of the sharded tensors (``torch.distributed.checkpoint``); rank 0
    writes the rest of ``state`` (``trainflow.pt``), then renames the temporary folder.

    Example (in one process, a group of one):
        >>> import tempfile, torch, torch.distributed as dist
        >>> from torch.distributed.tensor import distribute_tensor, init_device_mesh
        >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        >>> w = distribute_tensor(torch.arange(4.0), init_device_mesh("cpu", (1,)))
        >>> folder = save_sharded({"models": {"m": {"w": w}}, "loop": {"updates": 3}},
        ...                       path_for(tempfile.mkdtemp(), 3))
        >>> type(load(folder, mesh=w.device_mesh)["models"]["m"]["w"]).__name__  # each rank's slices
        'DTensor'
        >>> dist.destroy_process_group()
        >>> folder.name, load(folder)["models"]["m"]["w"].tolist(), load(folder)["loop"]
        ('ckpt-u000000003.dcp', [0.0, 1.0, 2.0, 3.0], {'updates': 3})
    """
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    path = Path(path).with_suffix(SHARDED)
    rest, paths = _sharded_leaves(state)
    tensors = {str(i): _at(state, p) for i, p in enumerate(paths)}
    rank = dist.get_rank()
    name = [None]
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        name = [tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)]
        os.chmod(name[0], 0o755)  # mkdtemp makes 0700; a checkpoint is an ordinary folder
    dist.broadcast_object_list(name, src=0)
    tmp = Path(name[0])
    try:
        dcp.save(tensors, storage_writer=dcp.FileSystemWriter(tmp, sync_files=True))
        if rank == 0:
            save({"sharded": paths, "state": rest}, tmp / REST)
            _fsync_dir(tmp)
            if path.exists():  # a save at the same point: the new one replaces it
                old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
                os.replace(path, old / path.name)
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
            _fsync_dir(path.parent)
    except BaseException as error:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            if _disk_full(error, path.parent):
                raise _no_space(path, error) from error
        raise
    dist.barrier()  # every rank goes on once the checkpoint has its name
    return path


def _at(state: Any, keys: list) -> Any:
    for k in keys:
        state = state[k]
    return state


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's ``.metadata`` pickle, allowed to build DCP's metadata classes and nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("torch.distributed.checkpoint."):
            found = super().find_class(module, name)
            if isinstance(found, type):  # DCP's metadata classes; never one of its functions (save, convert...)
                return found
        elif (module, name) in _METADATA_CLASSES or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"WeightsUnpickler error: Unsupported global: {module}.{name}")


_METADATA_CLASSES = {("torch", "Size"), ("collections", "OrderedDict"), ("torch.serialization", "_get_layout"),
                     ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "Path")}


def _template(size: tuple[int, ...], dtype: torch.dtype, mesh: Any) -> torch.Tensor:
    """Where DCP reads one saved tensor: a full CPU tensor, or this rank's dim-0 shard on ``mesh``."""
    if mesh is None:
        return torch.empty(size, dtype=dtype)
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor import empty as sharded_empty

    return sharded_empty(size, dtype=dtype, device_mesh=mesh, placements=[Shard(0) if size else Replicate()])


def _load_sharded(path: Path, mesh: Any = None) -> dict[str, Any]:
    """A sharded checkpoint's folder: the rest of the state with every tensor put back, full (in
    one process), or as this rank's slices on ``mesh`` (every rank together)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    if not (path / REST).is_file() or not (path / ".metadata").is_file():
        raise _corrupt(path, f"a sharded checkpoint folder without {REST!r} or '.metadata'")
    saved = load(path / REST)
    try:
        with open(path / ".metadata", "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"Checkpoint {str(path)!r} was refused: its '.metadata' would build objects other than "
            f"torch.distributed.checkpoint's metadata ({_unpickler_reason(error)}). trainflow never loads such "
            "files; re-create the checkpoint with trainflow."
        ) from None
    except (EOFError, OSError, AttributeError, ImportError) as error:
        raise _corrupt(path, f"'.metadata': {type(error).__name__}: {error}") from None
    items = getattr(metadata, "state_dict_metadata", None)
    if not isinstance(items, dict) or not all(hasattr(m, "size") and hasattr(m, "properties") for m in items.values()):
        raise _corrupt(path, "'.metadata' lists items other than tensors, which trainflow never writes")
    template = {key: _template(tuple(meta.size), meta.properties.dtype, mesh) for key, meta in items.items()}
    try:
        if mesh is not None:  # every rank reads the slices that overlap its shards, and nothing else
            dcp.load(template, storage_reader=dcp.FileSystemReader(path), process_group=mesh.get_group())
        else:
            with warnings.catch_warnings():  # reading in one process is the intent here
                warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
                dcp.load(template, storage_reader=dcp.FileSystemReader(path), no_dist=True)
    except (Exception, CheckpointException) as error:  # a missing or damaged shard
        detail = str(error).splitlines()[0][:200] if str(error) else "no detail"
        raise _corrupt(path, f"{type(error).__name__}: {detail}") from None
    state = saved["state"]
    for i, keys in enumerate(saved["sharded"]):
        parent = _at(state, keys[:-1])
        parent[keys[-1]] = template[str(i)]
    return state
