"""`pdbridge generate`, run in-process."""
import json

import pytest
import torch

from pdbridge.cli import main

from engine_zoo import tiny_hybrid_dir

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_hybrid_dir(tmp_path_factory.mktemp("cli_model") / "nemotron")


def test_generate_prompt_ids_json_matches_the_model_reference(model_dir, capsys):
    from pdbridge.model import DenseCaches, greedy, load_model
    model = load_model(model_dir)
    want = greedy(model, DenseCaches(model.spec, num_blocks=4, block_tokens=16), [3, 17, 42, 5], 4)
    rc = main(["generate", "--model", model_dir, "--prompt-ids", "3,17,42,5", "--max-tokens",
               "4", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert out["token_ids"] == want and out["text"] is None     # no tokenizer in this dir


def test_generate_seeded_sampling_repeats(model_dir, capsys):
    argv = ["generate", "--model", model_dir, "--prompt-ids", "1,2", "--max-tokens", "6",
            "--temperature", "1.0", "--top-p", "0.9", "--seed", "5", "--json"]
    assert main(argv) == 0
    first = json.loads(capsys.readouterr().out)["token_ids"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == first


@pytest.mark.parametrize("argv,field", [
    (["--prompt-ids", "1,x"], "--prompt-ids"),
    (["--prompt-ids", "1", "--tp", "0"], "--tp"),
    (["--prompt-ids", "1", "--max-tokens", "0"], "--max-tokens"),
    (["--prompt-ids", "1", "--model", "/nonexistent"], "--model"),
    (["--prompt-ids", "1", "--top-p", "2"], "top_p"),
    (["--prompt-ids", "1000"], "vocabulary"),
    (["--prompt-ids", "1", "--num-blocks", "0"], "--num-blocks"),
    (["--prompt-ids", "1", "--tp", "64"], "TP"),          # refused before 64 workers start
    (["--prompt-ids", "1", "--tp", "7"], "TP"),
])
def test_bad_input_is_one_line_naming_the_field(model_dir, capsys, argv, field):
    if "--model" not in argv:
        argv = argv + ["--model", model_dir]
    assert main(["generate", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and field in err


def test_prompt_text_without_tokenizer_is_refused(model_dir, capsys):
    assert main(["generate", "--model", model_dir, "--prompt", "hello"]) == 2
    assert "--prompt-ids" in capsys.readouterr().err


def test_default_model_text_prompt_at_tp1_and_tp2(tmp_path, monkeypatch, capsys):
    """The embedded default model; its byte tokenizer gives text; TP=2 gives the same tokens."""
    from pdbridge.model import default_model
    monkeypatch.setenv("PDBRIDGE_CACHE", str(tmp_path))
    outs = []
    for tp in ("1", "2"):
        assert main(["generate", "--prompt", "Hello", "--max-tokens", "6", "--tp", tp,
                     "--json"]) == 0
        outs.append(json.loads(capsys.readouterr().out))
    assert outs[0]["token_ids"] == outs[1]["token_ids"] and len(outs[0]["token_ids"]) == 6
    assert outs[0]["text"] == default_model.decode(outs[0]["token_ids"])


@pytest.mark.parametrize("config,field", [('{"model_type": "gpt2", "vocab_size": 10}', "model_type"),
                                          ('{"model_type": ', "not valid JSON")])
def test_unreadable_model_is_one_line_before_any_worker(tmp_path, capsys, config, field):
    (tmp_path / "config.json").write_text(config)
    assert main(["generate", "--model", str(tmp_path), "--prompt-ids", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and field in err and "--model" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this torch has CUDA")
def test_cuda_without_cuda_is_refused(model_dir, capsys):
    assert main(["generate", "--model", model_dir, "--prompt-ids", "1", "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--device cuda" in err
