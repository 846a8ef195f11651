"""crisp-ext: the CRISP particle picker (segmentation network + CRF + centre finding).

The core package knows nothing of RELION or cryoSPARC; the adapters ``relion_external`` and ``cryosparc_job``
translate their host's records into :mod:`crisp_ext.types` and back. The library's face, loaded on first use (so
that importing this package stays cheap; torch and segmentation_models_pytorch load only when a model is built)::

    import crisp_ext
    result = crisp_ext.run(micrographs, crisp_ext.PickerConfig(), work_dir=..., particles=...)

``run`` (:func:`crisp_ext.pipeline.run`), ``PickerConfig`` (:mod:`crisp_ext.config`), ``Micrograph`` and
``Particles`` (:mod:`crisp_ext.types`), ``InputError`` (:mod:`crisp_ext.errors`).
"""

__version__ = "0.1.0"

_FACE = {
    "run": "crisp_ext.pipeline",
    "PickerConfig": "crisp_ext.config",
    "Micrograph": "crisp_ext.types",
    "Particles": "crisp_ext.types",
    "InputError": "crisp_ext.errors",
}
__all__ = ["__version__", *_FACE]


def __getattr__(name: str):
    if name in _FACE:
        import importlib

        value = getattr(importlib.import_module(_FACE[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'crisp_ext' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_FACE))
