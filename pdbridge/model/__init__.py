"""Reference torch model for Mamba2 hybrids (NemotronH, Bamba, GraniteMoeHybrid, FalconH1, Zamba2),
gated-delta-net hybrids (Qwen3.5, Qwen3-Next), Mamba1 hybrids (Jamba) and short-conv hybrids
(LFM2), loaded from HF safetensors, tensor-parallel by the spec's ShardRules."""
from .batch import ForwardBatch
from .comm import SingleComm, TorchDistComm
from .dense_caches import DenseCaches
from .generate import greedy
from .loader import build_model, load_model, read_safetensors
from .model import HybridModel

__all__ = ["ForwardBatch", "SingleComm", "TorchDistComm", "DenseCaches", "greedy", "build_model",
           "load_model", "read_safetensors", "HybridModel"]
