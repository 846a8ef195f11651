"""Test doubles that stand in for external systems (a cryoSPARC server, ...)."""
