"""Our AdaLoRA (nbs/21_lora_family) against HF PEFT's: same parameter values -> same outputs and the same Delta W;
same gradients -> the same importance state and the same triplets dropped; the same budget schedule.
The regulariser differs on purpose (eq. 20's squared norms averaged over layers here, PEFT a mean of unsquared norms): checked as such."""
import copy
import pytest, torch
import peft                                   # a test-only dependency (dev extra)
from peft import AdaLoraConfig, get_peft_model
from subspace_nb.inject import apply_tuning, tuners, regularizer
from subspace_nb.extension.lora_family import AdaLoRA, adalora_budget
from subspace_nb.models import tiny_model, tiny_batch

R, TARGET, ALPHA, TOTAL, TI, TF = 4, 2, 8, 40, 5, 10


def pair(seed=0):
    "Our AdaLoRA on a tiny BERT and PEFT's on an identical copy, PEFT's parameters set to ours (randomised)."
    base = tiny_model('bert', seed=seed)
    ours = apply_tuning(copy.deepcopy(base), 'adalora', r=R, target_r=TARGET, alpha=ALPHA, init_warmup=TI,
                        final_warmup=TF, seed=seed)
    cfg = AdaLoraConfig(init_r=R, target_r=TARGET, lora_alpha=ALPHA, tinit=TI, tfinal=TF, total_step=TOTAL,
                        target_modules=r'.*encoder.*\.(query|key|value|dense)$', lora_dropout=0.0, orth_reg_weight=0.1)
    theirs = get_peft_model(copy.deepcopy(base), cfg)
    g = torch.Generator().manual_seed(seed + 1)
    mods = dict(theirs.base_model.model.named_modules())
    ts = tuners(ours)
    assert len(ts) == 12 and sorted(ts) == sorted(n for n, mod in mods.items() if hasattr(mod, 'lora_E') and 'default' in mod.lora_E)
    with torch.no_grad():
        for n, t in ts.items():
            for p in (t.A, t.B, t.D): p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            mod = mods[n]
            mod.lora_A['default'].copy_(t.A); mod.lora_B['default'].copy_(t.B); mod.lora_E['default'].copy_(t.D[:, None])
    return ours, theirs, ts, mods


def test_same_outputs_and_delta():
    ours, theirs, ts, mods = pair()
    x = tiny_batch()
    ours.eval(); theirs.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(**x).logits, theirs(**x).logits, rtol=1e-5, atol=1e-6)
        for n, t in ts.items():
            torch.testing.assert_close(t.delta(), mods[n].get_delta_weight('default'), rtol=1e-5, atol=1e-7)
            h = torch.randn(5, t.n)
            torch.testing.assert_close(t(h), mods[n](h), rtol=1e-5, atol=1e-6)


def test_same_importance_and_allocation():
    ours, theirs, ts, mods = pair(seed=2)
    alloc = theirs.base_model.rankallocator
    inner = theirs.base_model.model
    y = torch.tensor([0, 1, 1])
    for step in range(3):                            # identical gradients: computed on ours, copied to theirs
        x = tiny_batch(seed=step)
        torch.nn.functional.cross_entropy(ours(**x).logits, y).backward()
        for n, t in ts.items():
            mods[n].lora_A['default'].grad = t.A.grad.clone()
            mods[n].lora_B['default'].grad = t.B.grad.clone()
            mods[n].lora_E['default'].grad = t.D.grad[:, None].clone()
        for t in ts.values(): t.track()
        alloc.update_ipt(inner)
        for t in ts.values(): t.A.grad = t.B.grad = t.D.grad = None
    for n, t in ts.items():
        for k, pk in (('A', 'lora_A'), ('B', 'lora_B')):
            name = f'{n}.{pk}.default'
            torch.testing.assert_close(t._ema[k][0], alloc.exp_avg_ipt[name])
            torch.testing.assert_close(t._ema[k][1], alloc.exp_avg_unc[name])
        torch.testing.assert_close(t._ema['D'][0], alloc.exp_avg_ipt[f'{n}.lora_E.default'].view(-1))
    budget = R * len(ts) - 17
    AdaLoRA.allocate(list(ts.values()), budget)
    pattern = alloc.mask_to_budget(inner, budget)
    for n, t in ts.items():
        assert t.rank_mask.tolist() == pattern[f'{n}.lora_E.default'], n
        torch.testing.assert_close(t.D, mods[n].lora_E['default'].view(-1))
    assert sum(int(t.rank_mask.sum()) for t in ts.values()) == budget


def test_same_budget_schedule():
    ours, theirs, ts, _ = pair()
    alloc = theirs.base_model.rankallocator
    b0, bT = R * len(ts), TARGET * len(ts)
    assert (alloc.init_bgt, alloc.target_bgt) == (b0, bT)
    assert [adalora_budget(s, TOTAL, b0, bT, TI, TF) for s in range(TOTAL)] == [alloc.budget_schedule(s)[0] for s in range(TOTAL)]


def test_regulariser_differs_as_documented():
    ours, theirs, ts, mods = pair()
    x = dict(tiny_batch(), labels=torch.tensor([0, 1, 1]))
    ours.eval(); theirs.eval()
    with torch.no_grad():
        task = ours(**x).loss
        peft_term = theirs.base_model(**x).loss - task            # AdaLoraModel.forward adds its term
        mats = [m_ for t in ts.values() for m_ in (t.A @ t.A.T, t.B.T @ t.B)]        # Q Q^T and P^T P, r x r
        dev = [(M - torch.eye(R)) for M in mats]
        torch.testing.assert_close(peft_term, 0.1 * sum(d.norm() for d in dev) / len(dev), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(regularizer(ours), 0.1 * sum(d.square().sum() for d in dev) / len(ts), rtol=1e-5, atol=1e-6)
