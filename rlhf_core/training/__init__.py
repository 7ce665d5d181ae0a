"""The training loop shared by every stage: settings, batching, schedule, checkpoints."""
