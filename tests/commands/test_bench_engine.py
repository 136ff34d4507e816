"""`pdbridge bench engine` runs end to end on a tiny checkpoint and prints both tables (no
wall-clock assertions: CI machines are shared)."""
import json

import torch

from pdbridge.cli import main


def _tiny_checkpoint(path) -> str:
    import transformers as tf
    torch.manual_seed(0)
    cfg = tf.NemotronHConfig(vocab_size=64, hidden_size=32, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=8, intermediate_size=40,
                             ssm_state_size=8, mamba_num_heads=4, mamba_head_dim=8, n_groups=2,
                             conv_kernel=4, chunk_size=8, layers_block_type=["mamba", "attention"])
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    return str(path)


def test_bench_engine_prints_prefill_and_decode_columns(tmp_path, capsys):
    d = _tiny_checkpoint(tmp_path / "m")
    rc = main(["bench", "engine", "--model", d, "--tokens", "5,19", "--reps", "1",
               "--decode-steps", "2", "--threads", "1"])
    out = capsys.readouterr().out
    assert rc == 0
    for col in ("tokens", "ours_tok/s", "hf_tok/s", "speedup", "context", "ours_ms/tok",
                "mamba_ms/tok", "hf_ms/tok"):
        assert col in out, col
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["5"], ["19"])]
    assert len(rows) == 4, out                     # prefill and decode, for each length


def test_bench_engine_json_default_model(capsys):
    rc = main(["bench", "engine", "--tokens", "3", "--reps", "1", "--decode-steps", "1",
               "--threads", "1", "--json"])
    res = json.loads(capsys.readouterr().out)
    assert rc == 0 and res["dtype"] == "float32" and res["threads"] == 1
    assert [r["tokens"] for r in res["prefill"]] == [3]
    assert [r["context"] for r in res["decode"]] == [3]
    assert all(r["speedup"] > 0 for r in res["prefill"] + res["decode"])


def test_bench_engine_rejects_bad_flags(capsys):
    assert main(["bench", "engine", "--tokens", "0"]) == 2
    assert main(["bench", "engine", "--dtype", "int8"]) == 2
    assert "allowed" in capsys.readouterr().err
