"""Tiny ModelSpecs with every mixer kind, for engine tests (no weights)."""
from pdbridge.spec import (AttentionSpec, FfnKind, GatedDeltaNetSpec, LayerSpec, Mamba1Spec,
                           Mamba2Spec, ModelSpec, ShortConvSpec)


def zoo_spec(dtype="float32", n_groups=1) -> ModelSpec:
    """Every mixer kind once, plus a FalconH1-style layer with attention and Mamba2 together."""
    attn = AttentionSpec(num_q_heads=4, num_kv_heads=2, head_dim=3)
    m2 = Mamba2Spec(num_heads=4, head_dim=2, d_state=3, n_groups=n_groups, d_conv=4)
    layers = (
        LayerSpec(0, (m2,), FfnKind.NONE),
        LayerSpec(1, (attn,), FfnKind.MLP),
        LayerSpec(2, (attn, m2), FfnKind.MLP),
        LayerSpec(3, (Mamba1Spec(intermediate=6, d_state=2, d_conv=3, dt_rank=1),), FfnKind.NONE),
        LayerSpec(4, (GatedDeltaNetSpec(2, 4, 2, 3, 4),), FfnKind.NONE),
        LayerSpec(5, (ShortConvSpec(hidden=4, l_cache=3),), FfnKind.NONE),
    )
    return ModelSpec("zoo", hidden_size=4, vocab_size=16, layers=layers, dtype=dtype)


def tiny_hybrid_dir(path, n_groups: int = 1, seed: int = 0) -> str:
    """A tiny random NemotronH (Mamba2, attention, MLP) saved as an HF directory.
    n_groups=1 makes B/C replicated under TP; 4 q / 2 kv heads replicate KV at TP=4."""
    import torch
    import transformers as tf
    cfg = tf.NemotronHConfig(
        vocab_size=64, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        intermediate_size=40, ssm_state_size=8, mamba_num_heads=4, mamba_head_dim=8,
        n_groups=n_groups, conv_kernel=4, chunk_size=8, initializer_range=0.3,
        layers_block_type=["mamba", "attention", "mlp", "mamba"])
    model = random_model(cfg, seed)
    model.save_pretrained(str(path))
    return str(path)


def random_model(cfg, seed: int = 0):
    """An fp32 model from `cfg` with its SSM parameters away from their init constants and
    dt clamps (so a wrong state shows in the tokens)."""
    import torch
    import transformers as tf
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("dt_bias", "A_log"):
                p.uniform_(-1.0, 1.0)
            elif leaf == "D":
                p.normal_(0.0, 1.0)
    return model
