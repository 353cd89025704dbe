"""The nnU-Net glue every method shares: nnU-Net's folders, atomic writes and the raw-dataset writer, running
nnU-Net's commands, the train step, networks from plans, schedules, splits, metrics and LoRA."""
