"""Tools around the methods: ``nnunet-ext demo``, ``bench``, ``phantoms``, ``doctor`` and ``trainer-dir``."""
