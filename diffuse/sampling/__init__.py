"""Samplers: strategies over an objective's reverse process, registered by name (contract:
diffuse/contracts.py Sampler). Every module here is found by diffuse/core/discovery.py."""
