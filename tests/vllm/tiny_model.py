"""Run with the vLLM environment's python (its transformers is the one vLLM loads with):

    tiny_model.py make DIR N_GROUPS [lfm2]   a tiny random NemotronH (or LFM2) for vLLM's CPU
    tiny_model.py greedy DIR N PROMPT   transformers' greedy tokens (JSON) for a JSON prompt
"""
import json
import os
import sys


def make(path: str, n_groups: int, seed: int = 0, arch: str = "nemotron_h") -> None:
    import transformers as tf
    from pdbridge.serve.tokenizer import byte_tokenizer_json
    # head_dim 32: the smallest the CPU attention kernel takes; layers M A M A give vLLM one
    # attention and one Mamba KV cache group.
    if arch == "lfm2":      # short conv + attention, head_dim 64 / 2 = 32
        cfg = tf.Lfm2Config(vocab_size=256, hidden_size=64, intermediate_size=128,
                            num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=2,
                            conv_L_cache=3, block_auto_adjust_ff_dim=False,
                            initializer_range=0.1, max_position_embeddings=512,
                            layer_types=["conv", "full_attention", "conv", "full_attention"])
        cfg.conv_dim = cfg.block_dim = 64       # the LFM2 release configs' keys vLLM reads
    else:
        cfg = tf.NemotronHConfig(
            vocab_size=256, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
            head_dim=32, intermediate_size=64, ssm_state_size=16, mamba_num_heads=4,
            mamba_head_dim=16, n_groups=n_groups, conv_kernel=4, chunk_size=16,
            initializer_range=0.3, layers_block_type=["mamba", "attention", "mamba", "attention"],
            bos_token_id=1, eos_token_id=2, pad_token_id=0, max_position_embeddings=512)
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "engine"))
    from engine_zoo import random_model
    model = random_model(cfg, seed)
    model.save_pretrained(path)
    with open(f"{path}/tokenizer.json", "w") as f:
        f.write(byte_tokenizer_json())
    with open(f"{path}/tokenizer_config.json", "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 512}, f)


def greedy(path: str, n: int, prompts: list[list[int]]) -> list[list[int]]:
    import torch
    import transformers as tf
    torch.set_num_threads(1)
    model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out = []
    for p in prompts:      # argmax of full forwards: generate() would mask EOS (min_new_tokens)
        ids = list(p)
        with torch.no_grad():
            for _ in range(n):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        out.append(ids[len(p):])
    return out


if __name__ == "__main__":
    if sys.argv[1] == "make":
        make(sys.argv[2], int(sys.argv[3]), arch=sys.argv[4] if len(sys.argv) > 4 else "nemotron_h")
    else:
        print(json.dumps(greedy(sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4]))))
