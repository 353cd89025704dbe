"""MedSeqFT: MDS buffer selection, K&G RFT distillation pieces and ``nnunet-ext medseqft {select,phantoms,run}``."""
