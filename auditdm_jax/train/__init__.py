"""Fine-tuning of the VLMs: `train(cfg, params, data_iter, TrainConfig(...), workdir)`."""

from auditdm_jax.train.optim import lr_schedule, make_optimizer, trainable_mask
from auditdm_jax.train.sft import (
    BATCH_KEYS,
    NonFiniteLossError,
    TrainConfig,
    Trainer,
    batch_sums,
    check_batch,
    loss_fn,
    make_train_step,
    sft_batch,
    sft_example,
    token_stats,
    train,
)

__all__ = [
    "BATCH_KEYS", "NonFiniteLossError", "TrainConfig", "Trainer", "batch_sums", "check_batch",
    "loss_fn", "lr_schedule", "make_optimizer", "make_train_step", "sft_batch",
    "sft_example", "token_stats", "train", "trainable_mask",
]
