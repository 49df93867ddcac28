"""Data parallel over several GPUs or CPU processes (torchrun): which process this is, its share of a
list, and sums over the processes. With one process every function here changes nothing.

    torchrun --nproc_per_node 4 train.py --task gsm8k
"""

import os

import torch
import torch.distributed as dist

import evaluate


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(values) -> torch.Tensor:
    """A new tensor holding the sum of `values` (a tensor or a list of numbers) over the processes."""
    tensor = torch.as_tensor(values, dtype=torch.float64).clone()
    if distributed():
        on = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else tensor.device
        moved = tensor.to(on)
        dist.all_reduce(moved)
        tensor = moved.to(tensor.device)
    return tensor


def sum_gradients(parameters):
    """Sum each parameter's gradient over the processes, in place (the losses are already weighted by
    each process's share of the global batch)."""
    if distributed():
        for p in parameters:
            if p.grad is not None:
                dist.all_reduce(p.grad)


def setup_distributed():
    """Join the process group when started by torchrun (WORLD_SIZE > 1). Returns this process's device
    (cuda:LOCAL_RANK, or None to choose as usual: gloo on CPUs)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    if torch.cuda.is_available():
        local_rank = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl")
        return f"cuda:{local_rank}"
    dist.init_process_group("gloo")
    return None


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if distributed() else (0, 1)


def evaluate_split(model, tokenizer, adapter, task, examples, config, adapted=True, progress=False):
    """evaluate.evaluate on this process's share of the examples; the records of all processes are
    gathered back into the examples' order. progress: a progress bar (give it to one process only)."""
    rank, world = rank_and_world()
    context = adapter.merged() if adapted else adapter.disabled()
    with context:
        result = evaluate.evaluate(model, tokenizer, task, examples[rank::world], batch_size=config["gen_batch"] * 2,
                                   max_new_tokens=config["max_new_tokens"], progress=progress)
    if world == 1:
        return result
    parts = [None] * world
    dist.all_gather_object(parts, result["records"])
    records = [parts[i % world][i // world] for i in range(len(examples))]
    return dict(task=task.name, **evaluate.accuracy([r["correct"] for r in records]), records=records)
