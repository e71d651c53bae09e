"""Training in several processes: data-parallel over ``torch.distributed`` (gloo on CPUs, NCCL on
GPUs), launched by torch's elastic launcher (``torchrun``), which the Trainer (through accelerate)
joins by itself.

``adapterdeck train run.yaml --processes N`` becomes the launcher's agent in its own process: it
starts N copies of the same command (each its ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``), and
when one of them dies it stops the others (no restarts); Ctrl-C reaches the agent alone (the
copies run in sessions of their own), which passes it on once to each copy, and the copies stop
together after the same step (``agree``). ``--machines M --machine-rank R --main-address HOST:PORT``
runs one training across machines, one agent per machine. ``accelerate launch`` and ``torchrun``
started by hand work too: a process started with ``WORLD_SIZE`` set is a copy, not an agent.

In a run of several processes only the main one (rank 0) writes the run directory (the adapter,
the report, the loss curve, checkpoints), shows progress and logs to the trackers; evaluation runs
in every process over a shard of the validation split and its figures are gathered, so early
stopping decides the same everywhere.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from adapterdeck.core.errors import AdapterdeckError

STRATEGIES = ("ddp", "fsdp", "deepspeed")
# accelerate turns FSDP on only for accelerators (GPUs, XPUs, NPUs...); on CPUs it would train as
# DDP without saying so.
FSDP_NEEDS_ACCELERATORS = (
    "train.strategy fsdp needs GPUs (accelerate shards with FSDP only on accelerators; on CPUs "
    "every process holds the whole model anyway): use ddp"
)
SHUTDOWN_SECONDS = 120  # after a Ctrl-C, how long the copies may take to finish their step and save


@dataclass(frozen=True)
class World:
    """This process's place among the training's processes (one process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world() -> World:
    """Read from the launcher's environment (torchrun, accelerate launch, MPI)."""
    env = os.environ
    size = int(env.get("WORLD_SIZE") or env.get("OMPI_COMM_WORLD_SIZE") or env.get("PMI_SIZE") or 1)
    rank = int(env.get("RANK") or env.get("OMPI_COMM_WORLD_RANK") or env.get("PMI_RANK") or 0)
    local = int(env.get("LOCAL_RANK") or env.get("OMPI_COMM_WORLD_LOCAL_RANK") or 0)
    return World(rank, size, local)


def agree(flag: bool) -> bool:
    """True in every process when it is True in any (an all-reduce of one number; without a
    process group, the flag itself)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def from_main(flag: bool) -> bool:
    """The main process's ``flag``, in every process (a broadcast; without a process group, the
    flag itself)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.broadcast(value, src=0)
    return bool(value.item())


def stop_together() -> Any:
    """A Trainer callback, the last of them: after each evaluation, every process stops when the
    main one decided to (early stopping reads the same gathered figures everywhere; this makes it
    one decision whatever a callback does)."""
    from transformers import TrainerCallback

    class StopTogether(TrainerCallback):
        def on_evaluate(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            control.should_training_stop = from_main(bool(control.should_training_stop))

    return StopTogether()


def per_process_batch(batch_size: int, processes: int) -> int:
    """``train.batch_size`` is the examples of one step across every process; each process takes an
    equal share, so N processes train on the same batches as one."""
    if batch_size % processes:
        raise AdapterdeckError(
            f"train.batch_size {batch_size} cannot be shared equally by {processes} processes; "
            f"make it a multiple of {processes}"
        )
    return batch_size // processes


def check_strategy(strategy: str, processes: int) -> None:
    """Refuse, with one line, a strategy that cannot run here."""
    import torch

    if strategy == "ddp":
        return
    if strategy == "deepspeed":
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise AdapterdeckError(
                "train.strategy deepspeed needs the deepspeed package (pip install deepspeed) and "
                "GPUs; on CPUs use ddp"
            ) from None
        if not torch.cuda.is_available():
            raise AdapterdeckError(
                "train.strategy deepspeed needs GPUs (ZeRO shards over NCCL); on CPUs use ddp"
            )
        return
    if strategy == "fsdp" and not torch.accelerator.is_available():
        raise AdapterdeckError(FSDP_NEEDS_ACCELERATORS)


def fsdp_arguments() -> dict[str, Any]:
    """The Trainer's FSDP (version 2, ``fully_shard``): each decoder layer's parameters sharded over
    the processes and gathered for its forward and backward; the adapter's own parameters (the
    only ones trained) keep their names, so checkpoints hold the adapter alone and the best one is
    loaded back by every process."""
    return {
        "fsdp": True,
        "fsdp_config": {
            "version": 2,
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "state_dict_type": "FULL_STATE_DICT",
            "reshard_after_forward": True,
            "cpu_ram_efficient_loading": False,
        },
    }


def deepspeed_arguments() -> dict[str, Any]:
    """The Trainer's DeepSpeed: ZeRO stage 2 (the optimizer's state and the gradients sharded over
    the processes; the parameters whole in each, so the adapter is saved and evaluated as under
    ddp); the batch, accumulation and precision are the run's ("auto": the Trainer fills them)."""
    return {
        "deepspeed": {
            "zero_optimization": {"stage": 2, "overlap_comm": True, "contiguous_gradients": True},
            "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto",
            "bf16": {"enabled": "auto"},
            "fp16": {"enabled": "auto"},
        }
    }


def gather_trained(model: Any) -> dict[str, Any]:
    """The trained parameters (the adapter's) whole, from every process's shards: every process
    must call it, in the same order of parameters; each gets them on the CPU. The frozen base is
    not gathered: it is the same everywhere, loaded from the same files."""
    from torch.distributed.tensor import DTensor

    gathered = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            whole = param.full_tensor() if isinstance(param, DTensor) else param
            gathered[name] = whole.detach().to("cpu", copy=True)
    return gathered


@dataclass(frozen=True)
class Ended:
    """How a launched training ended: its exit code (0, or that of the first copy that failed),
    and when a copy crashed (died by a signal, or failed while not the main one: not the data's
    or the config's fault, which the main copy reports itself) which one and how."""

    code: int
    crashed: str | None = None


def launch(
    command: Sequence[str],
    processes: int,
    *,
    machines: int = 1,
    machine_rank: int = 0,
    main_address: str | None = None,
) -> Ended:
    """Run ``command`` (``-m module args...``, the arguments of a ``python`` command line) as
    ``processes`` copies on this machine under torch's elastic agent, in this process.
    ``machines`` > 1: this machine is ``machine_rank`` of them, all meeting at ``main_address``
    (HOST:PORT of machine 0)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    if processes < 1 or machines < 1 or not 0 <= machine_rank < machines:
        raise AdapterdeckError(
            f"--processes {processes}, --machines {machines}, --machine-rank {machine_rank}: "
            "need processes >= 1, machines >= 1 and 0 <= machine rank < machines"
        )
    argv = [f"--nproc-per-node={processes}", "--max-restarts=0"]
    if machines == 1:
        argv.append("--standalone")  # a free port on localhost
    else:
        if not main_address or ":" not in main_address:
            raise AdapterdeckError(
                "a training across machines needs --main-address HOST:PORT (machine 0's address)"
            )
        host, _, port = main_address.rpartition(":")
        argv += [
            f"--nnodes={machines}",
            f"--node-rank={machine_rank}",
            f"--master-addr={host}",
            f"--master-port={port}",
        ]
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(SHUTDOWN_SECONDS))
    if processes > 1:  # each copy gets its share of the cores, not all of them
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    if command and command[0] == "-m":
        argv += ["-m", *command[1:]]
    else:
        argv += list(command)
    args = get_args_parser().parse_args(argv)
    try:
        run(args)
    except SignalException as exc:  # Ctrl-C or a stop: the copies were asked to stop, and did
        return Ended(128 + int(exc.sigval))
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        code = failure.exitcode
        crashed, which = None, f"training process {rank} of {processes * machines}"
        if code < 0:
            crashed = f"{which} died of {signal.Signals(-code).name}"
        elif rank != 0:
            crashed = f"{which} failed (exit code {code})"
        return Ended(128 - code if code < 0 else code or 1, crashed)
    return Ended(0)


def copy_command(argv: Sequence[str] | None = None) -> list[str]:
    """This command again, for the copies: ``-m adapterdeck.core.cli`` and the same arguments."""
    return ["-m", "adapterdeck.core.cli", *(sys.argv[1:] if argv is None else argv)]
