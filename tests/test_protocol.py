"""A method's protocol is never dropped silently: the regulariser is in the loss the model returns (so a plain
`transformers.Trainer` and a hand-written loop optimise it), a method with protocol hooks warns once when nothing
runs them, and the package's own training stays silent."""
import copy, io, warnings
import pytest, torch
import datasets
from transformers import Trainer, TrainingArguments, PrinterCallback
from subspace_nb.core import METHODS, load_all, get_method
from subspace_nb.inject import (apply_tuning, tuners, regularizer, regularize_loss, protocol_hooks, prepare, step_end,
                                finish, ProtocolWarning, remove_tuning)
from subspace_nb.models import tiny_model, tiny_batch, TinyRows, load_minilm
from subspace_nb.trainer import SubspaceTrainer
from subspace_nb.studies.experiments import train

load_all()
NAMES = sorted(n for n in METHODS if not n.startswith('_'))
HP = {n: getattr(get_method(n), 'test_hp', {}) for n in NAMES}
HOOKED = [n for n in NAMES if protocol_hooks(n)]
REG = {'diff-pruning': {}, 'adalora': dict(r=4), 'trilora': dict(mpc='o'), 'lora': dict(mpc='d')}


def args(d, **kw):
    kw = dict(per_device_train_batch_size=4, report_to=[], save_strategy='no', logging_strategy='no', disable_tqdm=True,
              use_cpu=True, learning_rate=1e-2, max_steps=3) | kw
    return TrainingArguments(str(d), **kw)


def batch():
    return {k: torch.stack([TinyRows()[i][k] for i in range(4)]) for k in ('input_ids', 'attention_mask', 'labels')}


def protocol_warnings(f):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        f()
    return [x for x in w if issubclass(x.category, ProtocolWarning)]


def test_hooked_methods_known():
    "The registry's methods with hooks are the three the protocol exists for (a new one shows up here)."
    assert {'adalora', 'fish-mask', 'diff-pruning'} <= set(HOOKED)


@pytest.mark.parametrize('name', sorted(REG))
def test_plain_trainer_optimises_the_regulariser(name, tmp_path):
    "A plain Trainer, no callback: the loss it optimises while training is the task loss plus the regulariser, once."
    m = apply_tuning(tiny_model('bert'), name, **REG[name]).train()
    tr = Trainer(model=m, args=args(tmp_path), train_dataset=TinyRows())
    reg = regularizer(m)
    assert torch.is_tensor(reg) and reg.item() > 0
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', ProtocolWarning)                  # the hooks are not this test's subject
        regularize_loss(m, False)
        torch.manual_seed(0); task = tr.compute_loss(m, batch())
        regularize_loss(m, True)
        torch.manual_seed(0); loss = tr.compute_loss(m, batch())
    torch.testing.assert_close(loss, task + reg)
    m.eval(); torch.manual_seed(0)
    torch.testing.assert_close(tr.compute_loss(m, batch()), m(**batch()).loss)       # evaluation: no regulariser


@pytest.mark.parametrize('name', HOOKED + ['lora', 'ia3'])
def test_plain_trainer_warns_once_without_hooks(name, tmp_path):
    "Three steps of a plain Trainer without SubspaceCallback: one ProtocolWarning naming the hooks, exactly when there are hooks."
    m = apply_tuning(tiny_model('bert'), name, **HP[name])
    tr = Trainer(model=m, args=args(tmp_path), train_dataset=TinyRows())
    w = protocol_warnings(tr.train)
    hooks = protocol_hooks(name)
    assert len(w) == (1 if hooks else 0), [str(x.message) for x in w]
    if hooks: assert all(h in str(w[0].message) for h in hooks) and 'SubspaceCallback' in str(w[0].message)


@pytest.mark.parametrize('name', HOOKED)
def test_subspace_trainer_and_train_are_silent(name, tmp_path):
    "SubspaceTrainer, and the package's own `experiments.train` on it, run the hooks: no ProtocolWarning."
    m = apply_tuning(tiny_model('bert'), name, **HP[name])
    assert not protocol_warnings(SubspaceTrainer(model=m, args=args(tmp_path), train_dataset=TinyRows()).train)
    m = apply_tuning(tiny_model('bert'), name, **HP[name])
    rows = [TinyRows()[i] for i in range(8)]
    ds = datasets.Dataset.from_dict({k: [r[k].tolist() for r in rows] for k in rows[0]})
    assert not protocol_warnings(lambda: train(m, load_minilm()[1], ds, steps=2, batch_size=4, progress=False,
                                               use_cpu=True))


def test_hand_written_loop(tmp_path):
    "A loop by hand: warned once when it skips AdaLoRA's hooks; silent, with the ranks allocated, when it runs them."
    for run_hooks in (False, True):
        m = apply_tuning(tiny_model('bert'), 'adalora', r=4, target_r=2).train()
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
        def loop():
            if run_hooks: prepare(m, [])
            for step in range(4):
                m(**batch()).loss.backward()                       # the loss carries AdaLoRA's regulariser
                opt.step()
                if run_hooks: step_end(m, step, 4)
                opt.zero_grad()
            if run_hooks: finish(m)
        w = protocol_warnings(loop)
        assert len(w) == (0 if run_hooks else 1)
        ranks = [int(t.rank_mask.sum()) for t in tuners(m).values()]
        assert (sum(ranks) == 2 * len(ranks)) if run_hooks else set(ranks) == {4}


def test_hook_travels_and_leaves(tmp_path):
    "The loss hook survives deepcopy and pickling of the whole model, and remove_tuning takes it off."
    m = apply_tuning(tiny_model('bert'), 'lora', mpc='o').train()
    regularize_loss(m, False); torch.manual_seed(0); task = m(**batch()).loss.detach(); regularize_loss(m, True)
    reg = regularizer(m).detach()
    buf = io.BytesIO(); torch.save(m, buf); buf.seek(0)
    for other in (copy.deepcopy(m), torch.load(buf, weights_only=False)):
        torch.manual_seed(0); torch.testing.assert_close(other(**batch()).loss.detach(), task + reg)
    remove_tuning(m)
    torch.manual_seed(0); torch.testing.assert_close(m(**batch()).loss.detach(), task)
    assert not m._forward_hooks and not hasattr(m, '_subspace_protocol')
