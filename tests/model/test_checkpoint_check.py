"""Checkpoints the config does not describe are refused before anything runs, naming the tensor
(issue 12): a misshaped tensor (which TP >= 2 would otherwise cut silently), a missing one, NaN."""
import glob
import shutil
import types

import pytest
import torch
from safetensors.torch import load_file, save_file

from pdbridge.cli import main
from pdbridge.model import build_model, load_model, read_safetensors
from pdbridge.model.checkpoint_check import check_checkpoint
from pdbridge.model.hf_names import WeightError
from pdbridge.spec import load_model_spec

Q_PROJ = "backbone.layers.1.mixer.q_proj.weight"       # nemotron_h layer 1 is attention


def _edited(tiny, tmp_path, edit) -> str:
    """A copy of the tiny nemotron_h checkpoint with `edit(tensors)` applied."""
    d = tmp_path / "edited"
    shutil.copytree(tiny["nemotron_h"][0], d)
    (path,) = glob.glob(str(d / "*.safetensors"))
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})
    return str(d)


def _extra_rows(tensors):
    assert Q_PROJ in tensors, sorted(tensors)
    t = tensors[Q_PROJ]
    tensors[Q_PROJ] = torch.cat([t, t[:3]])          # 3 rows more than 4 heads x 8 imply


def test_misshaped_tensor_is_named_at_every_tp(tiny, tmp_path):
    d = _edited(tiny, tmp_path, _extra_rows)
    spec = load_model_spec(d)
    with pytest.raises(WeightError, match=r"q_proj.*\(35, 32\).*\(32, 32\)"):
        load_model(d)
    rank1_of_2 = types.SimpleNamespace(rank=1, size=2)    # TP=2 would have cut the rows away
    with pytest.raises(WeightError, match="q_proj"):
        build_model(spec, read_safetensors(d), rank1_of_2)
    with pytest.raises(WeightError, match="q_proj"):
        check_checkpoint(d, spec)                    # from the headers, before loading


def test_missing_tensor_is_named(tiny, tmp_path):
    d = _edited(tiny, tmp_path, lambda t: t.pop(Q_PROJ))
    with pytest.raises(WeightError, match="lacks layers.1.attn.q_proj.weight"):
        check_checkpoint(d, load_model_spec(d))


def test_nan_weights_are_named(tiny, tmp_path):
    def poison(tensors):
        tensors[Q_PROJ][0, 0] = float("nan")
    d = _edited(tiny, tmp_path, poison)
    with pytest.raises(WeightError, match="q_proj.weight: 1 NaN/Inf"):
        check_checkpoint(d, load_model_spec(d))


def test_the_intact_checkpoint_passes(tiny):
    d = tiny["nemotron_h"][0]
    check_checkpoint(d, load_model_spec(d))


@pytest.mark.parametrize("edit", [_extra_rows, lambda t: t[Q_PROJ].fill_(float("inf"))])
def test_generate_refuses_in_one_line_before_starting_workers(tiny, tmp_path, capfd, edit):
    d = _edited(tiny, tmp_path, edit)
    assert main(["generate", "--model", d, "--tp", "2", "--prompt-ids", "1,2"]) == 2
    out, err = capfd.readouterr()                    # fd level: a worker's traceback shows too
    assert len(err.strip().splitlines()) == 1 and "q_proj" in err and "--model" in err, err
