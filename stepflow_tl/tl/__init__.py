"""The TransformerLens layer: loading models, the one place that knows how
``TransformerBridge`` (TL 4.x) and ``HookedTransformer`` (TL 3.9) differ, and every hook
mechanism the plugin uses. Nothing above this layer checks which backend it runs on."""

from .adapter import ModelAdapter, adapter, attn_hook, block_hook, pad_token_ids, tokenizer_of
from .hooks import PermanentHooks, temporary_hooks
from .models import DTYPES, ModelInfo, load_model, model_info

__all__ = [
    "DTYPES", "ModelAdapter", "ModelInfo", "PermanentHooks", "adapter", "attn_hook", "block_hook", "load_model",
    "model_info", "pad_token_ids", "temporary_hooks", "tokenizer_of",
]
