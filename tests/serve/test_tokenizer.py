"""The servers' tokenizer: the default model's byte-level tokenizer.json, chat templates, and
TextStream's deltas with stop strings and split UTF-8 sequences."""
from __future__ import annotations

import json

import pytest

from pdbridge.model import default_model
from pdbridge.serve.tokenizer import (SIMPLE_CHAT_TEMPLATE, TextStream, Tokenizer,
                                      TokenizerError, TokenizerFiles, byte_tokenizer_json, load,
                                      read_files)

TEXTS = ["hello world", "  two  spaces\nand a newline\t", "héllo wörld ✓ 日本語 🙂", "", "\x00\x7f"]


@pytest.fixture(scope="module")
def byte_tok():
    return Tokenizer(TokenizerFiles(byte_tokenizer_json(), SIMPLE_CHAT_TEMPLATE))


@pytest.mark.parametrize("text", TEXTS)
def test_byte_tokenizer_is_the_default_models_utf8_bytes(byte_tok, text):
    assert byte_tok.encode(text) == default_model.encode(text) == list(text.encode())
    assert byte_tok.decode(byte_tok.encode(text)) == text


def test_default_model_directory_ships_its_tokenizer(tmp_path):
    d = default_model.model_dir(tmp_path / "m")
    tok = load(d)
    assert tok is not None and tok.encode("ab") == [97, 98]
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "user: hi\nassistant:"
    assert read_files(tmp_path) is None         # no tokenizer.json: no tokenizer


def test_a_missing_chat_template_is_an_error_naming_the_file(tmp_path):
    tok = Tokenizer(TokenizerFiles(byte_tokenizer_json(), None))
    with pytest.raises(TokenizerError, match="tokenizer_config.json"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_named_chat_templates_and_a_bad_config(tmp_path):
    (tmp_path / "tokenizer.json").write_text(byte_tokenizer_json())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": "tool_use", "template": "x"},
                           {"name": "default", "template": "D{{ messages[0]['content'] }}"}]}))
    assert load(tmp_path).apply_chat_template([{"role": "user", "content": "q"}]) == "Dq"
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer_config.json"):
        read_files(tmp_path)


def test_templates_run_sandboxed(byte_tok):
    evil = Tokenizer(TokenizerFiles(byte_tokenizer_json(),
                                    "{{ ''.__class__.__mro__[1].__subclasses__() }}"))
    with pytest.raises(Exception, match="unsafe|not safely|access"):
        evil.apply_chat_template([])


def _stream(tok, text, stop, step=1):
    """Feed `text`'s ids `step` at a time; returns the deltas and the stream."""
    ids = tok.encode(text)
    s = TextStream(tok, stop)
    deltas = []
    for i in range(0, len(ids), step):
        deltas.append(s.add(ids[i:i + step]))
        if s.stopped:
            break
    deltas.append(s.finish())
    return deltas, s


@pytest.mark.parametrize("step", [1, 2, 5])
def test_stream_without_stop_returns_the_whole_text(byte_tok, step):
    for text in TEXTS:
        deltas, s = _stream(byte_tok, text, (), step)
        assert "".join(deltas) == text and not s.stopped


def test_split_utf8_is_held_back_until_complete(byte_tok):
    ids = byte_tok.encode("a✓")                 # ✓ is 3 bytes
    s = TextStream(byte_tok)
    assert s.add(ids[:2]) == "a"                # half a character: nothing of it yet
    assert s.add(ids[2:3]) == ""
    assert s.add(ids[3:]) == "✓"


@pytest.mark.parametrize("step", [1, 3])
def test_stop_string_ends_the_text_before_it(byte_tok, step):
    deltas, s = _stream(byte_tok, "one two STOP three", ["STOP", "zzz"], step)
    assert "".join(deltas) == "one two " and s.stopped
    # The earliest of several stop strings wins, and nothing after it is returned.
    deltas, s = _stream(byte_tok, "abc<end>def</s>", ["</s>", "<end>"], step)
    assert "".join(deltas) == "abc" and s.stopped
    # Text that only began like a stop string is returned in the end.
    deltas, s = _stream(byte_tok, "a STO", ["STOP"], step)
    assert "".join(deltas) == "a STO" and not s.stopped
