"""The few collectives that distributed (DDP) training needs, written once.

Everything here is a no-op in a single process (``torch.distributed`` not initialised or a
world of one), so that callers need no branches of their own. Lightning starts the process
group (``strategy="ddp"``); these helpers only use it.

* :func:`world_of` -- ``(rank, world_size)`` of a trainer (``(0, 1)`` without one);
* :func:`all_reduce_sum` -- sum a tensor over every rank, in place;
* :func:`reduce_weighted_means` -- exact means over all ranks of per-rank means of unequal
  sample counts (the epoch losses);
* :func:`average_gradients` -- the gradient all-reduce of one optimiser step, weighted by the
  rows each rank contributed, so that a step over ``W`` ranks sees the gradient of the mean
  loss over the union of their batches (what one process with the whole batch would see);
* :func:`broadcast_float` -- rank 0's number on every rank (one choice everywhere).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """Whether a process group of more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_of(trainer) -> tuple[int, int]:
    """``(global_rank, world_size)`` of a Lightning trainer; ``(0, 1)`` for ``None``."""
    if trainer is None:
        return 0, 1
    return int(trainer.global_rank), int(trainer.world_size)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks in place (and return it); unchanged in one process."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def reduce_weighted_means(sums: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Means over all ranks: ``sum_r sums_r / sum_r count_r``.

    Parameters
    ----------
    sums : Tensor (K,)
        Per-rank sums (each a per-rank mean times the rank's sample count).
    count : Tensor ()
        The rank's sample count (0 for a rank without samples).
    """
    packed = all_reduce_sum(torch.cat([sums.reshape(-1), count.reshape(1).to(sums.dtype)]))
    return packed[:-1] / packed[-1]


def average_gradients(parameters: Sequence[torch.Tensor], rows: int, values: Iterable[torch.Tensor]
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace each parameter's gradient by its sample-weighted mean over all ranks.

    Each rank's gradient is that of its mean loss over ``rows`` rows; the result on every
    rank is ``sum_r rows_r * grad_r / sum_r rows_r``, the gradient of the mean loss over all
    rows of the step. ``values`` (0-d tensors, e.g. the step's loss terms) are averaged the
    same way in the same collective. A rank without rows (the last step of an epoch whose
    rows do not split evenly) passes ``rows=0`` and takes part with zeros. One all-reduce per
    call, no host synchronisation.

    Returns
    -------
    values : Tensor (K,)
        The weighted means of ``values`` over all rows of the step.
    total_rows : Tensor ()
        Rows of the step over all ranks.
    """
    parameters = list(parameters)
    reference = parameters[0]
    grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in parameters]
    values = [v.detach().reshape(1).to(reference.dtype) for v in values]
    flat = torch.cat(grads + values) * rows
    flat = torch.cat([flat, torch.full((1,), float(rows), dtype=flat.dtype, device=flat.device)])
    all_reduce_sum(flat)
    total_rows = flat[-1]
    flat = flat[:-1] / total_rows
    offset = 0
    for p in parameters:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p)
        offset += n
    return flat[offset:], total_rows


def broadcast_float(value: float, device: torch.device | str = "cpu") -> float:
    """Rank 0's ``value`` on every rank (exactly the same float everywhere)."""
    if not is_distributed():
        return float(value)
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.broadcast(tensor, src=0)
    return float(tensor.item())


def max_over_ranks(value: int, device: torch.device | str = "cpu") -> int:
    """The largest ``value`` of any rank."""
    if not is_distributed():
        return int(value)
    tensor = torch.tensor([int(value)], dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())
