"""Shared fixtures: tiny random checkpoints written by HF transformers (the reference), and
where ../shared lives. TRITON_INTERPRET must be set before any kernel is defined."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

SHARED = Path(os.environ.get("STEER_SHARED", Path(__file__).resolve().parents[2] / "shared"))
DATA_DIR = SHARED / "data"
TOKENIZERS = SHARED / "tokenizers"
REAL_MODELS = Path(os.environ.get("STEER_REAL_MODELS", "/tmp/models"))

# reward.py imports math-verify at its top (its forked workers inherit it), and eval.py imports
# reward.py. Where the package is missing (the GPU image has none) their test files are not
# collected, and the tests that grade through another file skip, saying why.
try:
    import math_verify  # noqa: F401
    HAS_MATH_VERIFY = True
except ImportError:
    HAS_MATH_VERIFY = False
collect_ignore = [] if HAS_MATH_VERIFY else ["test_reward.py", "test_eval.py"]
needs_math_verify = pytest.mark.skipif(not HAS_MATH_VERIFY, reason="math-verify is not installed (grading)")

FAMILIES = {
    # name: (model_type, config overrides)
    "qwen2-tied": ("qwen2", dict(tie_word_embeddings=True, num_attention_heads=4, num_key_value_heads=2)),
    "qwen2-untied": ("qwen2", dict(tie_word_embeddings=False, num_attention_heads=4, num_key_value_heads=4)),
    "llama31": ("llama", dict(tie_word_embeddings=False, hidden_size=56, num_attention_heads=7, num_key_value_heads=1,
                              head_dim=16,  # explicit, != hidden_size / heads (HF checks hidden % heads == 0)
                              max_position_embeddings=128,
                              rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
                                                   low_freq_factor=1.0, high_freq_factor=4.0,
                                                   original_max_position_embeddings=32))),
    "llama-tied": ("llama", dict(tie_word_embeddings=True, num_attention_heads=4, num_key_value_heads=2)),
}


def hf_model(family="qwen2-tied", seed=0, vocab_size=96, hidden_size=64, layers=2, intermediate_size=128, **kw):
    """A tiny random HF model whose attention is sharp and logits O(1-10): default init gives
    near-uniform attention, which would hide rope and GQA mistakes."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
    model_type, overrides = FAMILIES[family]
    cfg_cls, model_cls = (Qwen2Config, Qwen2ForCausalLM) if model_type == "qwen2" else (LlamaConfig, LlamaForCausalLM)
    args = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=layers,
                intermediate_size=intermediate_size, max_position_embeddings=256, rms_norm_eps=1e-6)
    args.update(overrides)
    args.update(kw)
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**args)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "q_proj" in name or "k_proj" in name:  # x14: entropy ~1 nat vs 3.6 uniform at T=100 (test_model)
                p.mul_(14.0)
            elif "embed_tokens" in name or "lm_head" in name:
                p.mul_(15.0)
    return model


def token_logprobs(model, tokens, targets, temperature=1.0, vocab_size=None, chunk_size=1024):
    """tokens, targets (B, T) -> log p(targets | prefix) (B, T), fp32: model.py's forward and its
    chunked head, the way train.py scores completions."""
    import model as M
    hidden = model.hidden_states(tokens)
    return M.chunked_logprobs(hidden, model.head_weight, targets, temperature, vocab_size, chunk_size)


def write_checkpoint(folder, family="qwen2-tied", dtype=torch.float32, **kw) -> Path:
    """Save a tiny HF model as config.json + model.safetensors; returns the folder."""
    folder = Path(folder)
    hf_model(family, **kw).to(dtype).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("tiny_qwen"), "qwen2-tied")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("tiny_llama"), "llama31")


@pytest.fixture(scope="session")
def tiny_with_tokenizer(tmp_path_factory) -> Path:
    """A tiny random Qwen2 with the real Qwen2.5 tokenizer beside it (math tasks, eval, the CLIs)."""
    tok_dir = TOKENIZERS / "qwen2.5"
    if not (tok_dir / "tokenizer.json").is_file():
        pytest.skip(f"{tok_dir} is absent (the shared tokenizers)")
    folder = tmp_path_factory.mktemp("tiny_tok")
    # the real tokenizer needs the real vocabulary (151,936 rows); a tiny width keeps it cheap
    write_checkpoint(folder, "qwen2-tied", vocab_size=151936, hidden_size=16, intermediate_size=32,
                     max_position_embeddings=2048)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok_dir / name, folder / name)
    return folder
