"""stepflow_tl: Step-Saliency and StepFlow for reasoning models, on TransformerLens.

Implements "Reasoning Fails Where Step Flow Breaks" (arXiv 2604.06695).
"""

from .backend import adapter
from .errors import ModelLoadError, StepflowError, TraceError, UnsupportedModelError
from .models import load_model, model_info

__version__ = "0.1.0"
