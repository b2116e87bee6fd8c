"""ptg: Preference-grounded Token-level Guidance (Yang et al., NeurIPS 2023) for fine-tuning language models.

The library is what every pipeline stage calls: ``ptg.losses`` (pure math), ``ptg.lm.models`` (loading and the
token alignment shared by guidance and LM), ``ptg.guidance.model`` (the token-level reward model and its listwise
fitting), ``ptg.lm.sampling``, ``ptg.lm.train``, ``ptg.metrics``, ``ptg.schemas`` and ``ptg.tracking``.
"""

__version__ = "0.1.0"
