"""Families beyond LLaMA / Mistral / Qwen2, each against the unsharded model (loss, every
gradient, every weight after AdamW; fp32, 1e-5 relative): tensor parallelism (also with KV heads
replicated), and the sequence and pipeline parallelism the family supports."""
import pytest

from .test_equivalence import TOL, check_equivalence
from .test_pipeline import check_pipeline


@pytest.mark.parametrize("tp,tied", [(2, False), (2, True), (4, False)])
def test_qwen3_tensor_parallel(pools, tp, tied):
    """Qwen3's per-head q / k norms stay whole; their gradients are summed over tp (at tp 4 the
    two KV heads are replicated too)."""
    assert max(pools(tp).run(check_equivalence, "qwen3", tp, tied)) <= TOL


@pytest.mark.parametrize("sp_mode,tp,sp", [("split_gather", 2, 1), ("all_to_all", 1, 2), ("ring", 1, 2)])
def test_qwen3_sequence_parallel(pools, sp_mode, tp, sp):
    worst = pools(2).run(check_equivalence, "qwen3", tp, False, 1, False, 1, True, sp_mode, 11, sp)
    assert max(worst) <= TOL


def test_qwen3_pipeline(pools):
    assert max(pools(2).run(check_pipeline, 2, "1f1b", 2, False, family="qwen3")) <= TOL
