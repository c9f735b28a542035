"""Optional TensorBoard event log of a training run (`cbam-multi train --tensorboard`), beside metrics.json.

Written with the ``tensorboard`` package alone (its event-file writer and protos; no TensorFlow, no torch),
so both backends log the same way, the way Flax's examples write summaries: per optimizer step the
training loss and learning rate, per epoch the test loss and accuracy, the epoch's mean training loss and
images/s. Files go to ``<run>/tensorboard/``; view with ``tensorboard --logdir runs``. A resumed run
appends a new event file to the same folder, its steps continuing where the run stopped.
"""

from __future__ import annotations

import time
from pathlib import Path

from cbam_multi._optional import require

SUBDIR = "tensorboard"

# tag -> what it is, in the units logged (README and tests use these names)
STEP_TAGS = {"train/loss": "training loss of the batch", "train/learning_rate": "learning rate used for the step"}
EPOCH_TAGS = {
    "test/loss": "mean test loss after the epoch",
    "test/accuracy": "test accuracy after the epoch (fraction)",
    "train/epoch_loss": "mean training loss of the epoch",
    "train/images_per_s": "training throughput of the epoch",
}


class EventLog:
    """Scalars into ``logdir`` as TensorBoard event files. ``close()`` (or a ``with`` block) flushes."""

    def __init__(self, logdir) -> None:
        require("tensorboard", "--tensorboard")
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        self._writer = EventFileWriter(str(self.logdir))

    def scalars(self, step: int, values: dict[str, float], wall_time: float | None = None) -> None:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        summary = Summary(value=[Summary.Value(tag=tag, simple_value=float(v)) for tag, v in values.items()])
        self._writer.add_event(Event(wall_time=time.time() if wall_time is None else wall_time, step=int(step), summary=summary))

    def epoch(self, first_step: int, record: dict, lrs) -> None:
        """Log one finished epoch: its per-step losses and learning rates (global steps ``first_step + 1`` ...)
        and its epoch figures at its last step."""
        losses = record["train_losses"]
        for i, (loss, lr) in enumerate(zip(losses, lrs)):
            self.scalars(first_step + i + 1, {"train/loss": loss, "train/learning_rate": lr})
        self.scalars(
            first_step + len(losses),
            {
                "test/loss": record["test_loss"],
                "test/accuracy": record["test_accuracy"],
                "train/epoch_loss": record["train_loss"],
                "train/images_per_s": record["images_per_s"],
            },
        )
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in ``logdir``'s event files as {tag: [(step, value), ...]}, read back with
    TensorBoard's own loader (what the TensorBoard UI shows)."""
    require("tensorboard", "reading TensorBoard logs")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})  # 0: keep every point
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
