"""PSOFT against HF PEFT's PSOFT: the same principal subspace, and with the same numbers the same outputs and gradients.

PEFT's `psoft_R` is the transpose of our rotation: its skew parameters are minus ours (same upper-triangle order), its
`vector_a` is our `pre` (a) and its `vector_b` our `post` (b). Its frozen A = V_r^T and B = U_r Sigma_r / s are our
singular-vector buffers: both sides take W's thin SVD by the same call (`full_svd`), which is what lets an adapter file,
which carries no basis, mean the same function on both sides."""
import pytest, torch
from subspace_nb.inject import apply_tuning, tuners
from subspace_nb.models import tiny_model, tiny_batch
from subspace_nb.catalogue.svd_basis import PSOFT

peft = pytest.importorskip('peft')
PREFIX = 'base_model.model.'
TARGETS, R = ['query', 'value', 'intermediate.dense'], 4        # 32 -> 32 and 32 -> 37


def pair(seed=1):
    "Ours and PEFT's PSOFT on the same tiny BERT, PEFT's parameters moved off init and copied into ours."
    cfg = peft.PsoftConfig(r=R, psoft_alpha=8, target_modules=TARGETS, ab_svd_init='psoft_init', psoft_orth=True,
                           psoft_mag_a=True, psoft_mag_b=True)
    theirs = peft.get_peft_model(tiny_model('bert'), cfg).eval()
    layers = {n[len(PREFIX):]: mod for n, mod in theirs.named_modules() if hasattr(mod, 'psoft_R')}
    ours = apply_tuning(tiny_model('bert'), PSOFT, targets=TARGETS, r=R).eval()
    assert set(layers) == set(tuners(ours))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in tuners(ours).items():
            Rm = layers[name].psoft_R['default']
            for p in (Rm.weight, Rm.vector_a, Rm.vector_b): p.add_(torch.randn(p.shape, generator=g))
            t.theta.copy_(-Rm.weight); t.pre.copy_(Rm.vector_a); t.post.copy_(Rm.vector_b)
    return ours, theirs, layers


def test_same_basis():
    "Our U, S, V are PEFT's A^T, and B split into its column norms times s and unit columns: equal, not just alike."
    ours, _, layers = pair()
    for name, t in tuners(ours).items():
        L = layers[name]
        A, B, s = L._psoft_A_cache['default'], L._psoft_B_cache['default'], L.scaling['default']
        torch.testing.assert_close(t.U, A.T, rtol=0, atol=1e-6)
        torch.testing.assert_close(t.V * t.S / s, B, rtol=1e-6, atol=1e-6)


def test_same_outputs_and_gradients():
    ours, theirs, layers = pair()
    x = tiny_batch()
    y0 = tiny_model('bert').eval()(**x).logits
    yo, yt = ours(**x).logits, theirs(**x).logits
    assert (yo - y0).abs().max() > 0.01 * y0.abs().max()                   # off init: the tuning does something
    torch.testing.assert_close(yo, yt, rtol=1e-4, atol=1e-7)
    yo.square().sum().backward(); yt.square().sum().backward()
    for name, t in tuners(ours).items():
        Rm = layers[name].psoft_R['default']
        torch.testing.assert_close(t.theta.grad, -Rm.weight.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(t.pre.grad, Rm.vector_a.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(t.post.grad, Rm.vector_b.grad, rtol=1e-4, atol=1e-6)


def test_same_delta_weight():
    ours, theirs, layers = pair(seed=2)
    with torch.no_grad():
        for name, t in tuners(ours).items():
            torch.testing.assert_close(t.delta(), layers[name].get_delta_weight('default'), rtol=1e-4, atol=1e-6)
