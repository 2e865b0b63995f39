"""Shared fixtures: tiny random models on both backends, and the embedded SmolLM2."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stepflow_tl.tl.models import load_embedded_tokenizer, load_model, make_tiny_hf


def _has_hooked_transformer() -> bool:
    try:
        from transformer_lens import HookedTransformer  # noqa: F401
    except ImportError:
        return False
    return True


HAS_HOOKED = _has_hooked_transformer()


def pytest_report_header(config):
    """Which lane this is: the versions that decide whether the suite passes."""
    from importlib.metadata import version

    return "lane: " + ", ".join(f"{name} {version(name)}" for name in ("torch", "transformers", "transformer-lens"))
# The real traces live in shared/, beside the repository (CI clones main next to it).
R1_TRACES = next(
    (p for p in (Path(__file__).resolve().parents[2] / "shared" / "data" / "r1_traces.jsonl",
                 Path("/work/shared/data/r1_traces.jsonl")) if p.is_file()),
    Path(__file__).resolve().parents[2] / "shared" / "data" / "r1_traces.jsonl",
)
BACKENDS = ["bridge", "hooked"] if HAS_HOOKED else ["bridge"]
needs_hooked = pytest.mark.skipif(
    not HAS_HOOKED, reason="HookedTransformer exists only in TransformerLens 3.9 (the tl39 lane)"
)


def non_canonical_output(tok):
    """Ids of "Add.\\n\\n😀\\ufffdIt is 4.\\n</think>\\n\\n4" as SmolLM2 would never tokenise
    it: the emoji as four byte tokens, a stray byte that never forms a character (decoded
    as U+FFFD), and "It" spelt letter by letter."""
    # GPT-2's byte-level alphabet: the vocabulary writes byte b as the character alphabet[b]
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    alphabet = {b: chr(b) for b in printable}
    alphabet.update({b: chr(256 + i) for i, b in enumerate(b for b in range(256) if b not in alphabet)})
    byte = lambda b: tok.convert_tokens_to_ids(alphabet[b])
    return (tok.encode("Add.\n\n", add_special_tokens=False) + [byte(b) for b in "😀".encode()]
            + [byte(0xF0)] + [tok.convert_tokens_to_ids(c) for c in "It"]
            + tok.encode(" is 4.\n</think>\n\n4", add_special_tokens=False))


def apples_trace(tok):
    """The ~90-token word problem the saliency and tiled tests map (four thinking steps)."""
    from stepflow_tl.traces.trace import Trace

    thinking = ("Anna starts with 7 apples.\n\nShe buys 5 more, so 7 + 5 = 12.\n\n"
                "Then she gives 4 away: 12 - 4 = 8.\n\nCheck: 8 + 4 = 12, fine.")
    return Trace.from_parts(
        tok, question="Anna has 7 apples, buys 5 and gives 4 away. How many are left?",
        thinking=thinking, summary="She has 8 apples left.\n\nAnswer: \\boxed{8}",
    )


def sum_trace(tok):
    """A short four-step trace for the intervention and validation tests."""
    from stepflow_tl.traces.trace import Trace

    thinking = "\n\n".join(["First add the two numbers.", "Then carry the one.", "Check the sum again.",
                            "It is seven."])
    return Trace.from_parts(tok, "What is 3 + 4?", thinking, "The answer is 7.")


@pytest.fixture(scope="session")
def tokenizer():
    return load_embedded_tokenizer()


# The pre-tokenizer split of Qwen2 (and so of DeepSeek-R1-Distill-Qwen and QwQ) tokenizers.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")


@pytest.fixture(scope="session")
def qwen2_style_tokenizer():
    """A Qwen2-style byte-level BPE built offline: Qwen2's NFC normaliser, split regex and
    byte-level pieces, R1-Distill's role tokens and think tags, merges trained on the
    real traces (tokens such as ".\n\n" and " **" that the embedded tokenizer lacks)."""
    import json

    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    specials = ["<\uff5cbegin\u2581of\u2581sentence\uff5c>", "<\uff5cend\u2581of\u2581sentence\uff5c>",
                "<\uff5cUser\uff5c>", "<\uff5cAssistant\uff5c>"]
    records = [json.loads(line) for line in R1_TRACES.read_text().splitlines()]
    trainer = trainers.BpeTrainer(vocab_size=6000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=specials, show_progress=False)
    bpe.train_from_iterator([r["question"] for r in records] + [r["output"] for r in records], trainer)
    bpe.add_tokens([AddedToken("<think>", normalized=False), AddedToken("</think>", normalized=False)])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=specials[0], eos_token=specials[1])
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}"
        "{% elif m['role'] == 'user' %}<\uff5cUser\uff5c>{{ m['content'] }}"
        "{% else %}<\uff5cAssistant\uff5c>{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<\uff5cAssistant\uff5c>{% endif %}")
    return tok


@pytest.fixture(scope="session")
def tiny_hf():
    """The random transformers model behind every tiny TL model (fp32, eager)."""
    return make_tiny_hf(n_layers=3, n_heads=4, n_kv_heads=2, d_model=64, seed=0)


def _tiny(backend, tiny_hf, tokenizer):
    return load_model("tiny-llama", backend=backend, hf_model=tiny_hf, tokenizer=tokenizer, device="cpu")


@pytest.fixture(scope="module")
def reference_hf():
    """A second copy of the tiny weights, for the independent references
    (`tests/reference.py`): TransformerBridge wraps its HF model in place."""
    return make_tiny_hf(n_layers=3, n_heads=4, n_kv_heads=2, d_model=64, seed=0)


def rel_error(a, b) -> float:
    """Largest absolute difference relative to the largest entry of the reference ``b``."""
    return float((a - b).abs().max() / b.abs().max())


def loss_positions(trace, loss):
    """The positions a built-in loss reads (None: every position), as the references take them."""
    from stepflow_tl.saliency.losses import answer_token_positions

    if loss == "sequence":
        return None
    if loss == "summary":
        return torch.isin(trace.token_steps, torch.tensor(trace.summary_steps)).nonzero()[:, 0]
    return answer_token_positions(trace)


@pytest.fixture(scope="session")
def tiny_bridge(tiny_hf, tokenizer):
    return _tiny("bridge", tiny_hf, tokenizer)


@pytest.fixture(scope="session")
def tiny_hooked(tiny_hf, tokenizer):
    if not HAS_HOOKED:
        pytest.skip("HookedTransformer exists only in TransformerLens 3.9 (the tl39 lane)")
    return _tiny("hooked", tiny_hf, tokenizer)


@pytest.fixture(params=BACKENDS)
def tiny_model(request, tiny_hf, tokenizer):
    """A tiny model on each backend this TransformerLens version has."""
    return request.getfixturevalue(f"tiny_{request.param}")


@pytest.fixture(scope="session")
def smollm2():
    return load_model(backend="bridge", device="cpu")


@pytest.fixture(scope="session")
def smollm2_hooked():
    if not HAS_HOOKED:
        pytest.skip("HookedTransformer exists only in TransformerLens 3.9 (the tl39 lane)")
    return load_model(backend="hooked", device="cpu")


@pytest.fixture(autouse=True)
def _no_leaked_grad_mode():
    """Every test starts with grad enabled and leaves it that way."""
    assert torch.is_grad_enabled()
    yield
    assert torch.is_grad_enabled(), "a test left torch.no_grad() active"
