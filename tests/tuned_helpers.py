"""Two helpers the generic test files share: a tuned model's outputs, and the parameters its method trains."""
import torch


def outputs(m, x):
    "The logits of `m` on batch `x`, without a graph."
    with torch.no_grad(): return m(**x).logits


def method_params(m):
    "The trainable parameters of a tuned model outside its task head: what the method itself trains."
    head = m.subspace['trainable']
    return {n: p for n, p in m.named_parameters()
            if p.requires_grad and not any(n == h or n.startswith(h + '.') for h in head)}
