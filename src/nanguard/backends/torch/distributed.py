"""torch.distributed for the guard: every rank takes the same decision in the same step.

Runs on torch's own engines: the process group torchrun describes (gloo on CPU, NCCL on GPU) and
DistributedDataParallel. Two things are added, both on the device, neither a host sync:
- a DDP communication hook that looks at this rank's gradient buckets *before* they are averaged (a
  NaN on one rank becomes a NaN on every rank after the all-reduce, and would no longer say whose it
  was), then all-reduces them as DDP's default hook does;
- `RankAgreement.agree`, at the guard's "agree" point: one all-reduce (SUM, float64) of a small vector
  holding, per rank, a 0/1 flag for each kind of local fault (never raw values compared with MAX:
  NCCL's MAX returns 3 for max(NaN, 3)), on parameter-check steps each rank's parameter digest in its
  own slot, then the loss components and total (their mean). Every rank then holds the same flags,
  digests and numbers, so the same spike detectors, the same policy, the same decision; parameters
  that differ between ranks are an incident (`rank_divergence`), rolled back like a corrupted weight.
"""

from __future__ import annotations

import hashlib
import os
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from nanguard.errors import UserError

if TYPE_CHECKING:
    from nanguard.run.ranks import Ranks

LOCAL_KINDS = ("nonfinite_loss", "nonfinite_grad", "nonfinite_buffer")


def init_process_group(device: torch.device, ranks: Ranks) -> torch.device:
    """Join the job torchrun started (once); the device this rank trains on.

    After a `--max-restarts` restart, torchrun's agent serves the *same* store as before, still holding
    the old processes' addresses: a rank that reads its peer's key before the peer rewrites it dials a
    dead port ("Gloo connectFullMesh failed ... Connection refused"). Each restart therefore meets
    under its own key prefix."""
    if device.type == "cuda":
        device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if ranks.restarts and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                  timeout=timedelta(minutes=30))
            dist.init_process_group(backend, store=dist.PrefixStore(f"nanguard/restart_{ranks.restarts}", store),
                                    rank=ranks.rank, world_size=ranks.world)
        else:  # the address torchrun gives: checked by the backend's check_config (`check_launcher_env`)
            dist.init_process_group(backend)
    return device


def check_launcher_env(ranks: Ranks) -> None:
    """Several processes need the address torchrun gives them: without it (WORLD_SIZE set by hand),
    one line instead of torch's ValueError traceback. `TorchBackend.check_config` calls it, before the
    run folder exists."""
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if ranks.distributed and missing:
        raise UserError(f"WORLD_SIZE={ranks.world} in the environment but no {' or '.join(missing)}: start the "
                        "processes with `nanguard train --nproc N` (torchrun sets them), or unset WORLD_SIZE")


class RankAgreement:
    def __init__(self, device: torch.device) -> None:
        self.rank, self.world, self.device = dist.get_rank(), dist.get_world_size(), device
        self.local_nonfinite_grad = torch.zeros((), dtype=torch.bool, device=device)

    def comm_hook(self, state, bucket):  # no annotations: DDP checks them, and this module postpones them
        """DDP's all-reduce of one gradient bucket, after noting whether this rank's own values are finite.
        When: DDP calls it during backward, bucket by bucket (`start_step` clears the note before)."""
        buffer = bucket.buffer()
        self.local_nonfinite_grad = self.local_nonfinite_grad | ~torch.isfinite(buffer).all()
        buffer.div_(self.world)
        return dist.all_reduce(buffer, async_op=True).get_future().then(lambda fut: fut.value()[0])

    def start_step(self) -> None:
        """When: before each backward."""
        self.local_nonfinite_grad = torch.zeros((), dtype=torch.bool, device=self.device)

    def agree(self, checks: dict[str, torch.Tensor]) -> None:
        """Replace this rank's flags in `checks` with every rank's (any rank), the loss components and
        total with their mean over ranks, and add `rank_flags` (1.0 for each rank that went bad itself)."""
        kinds = LOCAL_KINDS + ("nonfinite_grad_held",)
        flags = torch.zeros(len(kinds), self.world, dtype=torch.float64, device=self.device)
        for k, kind in enumerate(kinds):
            flags[k, self.rank] = checks.pop(kind) if kind == "nonfinite_grad_held" else checks[kind].double()
        digest = checks.pop("param_digest", None)
        digests = torch.zeros(self.world, dtype=torch.float64, device=self.device)
        if digest is not None:
            digests[self.rank] = digest
        components = checks["components"].double()
        vector = torch.cat([flags.reshape(-1), digests, components, checks["total_loss"].double().reshape(1)])
        dist.all_reduce(vector)  # SUM; the one collective the guard adds to a step
        n = flags.numel()
        flags, digests, vector = vector[:n].reshape(flags.shape) > 0.5, vector[n:n + self.world], vector[n + self.world:]
        if digest is not None:  # every rank holds every rank's digest: the same verdict everywhere
            apart = apart_from_majority(digests)
            checks["rank_divergence"] = apart.any()
            flags = torch.cat([flags, apart.reshape(1, -1)])
        sent, held = flags[1], flags[3]
        for k, kind in enumerate(LOCAL_KINDS):
            checks[kind] = flags[k].any()
        checks["nonfinite_grad"] = sent.any() | held.any()
        # whose fault: a rank that sent a non-finite gradient (every rank then holds one), else a rank
        # whose gradients went bad after the all-reduce (its own memory or device)
        checks["rank_flags"] = flags[0] | sent | flags[2] | (held & ~sent.any())
        if digest is not None:
            checks["rank_flags"] = checks["rank_flags"] | flags[4]
        checks["components"] = (vector[:-1] / self.world).float()
        checks["total_loss"] = (vector[-1] / self.world).float()


def apart_from_majority(digests: torch.Tensor) -> torch.Tensor:
    """Which ranks' parameter digests differ from the one most ranks hold (on the device, no host
    sync). A tie (say, two ranks) takes the lowest rank among the most common as the reference; a
    non-finite digest never matches, so it is always apart and never the reference."""
    same = (digests.reshape(-1, 1) == digests.reshape(1, -1)).sum(dim=1)  # ranks sharing each digest
    return digests != digests[same.argmax()]  # argmax: the first of equal counts


def gather_objects(obj: Any) -> list[Any]:
    """`obj` of every rank, rank by rank (a host sync: checkpoints, a resume, the end of a run)."""
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def hand_to_first(data: bytes | None, source: int, device: torch.device) -> bytes | None:
    """Rank `source`'s `data` on rank 0 (None on the others): its size, then its bytes, point to point,
    so that only those two ranks take part and nothing of it is copied to the rest (a replay file holds
    the model twice). Every rank calls it; `data` is read on `source` only (None: nothing to hand)."""
    rank = dist.get_rank()
    if source == 0 or rank not in (0, source):
        return data if rank == 0 else None
    on = device if dist.get_backend() == "nccl" else torch.device("cpu")  # NCCL moves device tensors only
    size = torch.tensor([-1 if data is None else len(data)], dtype=torch.int64, device=on)
    if rank == source:
        dist.send(size, dst=0)
        if data:
            dist.send(torch.frombuffer(bytearray(data), dtype=torch.uint8).to(on), dst=0)
        return None
    dist.recv(size, src=source)
    length = int(size.item())  # sync-ok: a bad step's replay data, not the per-step path
    if length < 0:
        return None
    payload = torch.empty(length, dtype=torch.uint8, device=on)
    if length:
        dist.recv(payload, src=source)
    return payload.cpu().numpy().tobytes()


def param_digest(model: torch.nn.Module) -> str:
    """A digest of every parameter, bit for bit (host side: the end of a run). Not the BatchNorm
    statistics: each rank's come from its own images (DDP broadcasts rank 0's at every forward)."""
    digest = hashlib.sha256()
    for name, tensor in model.named_parameters():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
