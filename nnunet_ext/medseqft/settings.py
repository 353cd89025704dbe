"""MedSeqFT's fixed names and choices, importable without torch (the ``nnunet-ext medseqft`` parser and its
``--help`` need them; :mod:`nnunet_ext.medseqft.method` and :mod:`nnunet_ext.medseqft.run` use them)."""

from __future__ import annotations

#: the MDS buffer file nnUNetTrainerMedSeqFT reads from the preprocessed dataset folder
BUFFER_FILE = "medseqft_buffer.json"
#: MDS scores (auto: objective if available)
SCORES = ("auto", "objective", "features")
#: structures `nnunet-ext medseqft phantoms` can make into a task
PHANTOM_TASKS = ("liver", "kidney", "spleen", "tumour", "vessel")
#: strategies `nnunet-ext medseqft run` compares
STRATEGIES = ("medseqft", "medseqft_noexpert", "sequential", "parallel")
#: training lengths of `nnunet-ext medseqft run --schedule` (trainer name suffix)
SUFFIX = {"full": "", "smoke": "_smoke", "demo": "_demo", "converge": "_converge"}
