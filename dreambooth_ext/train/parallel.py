"""Data-parallel training over several processes, started by `accelerate launch` (or torchrun): which process
this is, its share of every batch, and the averaging of gradients and losses.

Every process holds the whole model. Each micro-batch (instance and class samples alike) is split between the
processes in order, every sample keeping the randomness of its position in the whole batch, and each process's
loss is weighted so that the averaged gradient is exactly the gradient of the whole batch's loss. So N processes
take the steps one process would take with the same `train_batch_size`, and a run saved on N processes resumes
on any number. Only the main process writes files, renders samples and reports; the others follow its steps.
One process without a launcher is `SingleProcess`, which changes nothing.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import logging
import os
import sys
from collections.abc import Sequence

import torch

from ..errors import DreamboothError
from .devices import device_name

log = logging.getLogger(__name__)

# How long a process waits for the others at a meeting point: the main process may be generating class images,
# rendering samples or saving meanwhile.
WAIT = datetime.timedelta(hours=2)


class SingleProcess:
    """One process: the whole batch is ours, nothing is exchanged."""

    count = 1
    index = 0
    is_main = True
    device: torch.device | None = None  # None: the device option decides

    def share(self, items: Sequence) -> list:
        return list(items)

    def watch(self, groups: Sequence[Sequence[torch.nn.Parameter]]) -> list:
        """Ready the weights' gradients for exchange during the backward pass; returns the hooks' handles."""
        return []

    def exchanging(self) -> contextlib.AbstractContextManager:
        """Around a backward pass that every process runs: gradients are exchanged while it goes on."""
        return contextlib.nullcontext()

    def average_gradients(self, params: Sequence[torch.nn.Parameter]) -> None:
        pass

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        return values

    def any(self, flag: bool) -> bool:
        return flag

    def wait_for_all(self) -> None:
        pass

    def leave(self) -> None:
        """This process is done with the others (at the end of its run, finished or failed)."""


class DataParallel(SingleProcess):
    """One of several processes of a torch.distributed group that accelerate has set up."""

    def __init__(self, state):
        self.state = state
        self.count = state.num_processes
        self.index = state.process_index
        self.is_main = state.is_main_process
        self.device = state.device
        self._buckets: list[list[torch.Tensor]] = []
        self._bucket_of: dict[int, int] = {}
        self._exchange: _Exchange | None = None

    def share(self, items: Sequence) -> list:
        """This process's contiguous part of `items` (sizes differ by at most one; a part may be empty)."""
        n = len(items)
        return list(items[self.index * n // self.count:(self.index + 1) * n // self.count])

    def watch(self, groups: Sequence[Sequence[torch.nn.Parameter]]) -> list:
        """Buckets of weights whose gradients are exchanged together while the backward pass runs, in the order
        the pass completes them: each group's weights from last to first (a model's output layers get their
        gradients first), the groups in order (the UNet's before the text encoder's, which feeds it)."""
        order = [param for group in groups for param in reversed(list(group))]
        self._buckets = _buckets(order)
        self._bucket_of = {id(param): i for i, bucket in enumerate(self._buckets) for param in bucket}
        return [param.register_post_accumulate_grad_hook(self._ready) for param in order]

    @contextlib.contextmanager
    def exchanging(self):
        """Around the step's last backward pass when every process runs it (so all of them complete the same
        gradients, in the same order): each bucket is averaged, asynchronously, as soon as the pass has
        completed its gradients and those of the buckets before it; average_gradients waits for them."""
        exchange = _Exchange([len(bucket) for bucket in self._buckets])
        self._exchange = exchange
        try:
            yield
        finally:
            exchange.armed = False

    def _ready(self, param: torch.Tensor) -> None:
        exchange = self._exchange
        if exchange is None or not exchange.armed:
            return  # an earlier micro-batch, or a pass some process does not run: exchanged after it
        if id(param) in exchange.seen:
            raise DreamboothError("A weight received two gradients in one backward pass, which the gradient "
                                  "exchange between processes cannot follow; train on one process.")
        exchange.seen.add(id(param))
        index = self._bucket_of[id(param)]
        exchange.missing[index] -= 1
        while exchange.launched_up_to < len(self._buckets) and not exchange.missing[exchange.launched_up_to]:
            self._launch(exchange, exchange.launched_up_to)

    def _launch(self, exchange: _Exchange, index: int) -> None:
        """Start averaging bucket `index` (its weights that have gradients: the same ones on every process)."""
        exchange.launched_up_to = index + 1
        grads = [param.grad for param in self._buckets[index] if param.grad is not None]
        if not grads:
            return
        while len(exchange.pending) >= IN_FLIGHT:  # each holds a copy of its gradients: the oldest ends first
            self._finish(*exchange.pending.popleft())
        flat = _flat(grads)
        exchange.pending.append((torch.distributed.all_reduce(flat, async_op=True), flat, grads))

    def _finish(self, work, flat: torch.Tensor, grads: list[torch.Tensor]) -> None:
        work.wait()
        self._take_average(flat, grads)

    def average_gradients(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Every weight's gradient averaged over the processes: the exchange the backward pass started, finished
        here; else (a pass some process had no sample for) exchanged now in buckets of at most BUCKET_ELEMENTS.
        A process that had no sample in this step contributes zeros; a weight no process has a gradient for (a
        text encoder whose training has stopped) keeps none, so the optimizer leaves it alone as it would in
        one."""
        exchange, self._exchange = self._exchange, None
        if exchange is not None:
            for index in range(exchange.launched_up_to, len(self._buckets)):
                self._launch(exchange, index)
            while exchange.pending:
                self._finish(*exchange.pending.popleft())
            return
        present = torch.tensor([param.grad is not None for param in params], dtype=torch.float32,
                               device=self.device)
        torch.distributed.all_reduce(present, op=torch.distributed.ReduceOp.MAX)
        grads = []
        for param, anywhere in zip(params, present.tolist(), strict=True):
            if anywhere:
                if param.grad is None:
                    param.grad = torch.zeros_like(param)
                grads.append(param.grad)
        for bucket in _buckets(grads):
            flat = _flat(bucket)
            torch.distributed.all_reduce(flat)
            self._take_average(flat, bucket)

    def _take_average(self, flat: torch.Tensor, grads: list[torch.Tensor]) -> None:
        """The summed bucket `flat` divided by the processes, back into its gradients (unless it is one)."""
        flat /= self.count
        offset = 0
        for grad in grads:
            if flat.data_ptr() != grad.data_ptr():
                grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
            offset += grad.numel()

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        total = values.detach().clone()
        torch.distributed.all_reduce(total)
        return total / self.count

    def any(self, flag: bool) -> bool:
        """True on every process when it is true on one (a stop asked of the main process stops them all at
        the same step)."""
        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
        return bool(value.item())

    def wait_for_all(self) -> None:
        self.state.wait_for_everyone()

    def leave(self) -> None:
        """Close the process group while Python is still whole. Left to the interpreter's shutdown, gloo's worker
        threads may still hold work when it tears down, and a process that finished its run dies with SIGABRT
        ("terminate called without an active exception"): the launcher then reports the run as failed."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def launched_processes() -> int:
    """How many processes the launcher started (1 without one)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def join_processes(device_option: str) -> SingleProcess:
    """This process's place among the processes `accelerate launch` started (SingleProcess without it)."""
    if launched_processes() <= 1:
        return SingleProcess()
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        raise DreamboothError("accelerate launch with FSDP is not supported: launch with --multi_gpu (plain "
                              "data-parallel), or with DeepSpeed ZeRO stage 2 for cards too small for the model.")
    try:
        from accelerate import PartialState
    except ImportError as exc:
        raise DreamboothError("Started by a launcher with several processes, but the accelerate package is "
                              "missing: pip install accelerate (the WebUI ships it).") from exc
    options = {"backend": "gloo"} if sys.platform == "win32" else {}  # no NCCL on Windows
    # Without a GPU the processes meet on the CPU (gloo), also under a DeepSpeed launch.
    cpu = device_option == "cpu" or not torch.cuda.is_available()
    state = PartialState(cpu=cpu, timeout=WAIT, **options)
    log.debug("Process %d of %d on %s", state.process_index, state.num_processes, state.device)
    return DataParallel(state)


def samples_per_batch(config) -> int:
    """How many samples each micro-batch has, instance and class together: what the processes share."""
    return config.train_batch_size * (2 if config.prior_preservation else 1)


def check_parallel(config, processes: SingleProcess) -> None:
    """Options that cannot run on several processes, refused with their fix before any model loads."""
    if processes.count <= 1:
        return
    problems = []
    if config.fused_backward:
        problems.append("fused_backward updates each weight during the backward pass, before the processes' "
                        "gradients could be averaged: turn fused_backward off")
    if device_name(config.device) not in ("auto", "cpu"):
        problems.append(f"device is {config.device}, but each process takes its own GPU: set device to auto and "
                        "choose the GPUs with the gpus option (or CUDA_VISIBLE_DEVICES)")
    if problems:
        raise DreamboothError(f"Cannot train on {processes.count} processes: " + "; ".join(problems) + ".")
    samples = samples_per_batch(config)
    if samples < processes.count:
        log.warning("Each step has %d sample(s) for %d processes: some processes wait idle. Raise train_batch_size "
                    "to use them all.", samples, processes.count)


BUCKET_ELEMENTS = 32 * 1024 * 1024  # gradients exchanged together: a copy of this size at most (128 MB in fp32)
IN_FLIGHT = 4  # buckets exchanged at once during a backward pass (the next one waits for the oldest to end)


class _Exchange:
    """One backward pass's exchange: how many gradients each bucket still waits for, the buckets started (in
    order: every process starts the same ones in the same order) and their pending averages."""

    def __init__(self, sizes: list[int]):
        self.armed = True
        self.missing = sizes
        self.seen: set[int] = set()
        self.launched_up_to = 0
        self.pending: collections.deque[tuple] = collections.deque()


def _flat(grads: list[torch.Tensor]) -> torch.Tensor:
    """The gradients as one vector: a copy, or the only one itself (its average is then written in place)."""
    return torch.cat([g.reshape(-1) for g in grads]) if len(grads) > 1 else grads[0].reshape(-1)


def _buckets(tensors: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Consecutive groups of tensors of one dtype and device, of at most BUCKET_ELEMENTS in all (a larger one
    alone)."""
    buckets: list[list[torch.Tensor]] = [[]]
    size = 0
    for tensor in tensors:
        bucket = buckets[-1]
        if bucket and (size + tensor.numel() > BUCKET_ELEMENTS or (tensor.dtype, tensor.device) !=
                       (bucket[0].dtype, bucket[0].device)):
            buckets.append([])
            size = 0
        buckets[-1].append(tensor)
        size += tensor.numel()
    return buckets
