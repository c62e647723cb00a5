"""The one training loop that every trained model uses (see :mod:`.loop` for its options)."""

from llmrec.models.train.checkpoint import Checkpoint, CheckpointError
from llmrec.models.train.loop import TrainConfig, TrainTask, fit_loop
from llmrec.models.train.progress import batch_progress, batch_starts, progress_shown, say
from llmrec.models.train.runtime import device_for, distributed, is_main_process, num_threads
from llmrec.models.train.schedule import budget_steps, learning_rate, lr_factor
from llmrec.models.train.stopping import EarlyStopping

__all__ = [
           "Checkpoint",
           "CheckpointError",
           "EarlyStopping",
           "TrainConfig",
           "TrainTask",
           "batch_progress",
           "batch_starts",
           "budget_steps",
           "device_for",
           "distributed",
           "fit_loop",
           "is_main_process",
           "learning_rate",
           "lr_factor",
           "num_threads",
           "progress_shown",
           "say",
]
