"""Few-step students distilled from a trained teacher, registered by name (DISTILLERS): `sdtt` (SDTT,
self-distillation through time), `cdlm` (the CDLM paper's trajectory distillation) and `dcd` (Duo's discrete
consistency distillation of uniform-state models). A distiller
replaces the objective's training loss (`DiffusionLM.training_step`); validation stays the objective's
own bound, so a student's val/nelbo sits on its teacher's scale. `python -m diffuse.distill` runs them.
Every module here is found by diffuse/core/discovery.py."""
