"""UniSeg: its training pieces (label spaces, loss, task-balanced loader) and ``nnunet-ext uniseg`` (merge tasks
with different channels, convert a checkpoint for fine-tuning)."""
