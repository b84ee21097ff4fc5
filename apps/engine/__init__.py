"""Parts of the training engine used by apps/engine/trainer.py: optimiser, schedule, EMA, distributed helpers,
checkpoints and logging. Each part is a small module that knows nothing of any task."""
