import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """name -> (model dir, HF model) for every architecture and the `unusual` head counts."""
    from hf_tiny import ARCHS, build_dir
    root = tmp_path_factory.mktemp("tiny_models")
    return {name: build_dir(name, root) for name in (*ARCHS, "unusual")}


@pytest.fixture(scope="session")
def qwen_tiny(tmp_path_factory):
    """name -> (model dir, HF model) for the gated-delta-net models (hf_tiny.QWEN)."""
    from hf_tiny import QWEN, hf_config, hf_model, save
    root = tmp_path_factory.mktemp("qwen_models")
    out = {}
    for name in QWEN:
        hf = hf_model(hf_config(name))
        out[name] = (save(hf, root / name), hf)
    return out
