"""What both training stages share: the training loop, checkpoints, optimizers, LR schedules,
the process group and progress output."""
