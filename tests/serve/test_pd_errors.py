"""The in-process PDRouter path splits errors as the HTTP path does (issue 10): geometry that
can never meet is refused in one line naming the field; a failed transfer, the prefill
side's part included, goes to the failure policy; a dead decode worker fails the request with
an EngineError and frees its blocks. A prefill node keeps a bounded record of releases."""
import os
import signal

import pytest

from pd_harness import PROMPTS, cache, granite_moe_dir, monolithic, wait_until
from pdbridge.engine.llm_engine import EngineError
from pdbridge.engine.request import SamplingParams
from pdbridge.model import default_model
from pdbridge.serve.decode_node import DecodeNode, PullFailed, TransferRefused
from pdbridge.serve.prefill_node import PrefillNode
from pdbridge.serve.router import PDRouter

GEOMETRY = r"incompatible geometry at (model_type|hidden_size|layers|dtype)"


@pytest.fixture(scope="module")
def model_dir():
    return str(default_model.model_dir())


@pytest.fixture(scope="module")
def other_dir(tmp_path_factory):
    return granite_moe_dir(tmp_path_factory.mktemp("granite"))


def _free(node) -> int:
    return node.engine.scheduler.pool.num_free


def test_the_router_refuses_engines_that_cannot_meet(model_dir, other_dir):
    pre = PrefillNode(model_dir, 1, cache(), transport="local")
    dec = DecodeNode(other_dir, 1, cache(), transport="local")
    try:
        with pytest.raises(ValueError, match=GEOMETRY) as err:
            PDRouter(pre, [dec])
        assert "\n" not in str(err.value) and dec.engine_id in str(err.value)
    finally:
        pre.close()
        dec.close()


def test_a_pull_across_geometries_is_refused_not_recomputed(model_dir, other_dir):
    """What only the handshake shows (here: another model behind the prefill endpoint) is a
    TransferRefused naming the field; the decode blocks are freed, nothing is recomputed."""
    pre = PrefillNode(model_dir, 1, cache(), transport="local")
    dec = DecodeNode(other_dir, 1, cache(), transport="local", on_failure="recompute")
    try:
        free = _free(dec)
        params = pre.prefill(PROMPTS[0])
        handle = dec.allocate(PROMPTS[0], SamplingParams(max_tokens=2))
        assert _free(dec) < free
        with pytest.raises(TransferRefused, match=GEOMETRY) as err:
            dec.pull(handle, params)
        assert "\n" not in str(err.value)
        assert _free(dec) == free and not dec.engine.has_unfinished()
    finally:
        pre.close()
        dec.close()


@pytest.mark.parametrize("policy", ["recompute", "fail"])
def test_a_failed_prefill_side_part_goes_to_the_failure_policy(model_dir, monkeypatch, policy):
    """The prefill engine dies while it gathers for permute: the router does not crash; the
    request recomputes (right tokens) or fails with PullFailed, and its decode blocks are
    freed either way."""
    want = monolithic(model_dir, PROMPTS[:1], 6)
    pre = PrefillNode(model_dir, 1, cache(), transport="local")
    dec = DecodeNode(model_dir, 1, cache(), transport="local", strategy="permute",
                     on_failure=policy)

    def gone(*args, **kw):
        raise EngineError("TP worker rank 1 (pid 1) exited with code -9")
    monkeypatch.setattr(pre, "prepare_permute", gone)
    try:
        free = _free(dec)
        router = PDRouter(pre, [dec])
        if policy == "fail":
            with pytest.raises(PullFailed, match="before the pull: TP worker rank 1"):
                router.run(PROMPTS[:1], SamplingParams(max_tokens=6))
        else:
            (rec,) = router.run(PROMPTS[:1], SamplingParams(max_tokens=6))
            assert rec.recomputed and "before the pull" in rec.errors[0]
            assert [rec.token_ids] == want
        assert _free(dec) == free
    finally:
        pre.close()
        dec.close()


def test_a_dead_decode_worker_fails_the_request_and_frees_its_blocks(model_dir):
    pre = PrefillNode(model_dir, 1, cache(), transport="local")
    dec = DecodeNode(model_dir, 2, cache(), transport="local")
    try:
        free = _free(dec)
        params = pre.prefill(PROMPTS[0])
        handle = dec.allocate(PROMPTS[0], SamplingParams(max_tokens=2))
        worker = dec.engine._procs[0]
        os.kill(worker.pid, signal.SIGKILL)
        wait_until(lambda: worker.exitcode is not None, 30.0, "rank 1 to die")
        with pytest.raises(EngineError, match="rank 1 .*exited with code -9.*request aborted"):
            dec.pull(handle, params)
        assert _free(dec) == free
        with pytest.raises(KeyError):
            dec.engine.request(handle.request_id)
    finally:
        pre.close()
        dec.close()


def test_released_is_bounded(model_dir):
    pre = PrefillNode(model_dir, 1, cache(), transport="local", max_released=2)
    dec = DecodeNode(model_dir, 1, cache(), transport="local")
    try:
        PDRouter(pre, [dec]).run(PROMPTS[:3], SamplingParams(max_tokens=2))
        wait_until(lambda: pre.poll() is not None and pre.num_held == 0, 30.0, "releases")
        assert pre.num_released == 3 and len(pre.released) == 2
        assert len(pre.take_released()) == 2 and pre.released == []
    finally:
        pre.close()
        dec.close()
