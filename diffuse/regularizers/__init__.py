"""Regularizers added to an objective's loss, registered by name (contract: diffuse/contracts.py
Regularizer). Every module here is found by diffuse/core/discovery.py."""
