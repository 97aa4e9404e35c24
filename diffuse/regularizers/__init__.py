"""Regularizers added to an objective's loss, registered by name. Each is called as
`reg(objective, backbone, batch, generator) -> (loss, metrics)` and its loss is added to the total."""

from diffuse.regularizers import cdlm_consistency  # noqa: F401
