"""Backbones, registered by name (contract: diffuse/contracts.py Backbone). Every module here is
found by diffuse/core/discovery.py."""
