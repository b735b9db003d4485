"""The adapter-sized save: `save_tuning` records the base model, `from_pretrained(folder)` loads base + tuning in one
call; older folders still load with `load_tuning` and say how; a path that exists nowhere is named as such."""
import json
import pytest, torch
import transformers
from subspace_nb.inject import (apply_tuning, save_tuning, load_tuning, from_pretrained, CONFIG, FORMAT, _pathlike)
from subspace_nb.models import tiny_model, tiny_batch, quiet_transformers
import subspace_nb.extension.lora, subspace_nb.reconstruction.mode2


def trained(m, name='lora', **hp):
    apply_tuning(m, name, **hp)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad: p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return m.eval()


@pytest.fixture
def base(tmp_path):
    "A tiny GPT-2 classifier with 3 labels saved as a plain checkpoint folder: the 'hub' of these tests."
    with quiet_transformers(): tiny_model('gpt2', num_labels=3).save_pretrained(tmp_path / 'base')
    return tmp_path / 'base'


@pytest.mark.parametrize('name,hp', [('lora', dict(r=2)), ('ia3', {})])
def test_one_call_round_trip(name, hp, base, tmp_path):
    with quiet_transformers(): m = transformers.GPT2ForSequenceClassification.from_pretrained(base)
    m = trained(m, name, **hp)
    x = tiny_batch()
    y = m(**x).logits
    save_tuning(m, tmp_path / 'adapter')
    assert not (tmp_path / 'adapter' / 'config.json').exists()
    rec = json.loads((tmp_path / 'adapter' / CONFIG).read_text())
    assert rec['format'] == FORMAT == 3 and rec['base']['name_or_path'] == str(base.resolve())
    assert rec['base']['model_class'] == 'GPT2ForSequenceClassification' and 'subspace' not in rec['base']['config']
    m2 = from_pretrained(tmp_path / 'adapter')
    assert type(m2) is type(m) and m2.subspace['method'] == name
    torch.testing.assert_close(m2(**x).logits, y, rtol=0, atol=0)


def test_base_named_and_head_shape(base, tmp_path):
    "A model built from a config records no base (from_pretrained says so); base= names it; the head keeps its labels."
    m = trained(tiny_model('gpt2', num_labels=3), r=2)
    save_tuning(m, tmp_path / 'a')
    with pytest.raises(ValueError, match='records no base model'): from_pretrained(tmp_path / 'a')
    save_tuning(m, tmp_path / 'b', base=str(base))
    m2 = from_pretrained(tmp_path / 'b')
    assert m2.config.num_labels == 3
    torch.testing.assert_close(m2(**tiny_batch()).logits, m(**tiny_batch()).logits, rtol=0, atol=0)


def test_older_format_still_loads(base, tmp_path):
    "A format-2 tuning.json (no base recorded): load_tuning reads it; from_pretrained says how to load it."
    m = trained(tiny_model('gpt2', num_labels=3), r=2)
    save_tuning(m, tmp_path / 'old', base=str(base))
    cfg = json.loads((tmp_path / 'old' / CONFIG).read_text())
    del cfg['base']; cfg['format'] = 2
    (tmp_path / 'old' / CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r'format 2.*load_tuning\(model, '): from_pretrained(tmp_path / 'old')
    m2 = load_tuning(tiny_model('gpt2', num_labels=3), tmp_path / 'old')
    torch.testing.assert_close(m2.eval()(**tiny_batch()).logits, m(**tiny_batch()).logits, rtol=0, atol=0)


def test_recorded_base_folder_gone(tmp_path):
    "A recorded base folder that has gone: the error names it and says how to load the tuning anyway."
    with quiet_transformers(): tiny_model('bert').save_pretrained(tmp_path / 'base')
    with quiet_transformers(): m = trained(transformers.BertForSequenceClassification.from_pretrained(tmp_path / 'base'), r=2)
    save_tuning(m, tmp_path / 'adapter')
    for f in (tmp_path / 'base').iterdir(): f.unlink()
    (tmp_path / 'base').rmdir()
    with pytest.raises(FileNotFoundError, match=f"base model in the folder {tmp_path / 'base'}, which does not exist"):
        from_pretrained(tmp_path / 'adapter')


@pytest.mark.parametrize('path', ['/no/such/dir', './no/such', '../nowhere', 'no/such/dir', '~/no-such-model'])
def test_missing_folder_is_named(path):
    with pytest.raises(FileNotFoundError, match=f'{path}: no such folder'): from_pretrained(path)


def test_hub_names_still_go_to_the_hub():
    "A bare name or owner/name is a hub model id, not a missing folder (the hub is not reached here)."
    assert not any(_pathlike(s) for s in ('bert-base-uncased', 'sentence-transformers/all-MiniLM-L6-v2'))
    assert all(_pathlike(s) for s in ('/abs', './rel', '../up', 'a/b/c', 'dir/'))


def test_folder_without_either_file(tmp_path):
    with pytest.raises(FileNotFoundError, match='neither config.json'): from_pretrained(tmp_path)
    (tmp_path / 'f.txt').write_text('x')
    with pytest.raises(NotADirectoryError, match='is a file'): from_pretrained(tmp_path / 'f.txt')
