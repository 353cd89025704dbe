"""Planning tools: ``nnunet-ext plans`` (editing nnU-Net plans) and ``nnunet-ext fingerprint``."""
