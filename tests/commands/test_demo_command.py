"""`pdbridge demo`, the README's main job, run in-process as a user would."""
import json

import pytest

from pdbridge.cli import main


def test_demo_json_every_request_matches(capsys):
    code = main(["demo", "--json", "--requests", "3", "--max-tokens", "5", "--prefill-tp", "2",
                 "--decode-tp", "1,2", "--strategy", "auto"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    s = out["summary"]
    assert (s["requests"], s["matching"], s["recomputed"]) == (3, 3, 0)
    assert [r["decode_tp"] for r in out["requests"]] == [1, 2, 1]
    for r in out["requests"]:
        assert r["matches"] and r["token_ids"] == r["monolithic_token_ids"]
        assert len(r["token_ids"]) == 5 and len(r["prompt_token_ids"]) == r["prompt_tokens"]
        assert r["bytes"] > 0 and r["descriptors"] > 0
        assert r["ttft_ms"] == pytest.approx(r["prefill_ms"] + r["transfer_ms"] + r["first_step_ms"])


def test_demo_push_mode_matches(capsys):
    code = main(["demo", "--json", "--requests", "2", "--max-tokens", "4", "--transport", "local",
                 "--decode-tp", "1", "--transfer-mode", "push"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    s = out["summary"]
    assert (s["transfer_mode"], s["requests"], s["matching"], s["recomputed"]) == ("push", 2, 2, 0)
    assert all(r["strategy"] == "direct" and r["bytes"] > 0 for r in out["requests"])


def test_demo_checksums_matches(capsys):
    code = main(["demo", "--json", "--requests", "2", "--max-tokens", "4", "--transport", "local",
                 "--decode-tp", "1", "--strategy", "staging", "--checksums"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    s = out["summary"]
    assert (s["requests"], s["matching"], s["recomputed"]) == (2, 2, 0)


@pytest.mark.parametrize("argv,field", [
    (["--transfer-mode", "push", "--strategy", "permute"], "--transfer-mode push"),
    (["--decode-tp", "2,x"], "--decode-tp"),
    (["--prefill-tp", "0"], "--prefill-tp"),
    (["--transport", "local", "--decode-tp", "2"], "--transport local"),
    (["--prefill-tp", "7"], "tp_size=7"),
    (["--model", "/nonexistent"], "--model"),
])
def test_demo_bad_input_is_one_line(capsys, argv, field):
    assert main(["demo", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and field in err[0] and err[0].startswith("pdbridge demo:")


def test_unknown_flag_prints_usage(capsys):
    with pytest.raises(SystemExit) as e:
        main(["demo", "--bogus"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --bogus" in err and "usage:" in err
