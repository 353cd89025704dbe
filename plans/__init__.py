"""Plan presets (JSON) shipped with nnunet_ext; see ``nnunet-ext plans presets``."""
