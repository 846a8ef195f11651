"""cryoSPARC adapter for crisp-ext: live External jobs through cryosparc-tools, and offline project directories."""
