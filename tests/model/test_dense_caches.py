"""DenseCaches shapes agree with EngineLayout (the one source of truth); ForwardBatch checks."""
import pytest

from hf_tiny import UNUSUAL
from pdbridge.model import DenseCaches, ForwardBatch
from pdbridge.spec import CacheConfig, EngineLayout, load_model_spec


def _spec():
    cfg = dict(UNUSUAL, model_type="nemotron_h", layers_block_type=["mamba", "attention", "mlp"])
    return load_model_spec(cfg)


@pytest.mark.parametrize("tp", [1, 2, 3, 4])
def test_shapes_match_engine_layout(tp):
    spec = _spec()
    layout = EngineLayout(spec, tp, CacheConfig(num_blocks=3, block_tokens=8,
                                                kernel_block_tokens=4, kv_packed=False))
    for r in range(tp):
        c = DenseCaches(spec, r, tp, num_blocks=3, block_tokens=8, kernel_block_tokens=4)
        rl = layout.rank(r)
        conv, ssm = rl.tensor(0, "conv"), rl.tensor(0, "ssm")
        assert c.conv(0).shape == (3, conv.axis("channels").extent, conv.axis("state_len").extent)
        assert c.ssm(0).shape[1:] == (ssm.axis("heads").extent, ssm.axis("head_dim").extent,
                                      ssm.axis("d_state").extent)
        k = rl.tensor(1, "k")
        assert c.kv(1)[0].shape == (k.axis("block").extent, k.axis("heads").extent,
                                    k.axis("token").extent, k.axis("head_dim").extent)


def test_forward_batch_rejects_inconsistent_lengths():
    with pytest.raises(ValueError, match="sum\\(query_lens\\)"):
        ForwardBatch([1, 2, 3], [0, 1, 2], [2], [0], [[0]], [0])
    with pytest.raises(ValueError, match="state_slots"):
        ForwardBatch([1, 2], [0, 1], [2], [0], [[0]], [0, 1])
    b = ForwardBatch.build([[1, 2, 3], [4]], [0, 7], [[0], [1, 2]], [0, 1])
    assert b.positions.tolist() == [0, 1, 2, 7]
    assert b.block_tables.tolist() == [[0, -1], [1, 2]]
