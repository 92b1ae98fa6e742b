"""TensorBoard logging (`train.tensorboard=true`): the metrics.jsonl numbers and the incidents, as
scalars and text under RUN_DIR/tensorboard/, for `tensorboard --logdir RUN_DIR`.

Optional: it needs the `tensorboard` package (`pip install tensorboard`, or nanguard's `tensorboard`
extra); asking for it without the package is a user error before anything is written. Rank 0 writes.
The events go through the tensorboard package's own event-file writer and protobufs, so logging needs
neither torch nor TensorFlow: any backend can log. On resume, a session-start event at the resumed step
makes TensorBoard drop what the killed process logged past the checkpoint, as metrics.jsonl is
truncated there: the curves show each step once.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from nanguard.errors import UserError


def require_tensorboard(wanted: bool) -> None:
    """Refuse `train.tensorboard=true` when the package is missing (a user error, exit 2)."""
    if not wanted:
        return
    try:
        from tensorboard.compat.proto import event_pb2  # noqa: F401
        from tensorboard.summary.writer.event_file_writer import EventFileWriter  # noqa: F401
    except ImportError:
        raise UserError("train.tensorboard=true needs the tensorboard package: pip install tensorboard "
                        "(or set train.tensorboard=false)") from None


class TensorBoard:
    """Scalars and text as TensorBoard event records, written by a background thread of the writer."""

    def __init__(self, run_dir: Path, start_step: int) -> None:
        from tensorboard.compat.proto import event_pb2  # noqa: F401
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._event_pb2 = event_pb2
        self.writer = EventFileWriter(str(Path(run_dir) / "tensorboard"))
        # TensorBoard purges the events at and past a session-start's step: a resume's re-run steps
        # replace the killed process's ones instead of doubling the curves
        self._add(event_pb2.Event(step=int(start_step),
                                  session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))

    def metrics(self, step: int, values: dict[str, Any]) -> None:
        for name, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and name != "step":
                group = "loss" if name.startswith("loss") or name == "total_loss" else "train"
                self._scalar(f"{group}/{name}", value, step)

    def incident(self, step: int, record: dict[str, Any]) -> None:
        verdict = (record.get("diagnosis") or {}).get("verdict")
        text = f"step {step}: {', '.join(record.get('kinds', []))} → {record.get('action')}" + (
            f" (verdict: {verdict})" if verdict else "")
        self._text("incidents", text, step)
        self._scalar("incidents/bad_step", 1.0, step)

    def close(self) -> None:
        self.writer.close()

    def _scalar(self, tag: str, value: float, step: int) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary

        self._summary(Summary(value=[Summary.Value(tag=tag, simple_value=float(value))]), step)

    def _text(self, tag: str, text: str, step: int) -> None:
        """The text plugin's record (a one-string tensor under `<tag>/text_summary`), as TensorBoard's
        own writers make it."""
        from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
        from tensorboard.compat.proto.tensor_pb2 import TensorProto
        from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto
        from tensorboard.plugins.text.plugin_data_pb2 import TextPluginData

        metadata = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(
            plugin_name="text", content=TextPluginData(version=0).SerializeToString()))
        tensor = TensorProto(dtype="DT_STRING", string_val=[text.encode("utf-8")],
                             tensor_shape=TensorShapeProto(dim=[TensorShapeProto.Dim(size=1)]))
        self._summary(Summary(value=[Summary.Value(tag=f"{tag}/text_summary", metadata=metadata,
                                                   tensor=tensor)]), step)

    def _summary(self, summary: Any, step: int) -> None:
        self._add(self._event_pb2.Event(step=int(step), summary=summary))

    def _add(self, event: Any) -> None:
        event.wall_time = time.time()
        self.writer.add_event(event)


class NullTensorBoard:
    def metrics(self, step: int, values: dict[str, Any]) -> None:
        pass

    def incident(self, step: int, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass
