"""The training library behind ``torchrun train/ddp.py``: settings (``config``), the rank's
place (``distributed``), reproducibility (``state``), the run folder (``outputs``), the loop
(``loop``) and the entry that turns a run into an exit code (``entry``)."""

from pipeline.train.config import TrainConfig, TrainError
from pipeline.train.entry import run_training
from pipeline.train.loop import TrainProgress, train

__all__ = ["TrainConfig", "TrainError", "TrainProgress", "run_training", "train"]
