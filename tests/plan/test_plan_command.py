"""`pdbridge plan`, in process through pdbridge.cli.main."""
from __future__ import annotations

import json

import pytest

from pdbridge.cli import main
from pdbridge.plan import RequestBlocks, plan_transfer
from pdbridge.spec import CacheConfig, EngineLayout, get_preset


def _run_json(capsys, *argv):
    assert main(["plan", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_matches_plan_transfer(capsys):
    report = _run_json(capsys, "--model", "granite-4.0-h-small", "--prefill-tp", "4",
                       "--decode-tp", "2", "--tokens", "100", "--strategy", "permute")
    spec = get_preset("granite-4.0-h-small")
    layouts = [EngineLayout(spec, tp, CacheConfig(num_blocks=8)) for tp in (4, 2)]
    blocks = RequestBlocks(100, tuple(range(7)), 7)
    assert report["prefill_tp"] == 4 and report["decode_tp"] == 2 and report["tokens"] == 100
    assert len(report["decode_ranks"]) == 2
    for entry in report["decode_ranks"]:
        plan = plan_transfer(*layouts, entry["decode_rank"], blocks, blocks, "permute")
        assert entry["descriptors"] == plan.num_descriptors
        assert entry["nbytes"] == plan.total_nbytes
        assert entry["minimal_nbytes"] == plan.minimal_nbytes
        assert entry["sources"] == plan.source_ranks()
        want = [(g.layer, g.tensor, g.segment, g.prefill_rank, list(g.global_range), g.nbytes,
                 g.descriptors) for g in plan.groups]
        got = [(g["layer"], g["tensor"], g["segment"], g["prefill_rank"], g["global_range"],
                g["nbytes"], g["descriptors"]) for g in entry["groups"]]
        assert got == want
        assert all(g["decode_rank"] == entry["decode_rank"] for g in entry["groups"])
    by_name = {s["strategy"]: s for s in report["strategies"]}
    assert set(by_name) == {"direct", "staging", "permute"}
    assert by_name["permute"]["descriptors"] == report["totals"]["descriptors"]
    assert by_name["direct"]["ratio"] == 1.0 and by_name["staging"]["ratio"] >= 1.0


def test_text_output_groups_layers(capsys):
    assert main(["plan", "--model", "nemotron-h-8b", "--prefill-tp", "1", "--decode-tp", "2",
                 "--tokens", "64", "--strategy", "auto"]) == 0
    out = capsys.readouterr().out
    assert "decode rank 1" in out and "(24 mamba2)" in out and "(4 attention)" in out
    assert "conv.x" in out and "units [4096, 8192)" in out
    assert "staging" in out and "permute" in out


def test_list_models(capsys):
    assert main(["plan", "--list-models"]) == 0
    assert "nemotron-h-8b" in capsys.readouterr().out


@pytest.mark.parametrize("argv,needle", [
    (["--model", "no-such-model"], "no-such-model"),
    (["--model", "nemotron-h-8b", "--decode-tp", "3000"], "tp_size=3000"),
    (["--model", "nemotron-h-8b", "--strategy", "fast"], "invalid choice: 'fast'"),
    (["--model", "nemotron-h-8b", "--tokens", "0"], "--tokens"),
    (["--model", "nemotron-h-8b", "--tokens", "10000000"], "allowed: 1..1048576"),
    ([], "--model is required"),
])
def test_bad_input_is_one_line_and_usage(capsys, argv, needle):
    with pytest.raises(SystemExit) as e:
        main(["plan", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert needle in err[0] and err[1].startswith("usage: pdbridge plan")
