"""Multi-task and partially labelled data (DoDNet, TransDoDNet, UniSeg): the task registry and ``nnunet-ext tasks``,
merging datasets, the task layout and partial loss, the trainers' shared validation, ``nnunet-ext predict`` and
``nnunet-ext postprocess``."""
