"""Label propagation from sparse slice annotations (COSMOS22): ``nnunet-ext labelprop {interpolate,pseudo,run,qc}``."""
