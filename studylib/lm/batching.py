"""Token rows to padded tensors, sequence log-probs of those tensors under a model, and batches split over processes.

**Several processes** (``accelerate launch``): each process holds a part of a batch. ``gather_rows`` gives every
process the whole batch's per-row values (log-probs, labels, rewards), its own rows keeping their gradient, so
each computes the one-process loss of the whole batch, and every batch statistic in it (KTO's ``z0``, BCO's
running mean, RLOO's group means, a class fraction, the logged metrics) is a sum over all the rows divided by
their total count, never a mean of per-process means. The gradient of that loss through one process's rows is
that process's share of the whole batch's gradient: the shares add up (``sum_gradients``; under a wrapper that
averages them, ``scale_for_averaged_gradients``).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor
from tqdm.auto import tqdm

from studylib.logprobs import completion_logps


def pad_token_id(tokenizer) -> int:
    """The id that pads batches: the tokenizer's pad token, else its EOS (masks, never pad ids, mark real tokens)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


BATCH_KEYS = ("input_ids", "attention_mask", "position_ids", "completion_mask")  # what pad_sequences returns


def pad_sequences(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int) -> dict:
    """One padded batch of prompt + completion rows: prompts left-padded, completions right-padded.

    Every prompt ends at the same column, so every completion starts at the same one, and the logits a loss
    needs are one slice of positions shared by the whole batch (see ``model_logps``).
    Returns ``input_ids``, ``attention_mask``, ``position_ids`` (0 at each row's first real token) and
    ``completion_mask`` (1 on completion tokens), each (rows, width).
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    prompt_width = max(len(p) for p in prompts)
    width = prompt_width + max(len(c) for c in completions)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    completion = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        if not c:
            raise ValueError(f"row {i} has an empty completion")
        start, end = prompt_width - len(p), prompt_width + len(c)
        input_ids[i, start:end] = torch.tensor(list(p) + list(c))
        attention[i, start:end] = 1
        completion[i, prompt_width:end] = 1
    position_ids = (attention.cumsum(dim=1) - 1).clamp(min=0)
    return {
        "input_ids": input_ids,
        "attention_mask": attention,
        "position_ids": position_ids,
        "completion_mask": completion,
    }


def last_token_index(attention_mask: Tensor) -> Tensor:
    """Column of each row's last real token (padding on either side)."""
    if not attention_mask.any(dim=1).all():
        raise ValueError("a row of the batch is all padding")
    width = attention_mask.shape[1]
    return width - 1 - attention_mask.flip(1).to(torch.long).argmax(dim=1)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside any distributed or compiled wrapper (``module`` / ``_orig_mod`` attributes)."""
    while True:
        inner = model.__dict__.get("_modules", {}).get("module") or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


def _contiguous_first_argument(module: torch.nn.Module, args: tuple) -> tuple:
    return (args[0].contiguous(), *args[1:])


def _output_layer_gets_contiguous_input(model: torch.nn.Module) -> None:
    """Make the output layer's input contiguous (once per model).

    ``logits_to_keep`` hands the output layer a strided slice of the hidden states; for an input that requires
    grad and is not contiguous, ``torch.matmul`` does not fold the batch into one GEMM but runs a batched GEMM
    against the (vocab x hidden) weight expanded over the batch, with copies of it (``bench/profile_step.py``,
    3 bf16 RDRO steps on the 135M model: 6.81 s of CPU with, 6.09 s without). A copy of the small slice avoids it.
    """
    head = unwrap(model).get_output_embeddings()
    if head is not None and not getattr(head, "_studylib_contiguous_input", False):
        head.register_forward_pre_hook(_contiguous_first_argument)
        head._studylib_contiguous_input = True


def _accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    base = unwrap(model)
    base = base.get_base_model() if hasattr(base, "get_base_model") else base
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def model_logps(model: torch.nn.Module, batch: dict[str, Tensor], average: bool = False) -> Tensor:
    """Per-sequence completion log-probs of a padded batch under ``model`` (gradients flow if enabled).

    Only the positions that predict a completion token go through the output layer (``logits_to_keep``), and
    their log-softmax is taken in float32 chunks (``studylib.logprobs``): no work and no memory on the prompt's
    logits. Works for any right-padded completion layout; ``pad_sequences``' layout makes the slice tight.
    """
    input_ids, completion_mask = batch["input_ids"], batch["completion_mask"]
    columns = completion_mask.any(dim=0).nonzero().flatten()
    if len(columns) == 0 or columns[0] == 0:
        raise ValueError("every row needs a prompt of at least one token and a non-empty completion")
    first = int(columns[0])  # logits at positions first-1 .. width-2 predict tokens first .. width-1
    keep = input_ids.shape[1] - first + 1
    inputs = {"input_ids": input_ids, "attention_mask": batch["attention_mask"], "use_cache": False}
    if "position_ids" in batch:
        inputs["position_ids"] = batch["position_ids"]
    if _accepts_logits_to_keep(model):
        _output_layer_gets_contiguous_input(model)
        logits = model(**inputs, logits_to_keep=keep).logits[:, :-1]
    else:
        logits = model(**inputs).logits[:, first - 1 : -1]
    return completion_logps(logits, input_ids[:, first:], completion_mask[:, first:], average)


@torch.no_grad()
def score_sequences(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    pad_id: int,
    batch_size: int = 8,
    average: bool = False,
    desc: str | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Log-probs of many (prompt, completion) token rows, in batches built on ``device`` (where ``model`` is: the
    run's ``Runtime.device``), with a progress bar if ``desc``; returned on the CPU."""
    was_training = model.training
    model.eval()
    out = []
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc=desc, disable=desc is None):
        batch = pad_sequences(prompts[start : start + batch_size], completions[start : start + batch_size], pad_id)
        out.append(model_logps(model, {k: v.to(device) for k, v in batch.items()}, average).float().cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


def process_group() -> tuple[int, int]:
    """``(rank, number of processes)`` of the default ``torch.distributed`` group; ``(0, 1)`` when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def process_share(n_rows: int) -> slice:
    """This process's rows of a batch of ``n_rows`` that every process holds whole: contiguous, in rank order,
    sizes differing by at most one (``gather_rows`` puts the whole batch back together in that order)."""
    rank, processes = process_group()
    return slice(rank * n_rows // processes, (rank + 1) * n_rows // processes)


def gather_rows(*local: Tensor | None) -> tuple[Tensor | None, ...]:
    """The whole batch on every process: each tensor's rows from every process, concatenated in rank order.

    The tensors of one call have one number of rows, which may differ between processes, zero included. This
    process's rows are its own tensors, gradients and all; the other processes' rows arrive detached. None stays
    None (the same arguments must be None on every process). One process: the tensors themselves, untouched.
    """
    rank, processes = process_group()
    present = [t for t in local if t is not None]
    if processes == 1 or not present:
        return local
    n_rows = present[0].shape[0]
    if any(t.shape[0] != n_rows for t in present):
        raise ValueError(f"gather_rows: tensors of one call need one number of rows, got {[len(t) for t in present]}")
    device = present[0].device
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(processes)]
    dist.all_gather(sizes, torch.tensor([n_rows], device=device))
    sizes = [int(size) for size in sizes]
    width = max(sizes)
    out = []
    for tensor in local:
        if tensor is None:
            out.append(None)
            continue
        payload = tensor.detach().to(torch.uint8) if tensor.dtype == torch.bool else tensor.detach()
        padded = payload.new_zeros((width, *payload.shape[1:]))  # all_gather needs one shape everywhere
        padded[:n_rows] = payload
        parts = [torch.empty_like(padded) for _ in range(processes)]
        dist.all_gather(parts, padded.contiguous())
        pieces = [part[:size].to(tensor.dtype) for part, size in zip(parts, sizes, strict=True)]
        pieces[rank] = tensor
        out.append(torch.cat(pieces))
    return tuple(out)


def sum_gradients(params: Sequence[torch.nn.Parameter]) -> None:
    """Add up the processes' gradients of ``params`` in place (one all-reduce); nothing on one process.

    For a loss of the whole batch (``gather_rows``), each process's gradient flows through its own rows only; the
    sum is the whole batch's gradient, the same on every process. A parameter without a gradient counts as zeros.
    """
    _, processes = process_group()
    if processes == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        p.grad = flat[offset : offset + p.numel()].view_as(p)
        offset += p.numel()


def scale_for_averaged_gradients(loss: Tensor) -> Tensor:
    """``loss`` with the same value and its gradient multiplied by the number of processes.

    Each process's loss is the whole batch's (``gather_rows``), with gradients through its own rows; the whole
    batch's gradient is the *sum* of the processes' gradients, and a distributed wrapper (DDP, FSDP, DeepSpeed)
    *averages* them. Scaling each by the number of processes makes that average the sum; the value, which the
    ``Trainer`` logs as a mean over processes, stays the whole batch's loss. One process: ``loss`` itself.
    """
    _, processes = process_group()
    if processes == 1:
        return loss
    return loss.detach() + processes * (loss - loss.detach())
