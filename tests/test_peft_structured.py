"""Our LoHa, LoKr, FourierFT, C3A, RandLoRA and VB-LoRA (nbs/72_structured) against HF PEFT's (a test-only dependency): with the same
parameter values, moved off their initial values, both give the same outputs and the same gradients on a tiny BERT."""
import copy
import pytest, torch
from peft import LoHaConfig, LoKrConfig, FourierFTConfig, RandLoraConfig, C3AConfig, VBLoRAConfig, get_peft_model
from subspace_nb.inject import apply_tuning, tuners
from subspace_nb.catalogue.structured import factorization
from subspace_nb.extension.shared import shared_factors
from subspace_nb.models import tiny_model, tiny_batch

TARGETS = ['query', 'value', 'intermediate.dense']          # 32 -> 32 and 32 -> 37 layers: two shapes
SQUARE = ['query', 'key', 'value']                          # 32 -> 32 only: block and vector lengths that divide 37 are 1
R, ALPHA = 2, 6


def lokr_names(t): return [('C', 'lokr_w1'), ('B2', 'lokr_w2_a'), ('A2', 'lokr_w2_b')] if t.low else [('C', 'lokr_w1'), ('K', 'lokr_w2')]


def randlora_copy(t, mod):
    "PEFT's frozen bases into ours: A sliced, B's columns reordered to pair B_j with Λ_j A Γ_j as the equation does."
    A, B = mod.randlora_A['default'], mod.randlora_B['default']
    N, short, long = t.lam.shape[1], min(t.n, t.m), max(t.n, t.m)
    Bf = B[:long, :N, :].float().flatten(1)                                 # column b r + k
    with torch.no_grad():
        t.factor('A').copy_(A[:, 0, :short].float())
        t.factor('B').copy_(Bf.view(long, t.r, N).transpose(1, 2).reshape(long, N * t.r))


CASES = {   # method: (our hp, PEFT config, [(our parameter, PEFT parameter)] for a tuner)
    'loha': (dict(r=R, alpha=float(ALPHA)), LoHaConfig(r=R, alpha=ALPHA, target_modules=TARGETS),
             lambda t: [('B1', 'hada_w1_a'), ('A1', 'hada_w1_b'), ('B2', 'hada_w2_a'), ('A2', 'hada_w2_b')]),
    'lokr': (dict(r=R, alpha=float(ALPHA)), LoKrConfig(r=R, alpha=ALPHA, target_modules=TARGETS), lokr_names),
    'fourierft': (dict(n_frequency=50, scale=3.0, loc_seed=777),
                  FourierFTConfig(n_frequency=50, scaling=3.0, random_loc_seed=777, target_modules=TARGETS),
                  lambda t: [('c', 'fourierft_spectrum')]),
    'randlora': (dict(r=R, alpha=float(ALPHA)), RandLoraConfig(r=R, randlora_alpha=ALPHA, target_modules=TARGETS),
                 lambda t: [('lam', 'randlora_lambda'), ('gamma', 'randlora_gamma')]),
    'c3a': (dict(block_size=8), C3AConfig(block_size=8, init_weights=True, target_modules=SQUARE),
            lambda t: [('kernel', 'c3a_kernel')]),
    'vblora': (dict(r=R, num_vectors=6, vector_length=8, topk=2),
               VBLoRAConfig(r=R, num_vectors=6, vector_length=8, topk=2, target_modules=SQUARE),
               lambda t: [('logits_A', 'vblora_logits_A'), ('logits_B', 'vblora_logits_B')]),
}
TARGETS_OF = {'c3a': SQUARE, 'vblora': SQUARE}


def pair(name, seed=0):
    hp, cfg, names = CASES[name]
    base = tiny_model('bert', seed=seed)
    ours = apply_tuning(copy.deepcopy(base), name, targets=TARGETS_OF.get(name, TARGETS), seed=seed, **hp)
    theirs = get_peft_model(copy.deepcopy(base), copy.deepcopy(cfg))
    mods = dict(theirs.base_model.model.named_modules())
    ts = tuners(ours)
    assert len(ts) == 6
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, t in ts.items():
            for a, b in names(t):
                p = getattr(t, a)
                p.add_(0.3 * torch.randn(p.shape, generator=g))             # off init
                getattr(mods[n], b)['default'].copy_(p)
            if name == 'randlora': randlora_copy(t, mods[n])
            if name == 'fourierft': assert torch.equal(t.loc, mods[n].indices['default'])   # the same frozen positions
        if name == 'vblora':                                                    # the one bank of the model
            bank = shared_factors(ours).bank_0
            bank.add_(0.3 * torch.randn(bank.shape, generator=g))
            theirs.base_model.vblora_vector_bank['default'].copy_(bank)
    return ours, theirs, ts, mods, names


@pytest.mark.parametrize('name', list(CASES))
def test_same_outputs_and_gradients(name):
    ours, theirs, ts, mods, names = pair(name)
    x, y = tiny_batch(), torch.tensor([0, 1, 1])
    ours.eval(); theirs.eval()
    lo, lt = (torch.nn.functional.cross_entropy(m(**x).logits, y) for m in (ours, theirs))
    torch.testing.assert_close(lo, lt, rtol=1e-5, atol=1e-6)
    lo.backward(); lt.backward()
    for n, t in ts.items():
        with torch.no_grad(): torch.testing.assert_close(t.delta(), mods[n].get_delta_weight('default'), rtol=1e-5, atol=1e-6)
        for a, b in names(t):
            ga, gb = getattr(t, a).grad, getattr(mods[n], b)['default'].grad
            assert ga is not None and ga.abs().sum() > 0, (n, a)
            torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-6)
    if name == 'vblora':                                                        # the bank's gradient, summed over all layers
        gb = theirs.base_model.vblora_vector_bank['default'].grad
        torch.testing.assert_close(shared_factors(ours).bank_0.grad, gb, rtol=1e-4, atol=1e-6)


def test_lokr_factorization_is_peft_s():
    from peft.tuners.lokr.layer import factorization as peft_factorization
    for d in (1, 2, 7, 12, 32, 37, 96, 127, 128, 384, 1536, 3072):
        for f in (-1, 1, 3, 4, 8, 16):
            assert factorization(d, f) == peft_factorization(d, f), (d, f)
