"""Tokenizer and prompts: text <-> token ids, the ids that end a completion, and the model's
own chat template rendered around a math problem.

A model folder (or a tokenizer folder) holds tokenizer.json, read by the `tokenizers`
library, and tokenizer_config.json (special tokens, chat template); generation_config.json
and config.json add end-of-sequence ids when present. The chat template is Jinja, rendered
the way Hugging Face does it (sandboxed, trim_blocks, lstrip_blocks, raise_exception and
strftime_now), so a prompt is token for token the one the model was tuned on:

    <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{problem}<|im_end|>\\n<|im_start|>assistant\\n

Prompts are encoded WITHOUT adding special tokens: templates that want a BOS write its text
themselves (Llama 3's starts with {{ bos_token }}), and adding one more would double it. A
model with no chat template (a base model) gets a plain prompt instead, BOS text first when
the tokenizer has one:

    {bos}{system}\\n\\nProblem: {problem}\\nSolution:
"""
import json
from datetime import datetime
from pathlib import Path
from typing import Iterable

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer

SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
# Chat end tokens of the families we run (Qwen2.x, Llama 3.x). Whichever of them the vocabulary
# holds ends a completion even when no config names it: Qwen's tokenizer_config names only
# <|im_end|>, yet a base Qwen model ends its text with <|endoftext|>.
END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<|eom_id|>")


def _token_text(value) -> str | None:
    """A special token from tokenizer_config.json: plain text, or an AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value


def _ids(value) -> list[int]:
    """An eos_token_id field: absent, one id, or a list of ids."""
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])  # {% break %} in some templates
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)  # Llama 3.1's "Today Date"
    return env.from_string(template)


def _chat_template(folder: Path, config: dict) -> str | None:
    """chat_template.jinja (what recent transformers saves) wins over the config's field,
    which is text or a list of named templates (then the one named "default")."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template


class Tokenizer:
    def __init__(self, tokenizer: _HFTokenizer, config: dict, chat_template: str | None = None,
                 eos_token_ids: Iterable[int] = ()):
        """`config` is tokenizer_config.json; `eos_token_ids` come from generation_config.json
        and config.json."""
        self.tokenizer = tokenizer
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        # ids >= vocab_size exist only as padding rows of the embedding (151,665 real tokens
        # against 151,936 rows for Qwen2.5): the sampler must never emit them.
        self.vocab_size = max(vocab.values()) + 1
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self._id_of(self.bos_token, "bos_token")  # both must be tokens of this vocabulary
        self._id_of(_token_text(config.get("pad_token")), "pad_token")
        stop = set(eos_token_ids)
        if self.eos_token is not None:
            stop.add(self._id_of(self.eos_token, "eos_token"))
        stop.update(vocab[t] for t in END_TOKENS if t in vocab)
        self.stop_token_ids = sorted(stop)
        self._template = _compile(chat_template) if chat_template else None

    def _id_of(self, token: str | None, field: str) -> int | None:
        if token is None:
            return None
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"tokenizer_config.json: {field} {token!r} is not in the tokenizer's vocabulary")
        return token_id

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        folder = Path(path)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder / name} not found: a tokenizer folder holds "
                                        f"tokenizer.json and tokenizer_config.json")
        config = _read_json(folder / "tokenizer_config.json")
        eos_ids = (_ids(_read_json(folder / "generation_config.json").get("eos_token_id"))
                   + _ids(_read_json(folder / "config.json").get("eos_token_id")))
        return cls(_HFTokenizer.from_file(str(folder / "tokenizer.json")), config,
                   _chat_template(folder, config), eos_ids)

    # --- text <-> ids

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Special-token text in `text` (e.g. "<|im_end|>") becomes its single id either way;
        add_special_tokens=True also applies the tokenizer's post-processor (Llama: BOS)."""
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        # No clean_up_tokenization_spaces: that BERT-era pass deletes spaces before punctuation
        # and would change what the model wrote (transformers 5 skips it for BPE as well).
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # --- prompts

    def render_prompt(self, problem: str, system: str | None = SYSTEM_PROMPT) -> str:
        """The full prompt text, up to where the model starts its answer. system=None leaves
        the system message out (Qwen's template then puts in its own default one)."""
        if self._template is None:  # base model: "{bos}{system}\n\nProblem: {problem}\nSolution:"
            head = f"{system}\n\n" if system else ""
            return f"{self.bos_token or ''}{head}Problem: {problem}\nSolution:"
        messages = [{"role": "user", "content": problem}]
        if system is not None:
            messages.insert(0, {"role": "system", "content": system})
        # Absent special tokens are passed as "" because Jinja prints None as "None".
        return self._template.render(messages=messages, add_generation_prompt=True,
                                     bos_token=self.bos_token or "", eos_token=self.eos_token or "")

    def encode_prompt(self, problem: str, system: str | None = SYSTEM_PROMPT) -> list[int]:
        return self.encode(self.render_prompt(problem, system))
