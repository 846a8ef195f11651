"""crisp-ext: the CRISP particle picker (segmentation network + CRF + centre finding).

The core package knows nothing of RELION or cryoSPARC; the adapters ``relion_external`` and ``cryosparc_job``
translate their host's records into :mod:`crisp_ext.types` and back. Importing this package is cheap: torch and
segmentation_models_pytorch load only when a model is built.
"""

__version__ = "0.1.0"
