"""The MPC option (nbs/23_mpc) on every factorised method: the key checks of the test matrix for mpc in ('o', 'd', 'n').

lora, trilora, adalora and flora x the three constraints, on a BERT (nn.Linear) and a GPT-2 (Conv1D) tiny model."""
import pytest, torch
from subspace_nb.core import get_method
from subspace_nb.inject import (apply_tuning, tuners, merge, unmerge, remove_tuning, save_tuning, load_tuning,
                                regularizer, step_end)
from subspace_nb.models import tiny_model, tiny_batch
from subspace_nb.extension.mpc import MPC, MPC_WEIGHT
from tuned_helpers import outputs, method_params

NAMES = ('lora', 'trilora', 'adalora', 'flora')
KINDS = ('o', 'd', 'n')
ARCHS = ('bert', 'gpt2')
grid = pytest.mark.parametrize('name,mpc', [(n, k) for n in NAMES for k in KINDS])


def tuned(name, mpc, arch, seed=0, **hp):
    return apply_tuning(tiny_model(arch), name, seed=seed, mpc=mpc, **hp)


def perturb_(m, scale=0.1, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in method_params(m).values(): p.add_(scale * torch.randn(p.shape, generator=g))


@grid
@pytest.mark.parametrize('arch', ARCHS)
def test_function_preserving_at_init(name, mpc, arch):
    x = tiny_batch()
    torch.testing.assert_close(outputs(tuned(name, mpc, arch), x), outputs(tiny_model(arch), x), rtol=1e-4, atol=1e-5)


@grid
@pytest.mark.parametrize('arch', ARCHS)
def test_gradients_and_regulariser(name, mpc, arch):
    m = tuned(name, mpc, arch)
    ts = tuners(m)
    reg = regularizer(m)
    if mpc in MPC:                                   # lambda * MPC(A, B) averaged over layers, paper layout
        want = sum(MPC_WEIGHT * MPC[mpc](t.A.T, t.B.T) for t in ts.values()) / len(ts)
        torch.testing.assert_close(reg, want)
        assert reg.item() > 0
    else:
        assert reg == 0
    frozen = {n: p.detach().clone() for n, p in m.named_parameters() if not p.requires_grad}
    (m(**tiny_batch()).logits.square().sum() + reg).backward()
    for n, p in m.named_parameters():
        if not p.requires_grad: assert p.grad is None, f"frozen {n} got a gradient"
    mine = method_params(m)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in mine.values())
    if mpc in MPC:                                   # the regulariser reaches both outer factors of every layer
        assert all(t.A.grad.abs().sum() > 0 and t.B.grad.abs().sum() > 0 for t in ts.values())
    torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2).step()
    for n, p in m.named_parameters():
        if n in frozen: assert torch.equal(p, frozen[n])


@grid
@pytest.mark.parametrize('arch', ARCHS)
def test_merge_or_clear_refusal(name, mpc, arch):
    m = tuned(name, mpc, arch)
    perturb_(m)
    x = tiny_batch()
    y = outputs(m, x)
    state = {n: t.detach().clone() for n, t in m.state_dict().items()}
    if mpc == 'n':
        assert all(not t.linear for t in tuners(m).values())
        for f in (lambda: merge(m), lambda: merge(m, safe=True), lambda: remove_tuning(m, merge=True)):
            with pytest.raises(TypeError, match="mpc='n' is not linear"): f()
            assert all(torch.equal(t, state[n]) for n, t in m.state_dict().items())
            assert tuners(m) and not any(t.merged for t in tuners(m).values())
        assert torch.equal(outputs(m, x), y)
        return
    merge(m)
    torch.testing.assert_close(outputs(m, x), y, rtol=1e-4, atol=1e-5)
    unmerge(m)
    for n, t in m.state_dict().items(): assert torch.equal(t, state[n]), n


@grid
@pytest.mark.parametrize('arch', ARCHS)
def test_save_load_reproduces_outputs(name, mpc, arch, tmp_path):
    m = tuned(name, mpc, arch, seed=3)
    perturb_(m)
    x = tiny_batch()
    y = outputs(m, x)
    save_tuning(m, tmp_path)
    m2 = load_tuning(tiny_model(arch), tmp_path)
    assert all(t.mpc == mpc for t in tuners(m2).values())
    assert torch.equal(outputs(m2, x), y)


@pytest.mark.parametrize('mpc', (None, 'o', 'd', 'n'))
def test_adalora_allocator_runs_with_every_mpc(mpc):
    from subspace_nb.extension.lora_family import adalora_ranks
    m = tuned('adalora', mpc, 'bert', r=4, target_r=2, init_warmup=2, final_warmup=3)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    x, y = tiny_batch(n=6, seed=2), torch.tensor([0, 1, 0, 1, 1, 0])
    for step in range(10):
        (torch.nn.functional.cross_entropy(m(**x).logits, y) + regularizer(m)).backward()
        opt.step(); step_end(m, step, 10); opt.zero_grad()
    ranks = adalora_ranks(m)
    assert sum(ranks.values()) == 2 * len(ranks)
    assert all((t.D[~t.rank_mask] == 0).all() for t in tuners(m).values())


def test_mpc_values_refused_clearly():
    m = tiny_model('bert')
    with pytest.raises(ValueError, match="mpc='x'"): apply_tuning(m, 'lora', mpc='x')
    with pytest.raises(ValueError, match='has no effect'): apply_tuning(m, 'flora', mpc='n', mpc_weight=0.3)
    with pytest.raises(ValueError, match='mpc_weight=-1'): apply_tuning(m, 'trilora', mpc='o', mpc_weight=-1)
    assert not tuners(m) and not hasattr(m, 'subspace')
    assert get_method('adalora')(torch.nn.Linear(6, 5), r=2).mpc == 'o'      # AdaLoRA's own regulariser is MPC_o


def test_mpc_weight_does_not_grow_with_depth():
    "lambda weighs the mean over layers: the same tuner repeated on more layers gives the same regulariser."
    from subspace_nb.models import tiny_config
    from transformers import BertForSequenceClassification
    regs = []
    for layers in (1, 3):
        cfg = tiny_config('bert'); cfg.num_hidden_layers = layers
        torch.manual_seed(0); m = BertForSequenceClassification(cfg)
        ts = tuners(apply_tuning(m, 'lora', mpc='o', seed=0))
        for t in ts.values():                               # every layer's factors set alike: equal per-layer terms
            with torch.no_grad(): t.A.fill_(0.3); t.B.fill_(0.2)
        regs.append(regularizer(m).item())
        assert len(ts) == 6 * layers
    assert abs(regs[0] - regs[1]) < 1e-4 * regs[0], regs


def test_composition_weighs_each_part_by_its_own_rule():
    "Diff pruning's L0 term is a sum over layers, MPC's a mean: in f,g each keeps its rule."
    from subspace_nb.combination.composition import compose
    compose('diff-pruning', 'lora')
    m = apply_tuning(tiny_model('bert'), 'diff-pruning,lora', mpc='o')
    ts = list(tuners(m).values())
    want = sum(t.f.regularizer() for t in ts) + sum(t.g.regularizer() for t in ts) / len(ts)
    torch.testing.assert_close(regularizer(m), want)
    assert sum(t.g.regularizer() for t in ts).item() > 0 and sum(t.f.regularizer() for t in ts).item() > 0
