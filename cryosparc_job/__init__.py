"""cryoSPARC adapter for crisp-ext: live External jobs through cryosparc-tools, and offline project directories.

    from cryosparc_job import pick_live, pick_offline

Names load lazily, so ``crisp-cryosparc --help`` stays instant.
"""

_EXPORTS = {
    "pick_live": "live", "run_live": "live", "LiveRun": "live", "JobFailed": "live",
    "pick_offline": "offline", "OfflineRun": "offline", "read_output": "offline",
    "connect": "connect", "CryoSPARCError": "connect",
}
__all__ = ["CryoSPARCError", "JobFailed", "LiveRun", "OfflineRun", "connect", "pick_live", "pick_offline",
           "read_output", "run_live"]


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
