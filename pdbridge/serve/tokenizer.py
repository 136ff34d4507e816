"""Text <-> token ids for the servers and `pdbridge generate`: a model directory's
`tokenizer.json` through the `tokenizers` library, its chat template from
`tokenizer_config.json` (rendered in a sandboxed Jinja2), and `TextStream`, which turns a
growing list of output ids into text deltas with OpenAI-style `stop` strings.

The embedded default model is byte-level (token id = UTF-8 byte); `byte_tokenizer_json` writes
that as a tokenizer.json, so every model goes through the same code.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Sequence

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"


class TokenizerError(ValueError):
    """A model directory's tokenizer files are missing or unreadable."""


@dataclass(frozen=True)
class TokenizerFiles:
    """What a server sends a router (NodeInfo) so that it needs no model directory."""
    tokenizer_json: str
    chat_template: str | None


class Tokenizer:
    def __init__(self, files: TokenizerFiles):
        from tokenizers import Tokenizer as _Tok
        try:
            self._tok = _Tok.from_str(files.tokenizer_json)
        except Exception as e:              # the library raises its own exception types
            raise TokenizerError(f"{TOKENIZER_FILE}: {e}") from None
        self.files = files
        self.chat_template = files.chat_template

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict[str, Any]]) -> str:
        """The prompt text for chat `messages`, with the generation prompt appended."""
        if not self.chat_template:
            raise TokenizerError("the model has no chat template "
                                 f"({CONFIG_FILE} has no 'chat_template')")
        return _template(self.chat_template).render(messages=messages,
                                                    add_generation_prompt=True,
                                                    bos_token="", eos_token="")


@lru_cache(maxsize=8)
def _template(source: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message):
        raise TokenizerError(f"chat template: {message}")
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


def read_files(model_dir: str | os.PathLike) -> TokenizerFiles | None:
    """The tokenizer files of a model directory; None if it has no tokenizer.json."""
    path = os.path.join(model_dir, TOKENIZER_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        tokenizer_json = f.read()
    template = None
    cfg_path = os.path.join(model_dir, CONFIG_FILE)
    if os.path.isfile(cfg_path):
        try:
            with open(cfg_path, encoding="utf-8") as f:
                template = json.load(f).get("chat_template")
        except (OSError, ValueError) as e:
            raise TokenizerError(f"{cfg_path}: {e}") from None
        if isinstance(template, list):      # named templates: take "default"
            template = next((t.get("template") for t in template
                             if t.get("name") == "default"), None)
    return TokenizerFiles(tokenizer_json, template)


def load(model_dir: str | os.PathLike | None) -> Tokenizer | None:
    """A model directory's tokenizer (None: the embedded default model's), or None if the
    directory has none."""
    if model_dir is None:
        from pdbridge.model.default_model import model_dir as default_dir
        model_dir = default_dir()
    files = read_files(model_dir)
    return Tokenizer(files) if files is not None else None


# ---- the default model's byte-level tokenizer ----------------------------------------------

def _byte_chars() -> list[str]:
    """The printable stand-in character of each byte value that byte-level BPE vocabularies
    use (GPT-2's table): printable Latin-1 bytes stand for themselves, the other 68 bytes
    map in order to code points 256, 257, ..."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def byte_tokenizer_json() -> str:
    """A tokenizer.json whose ids are UTF-8 bytes: encode(text) == list(text.encode())."""
    from tokenizers import Tokenizer as _Tok, decoders, models, pre_tokenizers
    vocab = {c: b for b, c in enumerate(_byte_chars())}
    tok = _Tok(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok.to_str()


# A plain chat template for models that ship none of their own (the default model).
SIMPLE_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}")


# ---- streaming text ---------------------------------------------------------------------------

class TextStream:
    """Output ids in, text deltas out. Text that might still become a stop string, or that
    ends in an incomplete UTF-8 sequence, is held back until it cannot; a stop string ends
    the text just before it (OpenAI semantics: the stop string is not returned)."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self._hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.text = ""              # everything returned so far
        self.stopped = False        # a stop string was found: the caller ends the request

    def add(self, ids: Sequence[int]) -> str:
        """The new text after `ids`; sets `stopped` when a stop string appears."""
        if self.stopped:
            return ""
        self.ids.extend(ids)
        full = self.tokenizer.decode(self.ids)
        start = max(0, len(self.text) - self._hold)
        hits = [i for i in (full.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            return self._emit(full[:min(hits)])
        ready = len(full) - self._hold
        while ready > len(self.text) and full[ready - 1] == "\ufffd":
            ready -= 1                       # maybe a UTF-8 sequence still being completed
        return self._emit(full[:max(ready, len(self.text))])

    def finish(self) -> str:
        """What was held back, once no more ids come."""
        if self.stopped:
            return ""
        return self._emit(self.tokenizer.decode(self.ids))

    def _emit(self, upto: str) -> str:
        if not upto.startswith(self.text):  # decoding is not prefix-stable (rare): no rewrite
            return ""
        delta = upto[len(self.text):]
        self.text = upto
        return delta
