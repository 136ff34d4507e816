"""Tiny random-initialised transformers models for each architecture (test oracle)."""
from __future__ import annotations

import torch

NEMOTRON = dict(vocab_size=96, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                head_dim=8, intermediate_size=40, ssm_state_size=8, mamba_num_heads=4,
                mamba_head_dim=8, n_groups=2, conv_kernel=4, chunk_size=8, n_routed_experts=4,
                num_experts_per_tok=2, moe_intermediate_size=12,
                moe_shared_expert_intermediate_size=16, initializer_range=0.3)


def hf_config(arch: str, **over):
    import transformers as tf
    if arch == "nemotron_h":
        kw = dict(NEMOTRON, layers_block_type=["mamba", "attention", "moe", "mlp"])
        kw.update(over)
        return tf.NemotronHConfig(**kw)
    if arch == "bamba":
        kw = dict(vocab_size=96, hidden_size=32, num_hidden_layers=3, attn_layer_indices=[1],
                  num_attention_heads=4, num_key_value_heads=2, intermediate_size=40,
                  mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8, mamba_n_groups=2,
                  mamba_d_conv=4, mamba_chunk_size=8, initializer_range=0.3)
        kw.update(over)
        return tf.BambaConfig(**kw)
    if arch == "granitemoehybrid":
        kw = dict(vocab_size=96, hidden_size=32, num_hidden_layers=3,
                  layer_types=["mamba", "attention", "mamba"], num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=12, shared_intermediate_size=16,
                  num_local_experts=4, num_experts_per_tok=2, mamba_n_heads=4, mamba_d_head=16,
                  mamba_d_state=8, mamba_n_groups=1, mamba_d_conv=4, mamba_chunk_size=8,
                  position_embedding_type="rope", initializer_range=0.3,
                  embedding_multiplier=1.5, residual_multiplier=0.8, logits_scaling=1.3,
                  attention_multiplier=0.3)
        kw.update(over)
        return tf.GraniteMoeHybridConfig(**kw)
    if arch == "falcon_h1":
        kw = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, intermediate_size=40, mamba_n_heads=4,
                  mamba_d_head=8, mamba_d_ssm=32, mamba_d_state=8, mamba_n_groups=1,
                  mamba_d_conv=4, mamba_chunk_size=8, mamba_rms_norm=True,
                  mamba_norm_before_gate=True, initializer_range=0.3,
                  embedding_multiplier=1.2, lm_head_multiplier=0.9, attention_in_multiplier=1.1,
                  attention_out_multiplier=0.9, ssm_out_multiplier=1.1, key_multiplier=0.8,
                  ssm_in_multiplier=1.2, ssm_multipliers=[1.1, 0.9, 1.2, 0.8, 1.05],
                  mlp_multipliers=[1.1, 0.9])
        kw.update(over)
        return tf.FalconH1Config(**kw)
    if arch in JAMBA:
        kw = dict(JAMBA[arch], **over)
        return tf.JambaConfig(**kw)
    if arch in LFM2:
        kw = dict(LFM2[arch], **over)
        kw["num_hidden_layers"] = len(kw["layer_types"])
        return tf.Lfm2Config(**kw)
    if arch in ZAMBA2:
        kw = dict(ZAMBA2[arch])
        kw.update(over)
        kw["num_hidden_layers"] = len(kw["layers_block_type"])
        return tf.Zamba2Config(**kw)
    if arch in QWEN:
        return qwen_config(arch, **over)
    raise ValueError(arch)


# Gated delta net models: Hk = 2 k-heads, Hv = 4 v-heads (each k-head serves 2), dk != dv, 4 query
# and 2 KV heads with partial rotary (0.25 of head_dim 16): TP 1, 2, 4 and the uneven 3.
# Layers G G * G G * (G delta net, * gated attention). qwen3_next: MoE on odd layers
# (decoder_sparse_step 2) except layer 3, a dense MLP elsewhere, shared expert with its gate.
_QWEN_BASE = dict(vocab_size=96, hidden_size=32, intermediate_size=40, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, linear_conv_kernel_dim=4,
                  linear_key_head_dim=8, linear_value_head_dim=12, linear_num_key_heads=2,
                  linear_num_value_heads=4, initializer_range=0.2,
                  layer_types=["linear_attention", "linear_attention", "full_attention",
                               "linear_attention", "linear_attention", "full_attention"])
QWEN = {
    "qwen3_5_text": dict(_QWEN_BASE),
    "qwen3_next": dict(_QWEN_BASE, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=12,
                       shared_expert_intermediate_size=16, decoder_sparse_step=2,
                       mlp_only_layers=[3], norm_topk_prob=True),
    "qwen3_next_no_norm": dict(_QWEN_BASE, num_experts=4, num_experts_per_tok=2,
                               moe_intermediate_size=12, shared_expert_intermediate_size=16,
                               norm_topk_prob=False),
}


def qwen_config(arch: str, **over):
    import transformers as tf
    kw = dict(QWEN[arch], **over)
    kw["num_hidden_layers"] = len(kw["layer_types"])
    if arch == "qwen3_5_text":
        return tf.Qwen3_5TextConfig(**kw)
    return tf.Qwen3NextConfig(**kw)

# LFM2: short conv layers C and attention *, "C*CC*C"; 4 query / 2 KV heads of 8, D = 32 (TP 1, 2,
# 3, 4); the MLP width is adjusted to 48 (2/3 of 64, rounded up to a multiple of 8). `lfm2`
# has the conv/in/out biases (conv_bias) and L = 3; `lfm2_l4` none, L = 4, untied embeddings.
_LFM2_BASE = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                  num_key_value_heads=2, block_multiple_of=8, initializer_range=0.2,
                  layer_types=["conv", "full_attention", "conv", "conv", "full_attention", "conv"],
                  bos_token_id=None, eos_token_id=None, pad_token_id=None)
LFM2 = {
    "lfm2": dict(_LFM2_BASE, conv_L_cache=3, conv_bias=True),
    "lfm2_l4": dict(_LFM2_BASE, conv_L_cache=4, conv_bias=False, tie_word_embeddings=False,
                    norm_eps=1e-3),
}

# Jamba: 4 layers "m*m*" (Mamba1, attention without RoPE), MoE on layers 0 and 2 (4 experts,
# top 2, softmax over all, unnormalised), SwiGLU MLP on 1 and 3; 4 query / 2 KV heads; Mamba1
# I = 64 channels (TP 1, 2, 3, 4; 3 splits 21/21/22), N = 8, K = 4, dt_rank 4. `jamba_bias`:
# in/out projection biases, no conv bias, one MoE layer in four, K = 3.
_JAMBA_BASE = dict(vocab_size=96, hidden_size=32, intermediate_size=40, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=2, attn_layer_period=2,
                   attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=0,
                   num_experts=4, num_experts_per_tok=2, mamba_d_state=8, mamba_d_conv=4,
                   mamba_expand=2, mamba_dt_rank=4, initializer_range=0.3,
                   bos_token_id=None, eos_token_id=None, pad_token_id=None)
JAMBA = {
    "jamba": dict(_JAMBA_BASE),
    "jamba_bias": dict(_JAMBA_BASE, mamba_proj_bias=True, mamba_conv_bias=False, mamba_d_conv=3,
                       expert_layer_period=4, expert_layer_offset=2, rms_norm_eps=1e-3),
}

_ZAMBA_BASE = dict(vocab_size=96, hidden_size=32, num_attention_heads=4, intermediate_size=40,
                   mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, n_mamba_heads=4,
                   chunk_size=8, adapter_rank=4, initializer_range=0.2)
# Pass layers_block_type explicitly (REFERENCE.md). `zamba2`: two shared blocks in rotation over
# three hybrid layers, q/k/v adapters, RoPE, G = 2. `zamba2_gqa`: one block, GQA (2 KV heads, so
# no attention adapters: HF sizes them for kv == q), biases, G = 1, eps apart from the gated norm's.
# Init range 0.2, not 0.3: at 0.3 the 5-layer model amplifies rounding so much that transformers
# itself in fp32 and fp64 differs by 3e-4 in the logits.
ZAMBA2 = {
    "zamba2": dict(_ZAMBA_BASE, layers_block_type=["mamba", "hybrid", "mamba", "hybrid", "hybrid"],
                   num_key_value_heads=4, mamba_ngroups=2, num_mem_blocks=2,
                   use_shared_attention_adapter=True, use_mem_rope=True),
    "zamba2_gqa": dict(_ZAMBA_BASE, layers_block_type=["hybrid", "mamba", "hybrid"],
                       num_key_value_heads=2, mamba_ngroups=1, num_mem_blocks=1,
                       use_shared_attention_adapter=False, use_mem_rope=False,
                       add_bias_linear=True, rms_norm_eps=1e-3, hidden_act="silu"),
}


def hf_model(config, seed: int = 0):
    import transformers as tf
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config).float().eval()
    randomise_constants(model)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = None
    return model


@torch.no_grad()
def randomise_constants(model) -> None:
    """Parameters that initialise to constants (ones, zeros, log(1..H)) would hide mistakes."""
    zero_centred = model.config.model_type in ("qwen3_5_text", "qwen3_next", "qwen3_5")
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "dt_bias":
            p.uniform_(-1.0, 1.0)       # softplus(dt) stays far above time_step_min: no clamp
        elif leaf == "A_log":
            p.uniform_(-1.0, 1.0)
        elif leaf == "D":
            p.normal_(0.0, 1.0)
        elif zero_centred and "norm" in name and "linear_attn" not in name:
            p.normal_(0.0, 0.2)         # Qwen's zero-centred norms: the weight is w in (1 + w)
        elif "norm" in name and leaf == "weight":
            p.copy_(1.0 + 0.2 * torch.randn_like(p))
        elif "conv1d.bias" in name or leaf == "bias":
            p.normal_(0.0, 0.2)
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.normal_(0.0, 0.1)


def save(model, path) -> str:
    model.save_pretrained(path)
    return str(path)


@torch.no_grad()
def hf_prompt(model, ids: list[int]):
    """-> (logits (T, vocab), past_key_values) for one prompt."""
    out = model(torch.tensor([ids]), use_cache=True)
    return out.logits[0].float(), out.past_key_values


@torch.no_grad()
def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                         min_new_tokens=n)
    return out[0, len(ids):].tolist()


UNUSUAL = dict(NEMOTRON, hidden_size=48, num_attention_heads=6, num_key_value_heads=2,
               mamba_num_heads=6, n_groups=3, layers_block_type=["mamba", "attention", "mlp", "mamba"])
ARCHS = ("nemotron_h", "bamba", "granitemoehybrid", "falcon_h1")
PROMPT = [3, 17, 42, 5, 9, 60, 11, 2, 33, 7, 51]


def build_dir(name: str, root) -> tuple[str, object]:
    """Save a tiny HF model under root/name; `unusual`: 6 q / 2 kv heads, 6 mamba heads, G = 3."""
    import transformers as tf
    cfg = tf.NemotronHConfig(**UNUSUAL) if name == "unusual" else hf_config(name)
    model = hf_model(cfg)
    return save(model, f"{root}/{name}"), model


def prefill_states(model, prompt: list[int], slot: int = 1, chunks: list[int] | None = None):
    """Our prompt logits (T, vocab) and, per Mamba2 layer, (conv, ssm) of the slot afterwards."""
    from pdbridge.model import DenseCaches, ForwardBatch
    dtype = next(model.parameters()).dtype              # caches as wide as the model
    caches = DenseCaches(model.spec, model.comm.rank, model.comm.size, num_blocks=6,
                         block_tokens=8, kernel_block_tokens=4, dtype=dtype, ssm_dtype=dtype)
    logits, ctx = [], 0
    for n in chunks or [len(prompt)]:
        batch = ForwardBatch.build([prompt[ctx:ctx + n]], [ctx], [[3, 0, 5]], [slot])
        logits.append(model(batch, caches, all_logits=True))
        ctx += n
    states = {L: (caches.conv(L)[slot].clone(),                  # short conv: no SSM state
                  caches.ssm(L)[slot].clone() if L in caches._ssm else None)
              for L in caches._conv}
    return torch.cat(logits), states


def tp_job(comm, dirs: dict[str, str], prompt: list[int], n: int,
           dtype: torch.dtype = torch.float32) -> dict:
    """On every rank: greedy tokens and the post-prompt states of each model."""
    from pdbridge.model import DenseCaches, greedy, load_model
    out = {}
    for name, d in dirs.items():
        model = load_model(d, comm, dtype=dtype)
        _, states = prefill_states(model, prompt)
        caches = DenseCaches(model.spec, comm.rank, comm.size, num_blocks=8, block_tokens=4,
                             dtype=dtype, ssm_dtype=dtype)
        out[name] = (greedy(model, caches, prompt, n), states)
    return out


def assert_greedy_matches_hf(model_dir: str, hf, n: int = 16) -> None:
    """Our greedy tokens from a saved checkpoint equal HF generate's, and are not degenerate."""
    from pdbridge.model import DenseCaches, greedy, load_model
    ours = load_model(model_dir)
    caches = DenseCaches(ours.spec, num_blocks=8, block_tokens=4, kernel_block_tokens=2)
    tokens = greedy(ours, caches, PROMPT, n)
    assert tokens == hf_greedy(hf, PROMPT, n)
    assert len(set(tokens)) > 3, "a degenerate test model would prove little"


def assert_rank_states_match(spec, size: int, rank: int, states: dict, ref_states: dict) -> None:
    """Each Mamba2 layer's conv / SSM state on `rank` of `size` is the TP=1 state cut by the
    spec's sharding rules, up to the rounding of another summation order (tests/numerics.py;
    the scale is the whole TP=1 tensor's, whose magnitudes the rank's values are computed from)."""
    from numerics import REORDER_ULPS, assert_close
    from pdbridge.model.shard import mamba2_shard
    from pdbridge.model.tp import mamba_rows
    from pdbridge.spec import MixerKind
    for layer, (conv, ssm) in states.items():
        m = spec.layers[layer].mixer(MixerKind.MAMBA2)
        rows = mamba_rows(mamba2_shard(m, size, rank))
        ref_conv, ref_ssm = ref_states[layer]
        where = f"layer {layer}, TP={size} rank {rank}"
        assert_close(conv, ref_conv[rows["conv"]], ulps=REORDER_ULPS, scale=ref_conv.abs().max(),
                     what=f"conv state, {where}")
        assert_close(ssm, ref_ssm[rows["heads"]], ulps=REORDER_ULPS, scale=ref_ssm.abs().max(),
                     what=f"SSM state, {where}")
