"""Every registered method through a real `transformers.Trainer` (5 steps on a tiny BERT): the loss it optimises, the
decay groups, the protocol hooks, frozen weights, and the HF saving paths of the trained model."""
import copy, tempfile
import pytest, torch
from transformers import Trainer, TrainingArguments
from subspace_nb.core import METHODS, load_all, get_method
from subspace_nb.inject import (apply_tuning, tuners, regularizer, param_groups, from_pretrained, load_tuning, save_tuning,
                                regularize_loss, mark_driven)
from subspace_nb.models import tiny_model, tiny_batch, TinyRows
from subspace_nb.trainer import SubspaceTrainer, SubspaceCallback

load_all()
NAMES = sorted(n for n in METHODS if not n.startswith('_'))
HP = {n: getattr(get_method(n), 'test_hp', {}) for n in NAMES}


def args(d, **kw):
    kw = dict(per_device_train_batch_size=4, report_to=[], save_strategy='no', logging_strategy='no', disable_tqdm=True,
              use_cpu=True, learning_rate=1e-2, weight_decay=0.1, max_steps=5) | kw
    return TrainingArguments(d, **kw)


def spy(monkeypatch, cls, calls):
    "Record every protocol hook the Trainer runs, still running the method's own."
    for hook in ('prepare', 'step_end', 'finish'):
        orig = getattr(cls, hook)
        def wrapped(c, model, *a, _orig=orig, _hook=hook):
            calls.append((_hook,) + (() if _hook == 'prepare' else tuple(a)))
            return _orig(model, *a)
        monkeypatch.setattr(cls, hook, classmethod(wrapped))


@pytest.mark.parametrize('name', NAMES)
def test_five_trainer_steps(name, monkeypatch, tmp_path):
    m = apply_tuning(tiny_model('bert'), name, **HP[name])
    frozen = {n: p.detach().clone() for n, p in m.named_parameters() if not p.requires_grad}
    start = {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}
    calls = []
    spy(monkeypatch, get_method(name), calls)
    tr = SubspaceTrainer(model=m, args=args(str(tmp_path)), train_dataset=TinyRows())
    # the loss it optimises: the task loss plus the method's regulariser, once, while training
    b = {k: torch.stack([TinyRows()[i][k] for i in range(4)]) for k in ('input_ids', 'attention_mask', 'labels')}
    mark_driven(m).train(); torch.manual_seed(0); loss = tr.compute_loss(m, dict(b))
    regularize_loss(m, False); torch.manual_seed(0); task = m(**b).loss; regularize_loss(m, True)
    torch.testing.assert_close(loss, task + regularizer(m))
    tr.train()
    # the hooks: prepare once before, step_end after each of the 5 optimizer steps, finish once
    assert calls == [('prepare',)] + [('step_end', s, 5) for s in range(5)] + [('finish',)], calls
    # the decay groups: every no-decay parameter of param_groups is in a group without decay
    nd = {id(p) for g in param_groups(m, 0.1) if g['weight_decay'] == 0.0 for p in g['params']}
    for g in tr.optimizer.param_groups:
        if g['weight_decay'] > 0: assert not nd & {id(p) for p in g['params']}
    assert sum(len(g['params']) for g in tr.optimizer.param_groups) == len([p for p in m.parameters() if p.requires_grad])
    # frozen weights bit-identical, the method's own parameters moved
    now = dict(m.named_parameters())
    assert all(torch.equal(now[n], v) for n, v in frozen.items() if n in now)
    head = m.subspace['trainable']
    moved = [n for n, v in start.items() if not any(n.startswith(h + '.') for h in head) and n in now
             and not torch.equal(now[n], v)]
    assert moved, f"{name}: no parameter of the method changed in 5 steps"


@pytest.mark.parametrize('name,kw', [('ssb', {}), ('ia3', {}), ('diff-pruning', dict(label_smoothing_factor=0.1)),
                                     ('trilora', dict(label_smoothing_factor=0.1))])
def test_plain_trainer_with_callback_refuses(name, kw, tmp_path):
    """Where a plain Trainer would train another method (decayed scaling vectors; label smoothing, whose loss from the
    logits leaves the model's regulariser out), it says so."""
    m = apply_tuning(tiny_model('bert'), name, **({'mpc': 'o'} if name == 'trilora' else {}))
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    tr = Trainer(model=m, args=args(str(tmp_path), **kw), train_dataset=TinyRows(), callbacks=[SubspaceCallback()])
    with pytest.raises(ValueError, match='SubspaceTrainer'): tr.train()
    assert all(torch.equal(p, before[n]) for n, p in m.named_parameters())      # refused before any step


@pytest.mark.parametrize('name', ['diff-pruning', 'trilora'])
def test_plain_trainer_with_callback_regularises(name, tmp_path):
    "With the regulariser in the model's own loss, a plain Trainer with the callback trains the method as it is: no refusal."
    m = apply_tuning(tiny_model('bert'), name, **({'mpc': 'o'} if name == 'trilora' else {}))
    Trainer(model=m, args=args(str(tmp_path)), train_dataset=TinyRows(), callbacks=[SubspaceCallback()]).train()
    if name == 'diff-pruning': assert all(t.projected for t in tuners(m).values())       # finish ran


def test_plain_trainer_with_callback_runs_hooks(tmp_path):
    "Without decay and without regulariser the plain Trainer plus the callback is enough: FishMask's masks come from Fisher scores."
    m = apply_tuning(tiny_model('bert'), 'fish-mask', density=0.05)
    Trainer(model=m, args=args(str(tmp_path), weight_decay=0.0), train_dataset=TinyRows(),
            callbacks=[SubspaceCallback()]).train()
    assert all(bool(t.chosen) for t in tuners(m).values())


@pytest.mark.parametrize('name', ['lora', 'ssb', 'fish-mask', 'dora', 'prompt-tuning'])
def test_hf_saving_paths(name, tmp_path):
    "save_pretrained, Trainer.save_model and a Trainer checkpoint each reload exactly, in one call, and resume."
    m = apply_tuning(tiny_model('bert'), name, **HP[name])
    tr = SubspaceTrainer(model=m, args=args(str(tmp_path / 'run'), save_strategy='steps', save_steps=3),
                         train_dataset=TinyRows())
    tr.train()
    m.eval(); x = tiny_batch()
    with torch.no_grad(): y = m(**x).logits
    tr.save_model(str(tmp_path / 'saved'))
    m.save_pretrained(str(tmp_path / 'pretrained'))
    for d in ('saved', 'pretrained', 'run/checkpoint-5'):
        m2 = from_pretrained(str(tmp_path / d)).eval()
        with torch.no_grad(): torch.testing.assert_close(m2(**x).logits, y, rtol=0, atol=1e-6)
    # resume from the step-3 checkpoint: the same final model as the uninterrupted run
    m3 = apply_tuning(tiny_model('bert'), name, **HP[name])
    tr3 = SubspaceTrainer(model=m3, args=args(str(tmp_path / 'run'), save_strategy='no'), train_dataset=TinyRows())
    tr3.train(resume_from_checkpoint=str(tmp_path / 'run/checkpoint-3'))
    m3.eval()
    with torch.no_grad(): torch.testing.assert_close(m3(**x).logits, y, rtol=1e-4, atol=1e-5)
