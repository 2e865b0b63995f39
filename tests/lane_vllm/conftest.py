"""The vLLM lane (`make test-vllm`): tests that need vLLM; each module skips itself
where vLLM is not installed (the TL lanes), since a conftest cannot skip.

One engine per process: vLLM holds the weights and its KV cache, so the engine on the
embedded SmolLM2 is made once for the session and shared by every test.
"""

from __future__ import annotations

import os

import pytest

# A small KV cache (GiB) is plenty for the tests and keeps the lane's memory low.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


@pytest.fixture(scope="session")
def engine():
    from stepflow_tl.engines.vllm import VLLMEngine

    with VLLMEngine("smollm2", dtype="float32", max_num_seqs=8, max_model_len=1024) as eng:
        yield eng


@pytest.fixture(scope="session")
def smollm2():
    from stepflow_tl.tl.models import load_model

    return load_model()
