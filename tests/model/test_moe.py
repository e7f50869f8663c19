"""The MoE block's expert mixing (spec 3.8): a decode token takes its own path, with the same sums."""

import torch

from gemmarun.config import text_config_from_hf
from gemmarun.model.moe import Experts
from reference_models import config_dict


def _experts(seed: int = 0) -> Experts:
    cfg = text_config_from_hf({**config_dict("26b"), "num_experts": 8, "top_k_experts": 4})
    experts = Experts(cfg)
    g = torch.Generator().manual_seed(seed)
    for p in experts.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.3
    return experts


def test_one_token_equals_its_row_of_a_grouped_batch():
    """Two tokens with disjoint experts: each expert multiplies one row either way, so the one-token
    path must give the batch's row bit for bit (experts added from zero in ascending order)."""
    experts = _experts()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, experts.gate_up_proj.shape[-1], generator=g)
    index = torch.tensor([[6, 1, 4, 3], [0, 7, 2, 5]])
    weights = torch.tensor([[0.1, 0.5, 2.0, 0.05], [0.3, 0.3, 0.2, 0.2]])
    batch = experts(x, weights, index)
    for t in range(2):
        alone = experts(x[t : t + 1], weights[t : t + 1], index[t : t + 1])
        assert torch.equal(alone, batch[t : t + 1])
    # and it is the weighted sum it should be
    want = sum(w * experts.expert(int(e), x[:1]) for w, e in zip(weights[0], index[0]))
    torch.testing.assert_close(experts(x[:1], weights[:1], index[:1]), want, rtol=1e-5, atol=1e-6)
