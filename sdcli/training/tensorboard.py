"""Optional TensorBoard logging of the per-step metrics (`logging.tensorboard: true`).

metrics.jsonl stays the record; this only mirrors it for people who watch runs in TensorBoard.
Needs the `tensorboard` package (`pip install -e ".[tensorboard]"`).
"""

from __future__ import annotations

import math
from pathlib import Path

from sdcli.core.errors import UserError


class TensorBoardLog:
    def __init__(self, folder: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError(
                "logging.tensorboard: true needs the 'tensorboard' package, which is not installed.",
                hint='Install it with: pip install tensorboard   (or pip install -e ".[tensorboard]")',
            ) from None
        self.writer = SummaryWriter(log_dir=str(folder))

    def write(self, step: int, metrics: dict) -> None:
        for key, value in metrics.items():
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

    def __enter__(self) -> TensorBoardLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
