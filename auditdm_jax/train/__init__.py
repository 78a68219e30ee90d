"""Fine-tuning of the VLMs: `train(cfg, params, data_iter, TrainConfig(...), workdir)`."""

from auditdm_jax.train.optim import lr_schedule, make_optimizer, trainable_mask
from auditdm_jax.train.batches import BATCH_KEYS, check_batch, sft_batch, sft_example
from auditdm_jax.train.config import TrainConfig
from auditdm_jax.train.loop import NonFiniteLossError
from auditdm_jax.train.loss import batch_sums, loss_fn, token_stats
from auditdm_jax.train.sft import train
from auditdm_jax.train.step import make_train_step
from auditdm_jax.train.trainer import Trainer

__all__ = [
    "BATCH_KEYS", "NonFiniteLossError", "TrainConfig", "Trainer", "batch_sums", "check_batch",
    "loss_fn", "lr_schedule", "make_optimizer", "make_train_step", "sft_batch",
    "sft_example", "token_stats", "train", "trainable_mask",
]
