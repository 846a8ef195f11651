"""RELION External-job adapter for crisp-ext (``crisp-relion``)."""
