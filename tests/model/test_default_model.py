"""The embedded default model: deterministic, valid at TP 1-4, loadable by transformers."""
import pytest
import torch

from hf_tiny import hf_greedy
from pdbridge.model import DenseCaches, default_model, greedy, load_model, read_safetensors
from pdbridge.spec import EngineLayout, load_model_spec


@pytest.fixture(scope="module")
def ddir(tmp_path_factory):
    return default_model.model_dir(tmp_path_factory.mktemp("dm") / "m")


def test_deterministic(ddir, tmp_path):
    again = read_safetensors(default_model.model_dir(tmp_path / "again"))
    first = read_safetensors(ddir)
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_every_tp_size_1_to_4_is_valid(ddir):
    spec = load_model_spec(ddir)
    assert spec.pattern() == default_model.PATTERN
    for t in (1, 2, 3, 4):
        EngineLayout(spec, t)


def test_transformers_reads_it_and_agrees(ddir):
    import transformers as tf
    hf = tf.AutoModelForCausalLM.from_pretrained(ddir, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = hf.generation_config.pad_token_id = None
    prompt = default_model.encode("Hello, hybrid")
    ours = load_model(ddir)
    tokens = greedy(ours, DenseCaches(ours.spec, num_blocks=4, block_tokens=16), prompt, 12)
    assert tokens == hf_greedy(hf, prompt, 12)
    assert all(t in default_model.PRINTABLE for t in tokens)


def test_byte_tokenizer_round_trip():
    text = "héllo, wörld ∑"
    assert default_model.decode(default_model.encode(text)) == text
