"""`pdbridge bench` refuses bad flags in one line before measuring anything."""
import pytest

from pdbridge.cli import main


@pytest.mark.parametrize("extra,needle", [
    (["--plot", "/no/such/folder/x.png"], "folder /no/such/folder does not exist"),
    (["--tokens", "0"], "--tokens"),
    (["--reps", "0"], "--reps"),
])
def test_bench_transfer_bad_flags_are_one_line(capsys, extra, needle):
    argv = ["bench", "transfer", "--model", "nemotron-h-8b", "--prefill-tp", "1",
            "--decode-tp", "2", "--tokens", "512", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err
