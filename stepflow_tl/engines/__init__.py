"""Generation engines besides the TransformerLens path of `interventions.generate`.

``engines.vllm`` runs generation in vLLM with the same `Intervention` objects, exact to
the TL teacher-forced forward (docs/vllm.md). It is the only module of the package that
imports vLLM, and it imports it only when an engine is made, so this package (and
`VLLMEngine`) imports everywhere; ``ENGINES`` names the choices the CLI and the study functions accept.
"""

from .vllm import VLLMEngine

ENGINES = ("tl", "vllm")

__all__ = ["ENGINES", "VLLMEngine"]
