"""Helpers shared by tests that compare whole compiled models with their modules."""
import torch


def randomize(m, gamma_bias=None, seed=0):
    """Fresh random weights of a size that exercises every op (matrices 0.3, vectors 0.5 std), with the
    Sessa gamma bias planted at `gamma_bias` when given; returns the module in eval mode."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.dim() > 1 else 0.5))
            if name.endswith("gamma_bias") and gamma_bias is not None:
                p.fill_(gamma_bias)
    return m.eval()
