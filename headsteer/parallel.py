"""Data parallelism under ``accelerate launch``: which share of the items this process takes, the
gathering of rows, and the one-writer rule for shared files (rank 0 writes, the others are told)."""
from __future__ import annotations

import os


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def process_shard():
    """(index, count) of this process under ``accelerate launch`` (0, 1 otherwise)."""
    if world_size() > 1:
        import torch
        from accelerate import PartialState

        st = PartialState(cpu=not torch.cuda.is_available())  # gloo on CPU-only machines
        return st.process_index, st.num_processes
    return 0, 1


def finish_processes():
    """Wait for every process, then close the process group: a rank that exits while another is
    still writing outputs tears gloo down under it (SIGABRT, "terminate called ...")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def gather_rows(rows: list[dict]) -> list[dict]:
    if world_size() > 1:
        from accelerate.utils import gather_object

        rows = gather_object(rows)
    return sorted(rows, key=lambda r: r["index"])


def on_main_process(fn):
    """``fn()`` run by rank 0 only; every process gets its result, or raises the HeadsteerError it
    raised (so a refusal ends every rank with the same one line instead of leaving them waiting)."""
    from .errors import HeadsteerError

    rank, world = process_shard()
    if world == 1:
        return fn()
    import torch.distributed as dist

    box = [None, None, None]
    error = None
    if rank == 0:
        try:
            box[0] = fn()
        except HeadsteerError as e:
            box[1] = str(e)
        except Exception as e:  # the other ranks must not wait forever on a broadcast that never comes
            error, box[2] = e, f"rank 0 failed: {e.__class__.__name__}: {e}"
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    if box[1] is not None:
        raise HeadsteerError(box[1])
    if box[2] is not None:
        raise RuntimeError(box[2])
    return box[0]
