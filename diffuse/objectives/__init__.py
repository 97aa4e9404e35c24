"""Training objectives, registered by name. Every module here is found by diffuse/core/discovery.py."""
