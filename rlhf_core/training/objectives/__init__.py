"""What each training stage optimises, on top of the one loop (`training.loop`): the batches
an objective builds and the loss it computes from the algorithms (`rlhf_core.algorithms`)."""
