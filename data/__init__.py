"""Data for the math RL task: datasets (`load`) and the tokenizer with its prompt template.
Depends only on huggingface-hub, tokenizers and jinja2: nothing here imports the model,
the sampler, the trainer or the evaluator."""
from data.chat import SYSTEM_PROMPT, Tokenizer
from data.datasets import ENV_VAR, NAMES, default_dir, load

__all__ = ["ENV_VAR", "NAMES", "SYSTEM_PROMPT", "Tokenizer", "default_dir", "load"]
