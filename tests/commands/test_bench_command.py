"""`pdbridge bench transfer`: bad flags refused in one line before anything is measured;
--mode pull,push prints both."""
import json

import pytest

from pdbridge.cli import main


@pytest.mark.parametrize("argv,needle", [
    (["--plot", "/no/such/folder/x.png"], "folder /no/such/folder does not exist"),
    (["--tokens", "0"], "--tokens"),
    (["--reps", "0"], "--reps"),
    (["--mode", "pull,sideways"], "--mode"),
    (["--mode", "push", "--layer-us-per-token", "0"], "--layer-us-per-token"),
])
def test_bench_bad_input_is_one_line(capsys, argv, needle):
    base = ["bench", "transfer", "--model", "nemotron-h-8b", "--prefill-tp", "2",
            "--decode-tp", "1", "--tokens", "64"]
    assert main([*base, *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]


def test_bench_push_phase_rows(capsys):
    """One run, both modes of the push phase side by side (times are not asserted)."""
    pytest.importorskip("nixl")
    code = main(["bench", "transfer", "--model", "nemotron-h-8b", "--prefill-tp", "2",
                 "--decode-tp", "1", "--tokens", "64", "--reps", "1", "--strategy", "direct",
                 "--mode", "push", "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert code == 0
    assert [(r["mode"], r["strategy"]) for r in rows] == [
        ("pull", "limit"), ("pull", "direct"), ("push", "direct")]
    pull, push = rows[1], rows[2]
    assert push["nbytes"] == pull["nbytes"] > 0 and push["descriptors"] == pull["descriptors"]
    assert all(r["limit_ratio"] > 0 for r in rows)
