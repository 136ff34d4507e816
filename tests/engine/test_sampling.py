import pytest
import torch

from pdbridge.engine.request import FinishReason, Request, SamplingParams
from pdbridge.engine.sampling import _top_p, make_generator, sample, stop_reason

torch.set_num_threads(1)


def test_greedy_is_argmax_and_needs_no_generator():
    p = SamplingParams()
    assert make_generator(p) is None
    assert sample(torch.tensor([0.1, 3.0, -2.0, 2.9]), p, None) == 1


def test_seeded_sampling_repeats_and_seeds_differ():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(1))

    def draw(seed):
        p = SamplingParams(temperature=1.0, seed=seed)
        g = make_generator(p)
        return [sample(logits, p, g) for _ in range(20)]
    assert draw(3) == draw(3)
    assert draw(3) != draw(4)


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.1, 0.5, 0.25, 0.15])
    kept = _top_p(probs.clone(), 0.7)           # 0.5 + 0.25 reaches 0.7
    assert torch.allclose(kept, torch.tensor([0.0, 0.5, 0.25, 0.0]) / 0.75)
    assert torch.count_nonzero(_top_p(probs.clone(), 0.01)) == 1    # always at least one
    p = SamplingParams(temperature=1.0, top_p=0.7, seed=0)
    g = make_generator(p)
    assert {sample(probs.log(), p, g) for _ in range(50)} <= {1, 2}


def test_top_k_samples_only_the_k_largest_logits():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.9, -1.0, 2.8])
    p = SamplingParams(temperature=5.0, top_k=2, seed=0)      # hot: without the cut all appear
    g = make_generator(p)
    assert {sample(logits, p, g) for _ in range(200)} == {1, 3}
    wide = SamplingParams(temperature=5.0, seed=0)
    g = make_generator(wide)
    assert len({sample(logits, wide, g) for _ in range(200)}) > 2


def test_stop_reasons():
    r = Request(0, (1,), SamplingParams(max_tokens=3, stop_token_ids=(9,)))
    r.output_ids = [5]
    assert stop_reason(r, (7,)) is None
    r.output_ids = [5, 7]
    assert stop_reason(r, (7,)) is FinishReason.EOS
    r.sampling = SamplingParams(max_tokens=3, ignore_eos=True)
    assert stop_reason(r, (7,)) is None
    r.output_ids = [5, 7, 9]
    assert stop_reason(r, (7,)) is FinishReason.LENGTH


@pytest.mark.parametrize("kw,field", [(dict(max_tokens=0), "max_tokens"),
                                      (dict(temperature=-1.0), "temperature"),
                                      (dict(top_p=0.0), "top_p"),
                                      (dict(top_k=-1), "top_k")])
def test_bad_params_name_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kw)
