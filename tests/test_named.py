"""Named tunings (nbs/05_named): every contract as a matrix over methods.

Each method X is tuning 'a' (seed 0) beside tuning 'b' of the next method in METHODS (seed 1), on one tiny BERT. The
references are the same base tuned with X alone (or with b's method alone), with the same seeds and the same moves."""
import copy, re, warnings
import pytest, torch
from transformers import GPT2Config, GPT2LMHeadModel
from subspace_nb import (add_tuning, set_tuning, delete_tuning, tuning_names, active_tuning, report_tuning, save_tunings,
                         load_named, load_tunings, apply_tuning, remove_tuning, report, tuners, merge, unmerge,
                         disable_tuning, save_tuning, load_tuning, tuning_state, from_pretrained, ProtocolWarning,
                         tiny_model, tiny_batch)

METHODS = ['lora', 'dora', 'ia3', 'ssb', 'ssb,lora', 'vera', 'adalora']
HP = {'lora': dict(r=2), 'dora': dict(r=2), 'ia3': {}, 'ssb': {}, 'ssb,lora': dict(r=2), 'vera': dict(r=4),
      'adalora': dict(r=3)}
X = tiny_batch()


def partner(method): return METHODS[(METHODS.index(method) + 1) % len(METHODS)]


def nudge(model, seed):
    "Move every trainable parameter by a seeded amount, in name order (the same moves on the same names)."
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in sorted(model.named_parameters()):
            if p.requires_grad: p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def alone(method, seed):
    "The base tuned with `method` only, moved as the named tuning of that seed is."
    return nudge(apply_tuning(tiny_model('bert'), method, seed=seed, **HP[method]), seed + 1)


def two(method):
    "Tiny BERT with 'a' (method, seed 0) and 'b' (its partner, seed 1), each moved; 'a' active."
    m = nudge(add_tuning(tiny_model('bert'), 'a', method, seed=0, **HP[method]), 1)
    nudge(add_tuning(m, 'b', partner(method), seed=1, **HP[partner(method)]), 2)
    return set_tuning(m, 'a')


def out(model):
    with torch.no_grad(): return model(**X).logits


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()}, {n: p.requires_grad for n, p in model.named_parameters()},
            tuning_names(model), active_tuning(model), {n: t.merged for n, t in tuners(model).items()})


def assert_same(a, b):
    assert list(a[0]) == list(b[0]) and all(torch.equal(a[0][k], b[0][k]) for k in a[0])
    assert a[1:] == b[1:]


def trainable(model): return sorted(n for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize('method', METHODS)
def test_active_tuning_is_the_tuning_alone(method):
    "Outputs, state dict and trainable parameters with A active equal those of the base tuned with A alone; same for B."
    m, refs = two(method), {'a': alone(method, 0), 'b': alone(partner(method), 1)}
    for name in 'abba':                                          # switching back and forth is exact
        set_tuning(m, name)
        ref = refs[name]
        assert torch.equal(out(m), out(ref))
        sd, rsd = m.state_dict(), ref.state_dict()
        assert list(sd) == list(rsd) and all(torch.equal(sd[k], rsd[k]) for k in sd)   # nothing of the other tuning
        assert trainable(m) == trainable(ref)                   # exactly the active tuning's parameters and head
        assert report(m) == report(ref)
    assert report_tuning(m, 'a') == report(refs['a']) and active_tuning(m) == 'a'


@pytest.mark.parametrize('method', METHODS)
def test_failed_calls_leave_the_model_bit_identical(method, tmp_path):
    m = two(method)
    merge(m)                                                     # the hardest case: the active tuning merged
    save_tuning(apply_tuning(tiny_model('llama'), 'lora', r=2), tmp_path / 'other')
    src = add_tuning(add_tuning(tiny_model('bert'), 'c', 'lora', r=2), 'd', 'ia3')
    save_tunings(src, tmp_path / 'half')
    (tmp_path / 'half' / 'd' / 'tuning.safetensors').unlink()                        # 'c' loads, then 'd' fails
    before = snapshot(m)
    calls = [(lambda: add_tuning(m, 'c', 'lora', r=10_000), 'r=10000'),              # fails after 'a' was set aside
             (lambda: add_tuning(m, 'c', 'lora', trainable=['nope']), "trainable=['nope']"),
             (lambda: add_tuning(m, 'b', 'lora'), "already has a tuning named 'b'"),
             (lambda: add_tuning(m, 'c', 'bitfit'), "'bitfit' (tuning 'c') changes the model in place"),
             (lambda: set_tuning(m, 'c'), "no tuning named 'c'"),
             (lambda: delete_tuning(m, 'a'), "'a' is the active tuning"),
             (lambda: load_named(m, tmp_path / 'other', 'c'), 'saved on another base model'),
             (lambda: load_named(m, tmp_path / 'missing', 'c'), 'does not hold a saved tuning'),
             (lambda: load_tunings(m, tmp_path), 'not a readable index'),
             (lambda: load_tunings(m, tmp_path / 'half'), 'd does not hold a saved tuning')]
    for call, text in calls:
        with pytest.raises((ValueError, TypeError, FileNotFoundError), match=re.escape(text)): call()
        assert_same(snapshot(m), before)


@pytest.mark.parametrize('method', METHODS)
def test_switching_while_merged_unmerges_first(method):
    "Nothing stale: set_tuning unmerges the active tuning (W back bit for bit) and brings the other in unmerged."
    m, ref_b = two(method), alone(partner(method), 1)
    y_a = out(m)
    merge(m)
    torch.testing.assert_close(out(m), y_a, rtol=1e-5, atol=1e-5)
    set_tuning(m, 'b')
    assert not any(t.merged for t in tuners(m).values())
    assert torch.equal(out(m), out(ref_b))                      # b computes on W, not on a's merged phi(W)
    set_tuning(m, 'a')
    assert not any(t.merged for t in tuners(m).values()) and torch.equal(out(m), y_a)


@pytest.mark.parametrize('method', METHODS)
def test_an_optimizer_built_after_set_tuning_trains_only_the_active_one(method):
    m = set_tuning(two(method), 'b')
    state_b = {k: v.clone() for k, v in tuning_state(m).items()}
    set_tuning(m, 'a').train()
    frozen = {n: p.detach().clone() for n, p in m.named_parameters() if not p.requires_grad}
    state_a = {k: v.clone() for k, v in tuning_state(m).items()}
    params = [p for p in m.parameters() if p.requires_grad]
    assert len(params) == len([p for p in alone(method, 0).parameters() if p.requires_grad])
    opt = torch.optim.SGD(params, lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', ProtocolWarning)        # AdaLoRA's allocator is not the point here
        m(**X, labels=torch.tensor([0, 1, 0])).loss.backward()
    opt.step()
    assert all(torch.equal(p, frozen[n]) for n, p in m.named_parameters() if n in frozen)
    assert any(not torch.equal(v, state_a[k]) for k, v in tuning_state(m).items())
    set_tuning(m.eval(), 'b')
    assert all(torch.equal(v, state_b[k]) for k, v in tuning_state(m).items())   # b did not move


@pytest.mark.parametrize('method', METHODS)
def test_save_and_load_round_trip(method, tmp_path):
    m = two(method)
    merge(m)
    before = snapshot(m)
    save_tunings(m, tmp_path / 'all')
    assert_same(snapshot(m), before)                            # saving moved nothing, merged state included
    unmerge(m)
    m2 = load_tunings(tiny_model('bert'), tmp_path / 'all')
    assert (tuning_names(m2), active_tuning(m2)) == (['a', 'b'], 'a')
    for name in 'ab':
        set_tuning(m, name); set_tuning(m2, name)
        s, s2 = tuning_state(m), tuning_state(m2)
        assert list(s) == list(s2) and all(torch.equal(s[k], s2[k]) for k in s)
        assert torch.equal(out(m), out(m2))
    save_tunings(m, tmp_path / 'one', names=['b'])              # one tuning, loaded under another name
    m3 = load_named(add_tuning(tiny_model('bert'), 'x', 'lora', r=2), tmp_path / 'one' / 'b', 'mine')
    assert (tuning_names(m3), active_tuning(m3)) == (['x', 'mine'], 'mine') and torch.equal(out(m3), out(m))
    plain = load_tuning(tiny_model('bert'), tmp_path / 'all' / 'a')   # a sub-folder is a plain saved tuning
    assert torch.equal(out(plain), out(set_tuning(m, 'a')))


@pytest.mark.parametrize('method', METHODS)
def test_save_pretrained_holds_the_active_tuning(method, tmp_path):
    m = set_tuning(two(method), 'b')
    m.save_pretrained(tmp_path)
    m2 = from_pretrained(tmp_path)
    assert m2.subspace['method'] == partner(method) and torch.equal(out(m2), out(m))


@pytest.mark.parametrize('method', METHODS)
def test_disable_and_delete(method):
    m, ref_a = two(method), alone(method, 0)
    with disable_tuning(m), disable_tuning(ref_a): assert torch.equal(out(m), out(ref_a))   # layers off, a's head
    assert torch.equal(out(m), out(ref_a))
    delete_tuning(m, 'b')
    assert tuning_names(m) == ['a'] and torch.equal(out(m), out(ref_a))
    delete_tuning(m, 'a')
    plain = tiny_model('bert')
    assert tuning_names(m) == [] and not hasattr(m, 'subspace') and not hasattr(m.config, 'subspace')
    assert_same(snapshot(m), snapshot(plain))                   # the base's own head, every flag as before


def test_bitfit_is_a_model_s_only_tuning(tmp_path):
    "A method that changes the model in place: named and saved as the only tuning, refused beside another."
    m = nudge(add_tuning(tiny_model('bert'), 'a', 'bitfit'), 1)
    ref = nudge(apply_tuning(tiny_model('bert'), 'bitfit'), 1)
    assert torch.equal(out(m), out(ref)) and report_tuning(m, 'a') == report(ref)
    before = snapshot(m)
    with pytest.raises(ValueError, match=r"'bitfit' \(tuning 'a'\) changes the model in place"): add_tuning(m, 'b', 'lora')
    assert_same(snapshot(m), before)
    save_tunings(m, tmp_path)
    m2 = load_tunings(tiny_model('bert'), tmp_path)
    assert torch.equal(out(m2), out(m))
    delete_tuning(m, 'a')
    assert tuning_names(m) == [] and not hasattr(m, 'subspace')
    lo = add_tuning(tiny_model('bert'), 'a', 'lora', r=2)
    before = snapshot(lo)
    for other in ('bitfit', 'full'):
        with pytest.raises(ValueError, match=f"'{other}' \\(tuning 'b'\\)"): add_tuning(lo, 'b', other)
        assert_same(snapshot(lo), before)


def test_a_model_tuned_before_it_had_names():
    "apply_tuning's tuning is 'default'; adding a second keeps it, and deleting all gives the plain model."
    m = nudge(apply_tuning(tiny_model('bert'), 'lora', r=2), 1)
    y = out(m)
    assert (tuning_names(m), active_tuning(m)) == (['default'], 'default')
    add_tuning(m, 'b', 'lora', r=2, seed=1)
    assert tuning_names(m) == ['default', 'b'] and torch.equal(out(set_tuning(m, 'default')), y)
    with pytest.raises(ValueError, match='named'): add_tuning(m, 'default', 'ia3')


def test_aside_tunings_follow_the_base_to_another_dtype():
    m = two('ssb')                                               # 'b': SSB∘LoRA
    m.to(torch.float64)                                          # 'b' is aside: .to() does not reach it
    set_tuning(m, 'b')
    assert {p.dtype for p in m.parameters()} == {torch.float64}
    assert torch.equal(out(m), out(alone(partner('ssb'), 1).to(torch.float64)))


def test_a_deep_copy_has_its_own_tunings():
    m = two('vera')
    c = copy.deepcopy(m)
    set_tuning(c, 'b'); delete_tuning(c, 'a')
    assert tuning_names(m) == ['a', 'b'] and active_tuning(m) == 'a'
    assert torch.equal(out(set_tuning(m, 'b')), out(c))


def test_remove_tuning_of_the_active_one_outside_the_names():
    "inject's remove_tuning on the active tuning: it leaves the names, the others stay and can be brought in."
    m, ref_b = two('lora'), alone(partner('lora'), 1)
    remove_tuning(m)
    assert tuning_names(m) == ['b'] and active_tuning(m) is None
    assert torch.equal(out(set_tuning(m, 'b')), out(ref_b))
    remove_tuning(m)                                            # the last one: a plain model, as remove_tuning says
    assert tuning_names(m) == [] and active_tuning(m) is None


def test_remove_tuning_with_merge_refuses_while_others_are_aside():
    "merge=True would write the active phi(W) into the W the tunings set aside also tune: refused, nothing changed."
    m = two('lora')
    before = snapshot(m)
    with pytest.raises(ValueError, match=r"set aside \(b\).*delete_tuning"): remove_tuning(m, merge=True)
    assert_same(snapshot(m), before)


def test_a_tied_head_is_refused():
    "A named tuning trains its own copy of each trainable module; a copy of a tied lm_head would untie it."
    torch.manual_seed(0)
    m = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=40, n_positions=16)).eval()
    before = snapshot(m)
    with pytest.raises(ValueError, match="'lm_head' shares parameters with transformer.wte.weight"):
        add_tuning(m, 'a', 'lora', r=2, trainable=['lm_head'])
    assert_same(snapshot(m), before)
    add_tuning(m, 'a', 'lora', r=2)                              # the default: lm_head is not trainable, nothing copied
    assert m.lm_head.weight is m.transformer.wte.weight
