"""TensorBoard logging (`train.tensorboard=true`): the metrics.jsonl numbers and the incidents, as
scalars and text under RUN_DIR/tensorboard/, for `tensorboard --logdir RUN_DIR`.

Optional: it needs the `tensorboard` package (`pip install tensorboard`, or nanguard's `tensorboard`
extra); asking for it without the package is a user error before anything is written. Rank 0 writes.
On resume, TensorBoard's `purge_step` drops what the killed process logged past the checkpoint, as
metrics.jsonl is truncated there: the curves show each step once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nanguard.errors import UserError


def require_tensorboard(wanted: bool) -> None:
    """Refuse `train.tensorboard=true` when the package is missing (a user error, exit 2)."""
    if not wanted:
        return
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise UserError("train.tensorboard=true needs the tensorboard package: pip install tensorboard "
                        "(or set train.tensorboard=false)") from None


class TensorBoard:
    def __init__(self, run_dir: Path, start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=start_step)

    def metrics(self, step: int, values: dict[str, Any]) -> None:
        for name, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and name != "step":
                group = "loss" if name.startswith("loss") or name == "total_loss" else "train"
                self.writer.add_scalar(f"{group}/{name}", value, step)

    def incident(self, step: int, record: dict[str, Any]) -> None:
        verdict = (record.get("diagnosis") or {}).get("verdict")
        text = f"step {step}: {', '.join(record.get('kinds', []))} → {record.get('action')}" + (
            f" (verdict: {verdict})" if verdict else "")
        self.writer.add_text("incidents", text, step)
        self.writer.add_scalar("incidents/bad_step", 1.0, step)

    def close(self) -> None:
        self.writer.close()


class NullTensorBoard:
    def metrics(self, step: int, values: dict[str, Any]) -> None:
        pass

    def incident(self, step: int, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass
