"""X-LoRA (a function, not a registered method) against the matrix's contract: gradients only in the classifier, the
parameter count, one expert = that expert, disable, save/load, remove, all-or-nothing, and generation with the cache."""
import json, pathlib, tempfile
import pytest, torch
from subspace_nb.catalogue.representation import (apply_xlora, remove_xlora, disable_xlora, save_xlora, load_xlora,
                                                  xlora_params)
from subspace_nb.inject import tuners
from subspace_nb.named import add_tuning, set_tuning, tuning_names, active_tuning
from subspace_nb.models import tiny_model, tiny_lm, tiny_batch


def nudge(m, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in tuners(m).values(): t.B.add_(0.3 * torch.randn(t.B.shape, generator=g))
    return m


def two_experts(model):
    nudge(add_tuning(model, 'a', 'lora', r=2, seed=0), 1)
    return nudge(add_tuning(model, 'b', 'lora', r=3, targets=['query'] if model.config.model_type == 'bert' else None, seed=1), 2)


def test_contract_on_bert():
    x = tiny_batch()
    with torch.no_grad(): y0 = tiny_model('bert')(**x).logits
    m = two_experts(tiny_model('bert'))
    with torch.no_grad(): yb = m(**x).logits
    apply_xlora(m, ['a', 'b'], depth=2, size=8, dropout=0.0)
    L = len(m.xlora.layers)
    assert L == 12
    out = m(**x).logits
    out.square().sum().backward()
    grads = {n for n, p in m.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    head = {f'{h}.{w}' for h in ('bert.pooler.dense', 'classifier') for w in ('weight', 'bias')}    # the task head trains too
    assert grads == {f'xlora.classifier.{i}.{w}' for i in (0, 2) for w in ('weight', 'bias')} | head
    in_head = sum(p.numel() for n, p in m.named_parameters() if n in head)
    assert sum(p.numel() for p in m.parameters() if p.requires_grad) == xlora_params(32, 2, L, depth=2, size=8) + in_head
    with disable_xlora(m), torch.no_grad(): torch.testing.assert_close(m(**x).logits, y0)
    with torch.no_grad(): m.classifier.weight.add_(0.5); out = m(**x).logits     # a trained head travels with the folder
    with tempfile.TemporaryDirectory() as d:
        save_xlora(m, d)
        with torch.no_grad(): torch.testing.assert_close(load_xlora(tiny_model('bert'), d)(**x).logits, out.detach())
    remove_xlora(m)
    assert (tuning_names(m), active_tuning(m)) == (['a', 'b'], None)
    with torch.no_grad(): assert torch.equal(set_tuning(m, 'b')(**x).logits, yb)


def test_one_expert_is_that_expert_and_folders_load():
    x = tiny_batch()
    m = nudge(add_tuning(tiny_model('bert'), 'a', 'lora', r=2, seed=0), 1)
    with torch.no_grad(): ya = m(**x).logits
    with tempfile.TemporaryDirectory() as d:
        from subspace_nb.inject import save_tuning
        save_tuning(m, f'{d}/a')
        x2 = apply_xlora(tiny_model('bert'), [f'{d}/a'])
        with torch.no_grad(): torch.testing.assert_close(x2(**x).logits, ya)


def test_refusals_leave_the_model_as_it_was():
    m = two_experts(tiny_model('bert'))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match='top_k=3'): apply_xlora(m, ['a', 'b'], top_k=3)
    with pytest.raises(ValueError, match="expert 'c'"): apply_xlora(m, ['a', 'c'])
    assert (tuning_names(m), active_tuning(m)) == (['a', 'b'], 'b')
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    ia3 = add_tuning(tiny_model('bert'), 'i', 'ia3')
    add_tuning(ia3, 'l', 'lora', r=2)
    with pytest.raises(TypeError, match="'ia3' tuning"): apply_xlora(ia3, ['l', 'i'])
    assert (tuning_names(ia3), active_tuning(ia3)) == (['i', 'l'], 'l')


@pytest.mark.parametrize('arch', ['gpt2', 'llama'])
def test_cached_generation_equals_uncached(arch):
    lm = two_experts(tiny_lm(arch))
    apply_xlora(lm, ['a', 'b'], scaling_pass_value=0.5)
    with torch.no_grad(): lm.xlora.classifier[0].weight.mul_(30)
    ids = torch.randint(2, 99, (2, 5), generator=torch.Generator().manual_seed(0))
    a = lm.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True)
    b = lm.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(a, b)


# PEFT's X-LoRA (peft is a test-only dependency) against ours, with the same experts and the same classifier. PEFT
# needs `use_cache=False` on the base model and adapters keyed '0', '1', ... (it loads them under their index).
EXPERTS = [(2, ['q_proj', 'v_proj']), (3, ['q_proj', 'o_proj']), (2, ['v_proj', 'down_proj'])]   # (r, targets)
SETTINGS = [  # PEFT XLoraConfig fields -> ours
    (dict(layerwise_scalings=True, xlora_depth=1, softmax_temperature=0.7, scaling_pass_value=0.3,
          global_scaling_weight=0.8),
     dict(layerwise=True, depth=1, temperature=0.7, scaling_pass_value=0.3, weight=0.8)),
    (dict(layerwise_scalings=False, xlora_depth=2, xlora_size=8, xlora_dropout_p=0.1, top_k_lora=2),
     dict(layerwise=False, depth=2, size=8, dropout=0.1, top_k=2)),
    (dict(layerwise_scalings=True, xlora_depth=3, xlora_size=6, enable_softmax=False, top_k_lora=2,
          enable_softmax_topk=True),
     dict(layerwise=True, depth=3, size=6, softmax=False, top_k=2, softmax_topk=True)),
]


@pytest.fixture(scope='module')
def peft_experts(tmp_path_factory):
    "Three LoRA experts saved by PEFT (drawn off init: B is not 0), of different ranks and layers."
    from peft import LoraConfig, get_peft_model
    d, paths = tmp_path_factory.mktemp('experts'), {}
    for i, (r, targets) in enumerate(EXPERTS):
        torch.manual_seed(10 + i)
        pm = get_peft_model(tiny_lm('llama'), LoraConfig(r=r, lora_alpha=1.5 * r + i, target_modules=targets,
                                                         init_lora_weights=False))
        pm.save_pretrained(d / str(i)); paths[str(i)] = str(d / str(i))
    return paths


@pytest.mark.parametrize('setting', range(len(SETTINGS)))
def test_equals_peft_xlora(peft_experts, setting):
    import warnings
    from peft import XLoraConfig, get_peft_model
    from safetensors.torch import load_file
    theirs, ours = SETTINGS[setting]
    base = tiny_lm('llama'); base.config.use_cache = False
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        px = get_peft_model(base, XLoraConfig(task_type='CAUSAL_LM', hidden_size=32, adapters=peft_experts, **theirs))
    px.eval()
    clf = px.base_model.internal_xlora_classifier.layers
    g = torch.Generator().manual_seed(setting)
    with torch.no_grad():
        for p in clf.parameters(): p.copy_(2 * torch.randn(p.shape, generator=g))   # off init, gates far from uniform
    m = tiny_lm('llama')
    for i, (r, targets) in enumerate(EXPERTS):      # the same experts as our named tunings: A = lora_A, B = lora_B
        w = load_file(f'{peft_experts[str(i)]}/adapter_model.safetensors')
        add_tuning(m, str(i), 'lora', r=r, alpha=1.5 * r + i, targets=targets, seed=i)
        ts = tuners(m)
        assert len(ts) == 2 * len(targets)
        with torch.no_grad():
            for n, t in ts.items():
                t.A.copy_(w[f'base_model.model.{n}.lora_A.weight']); t.B.copy_(w[f'base_model.model.{n}.lora_B.weight'])
    apply_xlora(m, [str(i) for i in range(len(EXPERTS))], **ours)
    m.eval()
    assert len(m.xlora.layers) == px.base_model.internal_xlora_classifier.n_layers
    m.xlora.classifier.load_state_dict(clf.state_dict())
    ids = torch.randint(2, 99, (2, 6), generator=torch.Generator().manual_seed(0))
    yp, y = px(input_ids=ids).logits, m(input_ids=ids).logits
    with torch.no_grad(): y0 = tiny_lm('llama')(input_ids=ids).logits
    assert (y - y0).abs().max() > 1e-2                                   # the experts act
    torch.testing.assert_close(y, yp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m.xlora.last, m.xlora.route(px.base_model.internal_xlora_scalings), rtol=1e-5, atol=1e-5)   # PEFT keeps them before top_k
    (yp * y0).sum().backward(); (y * y0).sum().backward()
    for (n, p), (k, q) in zip(clf.named_parameters(), m.xlora.classifier.named_parameters()):
        assert n == k and p.grad.abs().sum() > 0
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-4 * p.grad.abs().max().item())   # float32 sums


def test_subspace_trainer_trains_the_mixture(tmp_path):
    "SubspaceTrainer runs an X-LoRA model (no method protocol to run): its classifier moves, the experts stay."
    from transformers import TrainingArguments
    from subspace_nb.trainer import SubspaceTrainer
    m = apply_xlora(two_experts(tiny_model('bert')), ['a', 'b'], dropout=0.0)
    x = tiny_batch(n=8)
    rows = [dict(input_ids=i, attention_mask=a, labels=torch.tensor(k % 2)) for k, (i, a) in
            enumerate(zip(x['input_ids'], x['attention_mask']))]
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    args = TrainingArguments(str(tmp_path), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2,
                             report_to=[], save_strategy='no', logging_strategy='no', disable_tqdm=True)
    SubspaceTrainer(model=m, args=args, train_dataset=rows).train()
    moved = {n for n, p in m.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all(n.startswith(('xlora.classifier.', 'classifier.', 'bert.pooler.')) for n in moved), moved
    assert any(n.startswith('xlora.classifier.') for n in moved)


# ---- PEFT's X-LoRA folders both ways -------------------------------------------------------------------------------
def _peft_xlora(peft_experts, seed=0, **theirs):
    "PEFT's X-LoRA over the fixture's experts, its classifier moved off init."
    import warnings
    from peft import XLoraConfig, get_peft_model
    base = tiny_lm('llama'); base.config.use_cache = False
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        px = get_peft_model(base, XLoraConfig(task_type='CAUSAL_LM', hidden_size=32, adapters=peft_experts, **theirs))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in px.base_model.internal_xlora_classifier.parameters(): p.copy_(2 * torch.randn(p.shape, generator=g))
    return px.eval()


def _peft_load(folder, adapters):
    import warnings
    from peft import PeftModel
    base = tiny_lm('llama'); base.config.use_cache = False
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return PeftModel.from_pretrained(base, folder, adapters=adapters).eval()


IDS = torch.randint(2, 99, (2, 6), generator=torch.Generator().manual_seed(0))


def test_peft_own_save_loses_the_classifier(peft_experts, tmp_path):
    "PEFT 0.21's save_pretrained drops the classifier's first layer: its own reload computes another function, silently."
    from subspace_nb.peft_adapters import load_peft_adapter
    from subspace_nb.peft_adapters import load_xlora_peft
    px = _peft_xlora(peft_experts, xlora_depth=2, xlora_size=8)
    px.save_pretrained(tmp_path / 'x')
    back = _peft_load(tmp_path / 'x', peft_experts)
    with torch.no_grad(): assert (back(input_ids=IDS).logits - px(input_ids=IDS).logits).abs().max() > 1e-2
    m = tiny_lm('llama')
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match=r"lacks the classifier's \['0.bias', '0.weight'\]"):
        load_xlora_peft(m, tmp_path / 'x', adapters=peft_experts)
    with pytest.raises(ValueError, match="expert '0'.*does not start with 'base_model.model.'.*pass adapters"):   # PEFT's subfolders: base weights
        load_peft_adapter(m, tmp_path / 'x')
    assert not hasattr(m, 'xlora') and not tuners(m)
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


@pytest.mark.parametrize('setting', range(len(SETTINGS)))
def test_ours_loads_peft_format(peft_experts, tmp_path, setting):
    "A folder in PEFT's format (PEFT's config, its classifier whole) with PEFT's expert folders: our model computes PEFT's logits."
    from safetensors.torch import save_file
    from subspace_nb.peft_adapters import load_xlora_peft
    theirs, ours = SETTINGS[setting]
    px = _peft_xlora(peft_experts, setting, **theirs)
    px.save_pretrained(tmp_path / 'x')
    clf = px.base_model.internal_xlora_classifier.layers.state_dict()
    save_file({f'base_model.internal_xlora_classifier.layers.{k}': v.contiguous() for k, v in clf.items()},
              str(tmp_path / 'x' / 'adapter_model.safetensors'))
    assert torch.equal(_peft_load(tmp_path / 'x', peft_experts)(input_ids=IDS).logits, px(input_ids=IDS).logits)
    m = load_xlora_peft(tiny_lm('llama'), tmp_path / 'x', adapters=peft_experts).eval()
    assert {k: v for k, v in m.xlora.hp.items() if k in ours} == ours
    with torch.no_grad(): torch.testing.assert_close(m(input_ids=IDS).logits, px(input_ids=IDS).logits, rtol=1e-5, atol=1e-5)


def _ours_from(peft_experts, drop=0.0, **hp):
    "Our X-LoRA over the fixture's experts (the first with LoRA dropout `drop`), the classifier drawn off init."
    from safetensors.torch import load_file
    m = tiny_lm('llama')
    for i, (r, targets) in enumerate(EXPERTS):
        w = load_file(f'{peft_experts[str(i)]}/adapter_model.safetensors')
        add_tuning(m, str(i), 'lora', r=r, alpha=1.5 * r + i, targets=targets, dropout=drop if i == 0 else 0.0, seed=i)
        with torch.no_grad():
            for n, t in tuners(m).items():
                t.A.copy_(w[f'base_model.model.{n}.lora_A.weight']); t.B.copy_(w[f'base_model.model.{n}.lora_B.weight'])
    apply_xlora(m, [str(i) for i in range(len(EXPERTS))], **hp)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in m.xlora.classifier.parameters(): p.copy_(2 * torch.randn(p.shape, generator=g))
    return m.eval()


@pytest.mark.parametrize('setting', range(len(SETTINGS)))
def test_peft_loads_ours(peft_experts, tmp_path, setting):
    "save_peft_adapter's folder: PEFT's from_pretrained gives our logits, our load_peft_adapter the same model again."
    from subspace_nb.peft_adapters import save_peft_adapter, load_peft_adapter
    theirs, ours = SETTINGS[setting]
    m = _ours_from(peft_experts, drop=0.1, **ours)
    with torch.no_grad(): y = m(input_ids=IDS).logits
    save_peft_adapter(m, tmp_path / 'x')
    cfg = json.loads((tmp_path / 'x' / 'adapter_config.json').read_text())
    assert {k: cfg[k] for k in theirs} == theirs and cfg['peft_type'] == 'XLORA'
    assert json.loads((tmp_path / 'x' / '0' / 'adapter_config.json').read_text())['lora_dropout'] == 0.1
    n = len(EXPERTS)
    back = _peft_load(tmp_path / 'x', {str(i): str(tmp_path / 'x' / str(i)) for i in range(n)})
    torch.testing.assert_close(back(input_ids=IDS).logits, y, rtol=1e-5, atol=1e-5)
    for k, v in back.base_model.internal_xlora_classifier.layers.state_dict().items():
        assert torch.equal(v, m.xlora.classifier.state_dict()[k])
    again = load_peft_adapter(tiny_lm('llama'), tmp_path / 'x').eval()
    with torch.no_grad(): assert torch.equal(again(input_ids=IDS).logits, y)
    assert [t.drop.p for t in again.get_submodule('model.layers.0.self_attn.q_proj').tuners[:1]] == [0.1]


def json_of(folder):
    return json.loads((pathlib.Path(folder) / 'adapter_config.json').read_text())


def test_expert_dropout_as_peft(peft_experts, tmp_path):
    "In training, each expert's LoRA dropout acts as in PEFT: with the same random state, the same logits."
    import warnings, shutil
    from peft import LoraConfig, XLoraConfig, get_peft_model
    paths = {}
    for i, (r, targets) in enumerate(EXPERTS):              # the fixture's experts with lora_dropout 0.3 on the first
        cfg = json_of(peft_experts[str(i)])
        shutil.copytree(peft_experts[str(i)], tmp_path / str(i))
        if i == 0: cfg['lora_dropout'] = 0.3; (tmp_path / '0' / 'adapter_config.json').write_text(json.dumps(cfg))
        paths[str(i)] = str(tmp_path / str(i))
    px = _peft_xlora(paths, xlora_depth=1, scaling_pass_value=0.2).train()
    m = _ours_from(peft_experts, drop=0.3, depth=1, scaling_pass_value=0.2)
    m.xlora.classifier.load_state_dict(px.base_model.internal_xlora_classifier.layers.state_dict())
    m.train()
    with torch.no_grad():
        for s in range(3):
            torch.manual_seed(s); yp = px(input_ids=IDS).logits
            torch.manual_seed(s); y = m(input_ids=IDS).logits
            torch.testing.assert_close(y, yp, rtol=1e-5, atol=1e-5)
        m.eval(); ye = m(input_ids=IDS).logits
    assert (y - ye).abs().max() > 1e-3                       # the dropout acted


def test_peft_files_refusals(tmp_path):
    from subspace_nb.peft_adapters import save_peft_adapter, load_peft_adapter
    m = two_experts(tiny_model('bert'))
    apply_xlora(m, ['a', 'b'])
    with pytest.raises(ValueError, match="no task head.*'classifier'"): save_peft_adapter(m, tmp_path / 'x')
    assert not (tmp_path / 'x').exists()
    lm = two_experts(tiny_lm('gpt2'))                        # GPT-2's Conv1D layers: fan_in_fan_out
    apply_xlora(lm, ['a', 'b'], depth=2, size=4).eval()
    with torch.no_grad(): lm.xlora.classifier[0].weight.mul_(30); y = lm(input_ids=IDS).logits
    save_peft_adapter(lm, tmp_path / 'g')
    assert json_of(tmp_path / 'g' / '0')['fan_in_fan_out'] is True
    with torch.no_grad(): assert torch.equal(load_peft_adapter(tiny_lm('gpt2'), tmp_path / 'g').eval()(input_ids=IDS).logits, y)
    cfg = json_of(tmp_path / 'g')
    for change, msg in [(dict(top_k_lora=5), 'top_k=5'), (dict(hidden_size=64), 'hidden_size=64'),
                        (dict(xlora_depth=3), 'do not describe'), (dict(layerwise_scalings=True), 'does not fit'), (dict(layer_replication=[[0, 1]]), 'layer_replication')]:
        (tmp_path / 'g' / 'adapter_config.json').write_text(json.dumps(cfg | change))
        plain = tiny_lm('gpt2')
        with pytest.raises(ValueError, match=msg): load_peft_adapter(plain, tmp_path / 'g')
        assert not hasattr(plain, 'xlora') and not tuners(plain)


# ---- the Hugging Face save paths ------------------------------------------------------------------------------------
@pytest.mark.parametrize('arch', ['bert', 'llama'])
def test_save_pretrained_keeps_the_contract(tmp_path, arch):
    "save_pretrained: a plain from_pretrained gives the base and head exactly; subspace_nb.from_pretrained the X-LoRA model."
    from subspace_nb.inject import from_pretrained
    from subspace_nb.models import quiet_transformers
    make = (lambda: tiny_model('bert')) if arch == 'bert' else (lambda: tiny_lm('llama'))
    x = tiny_batch() if arch == 'bert' else dict(input_ids=IDS)
    m = two_experts(make())
    apply_xlora(m, ['a', 'b'], depth=2, size=8, top_k=1).eval()
    with torch.no_grad():
        m.xlora.classifier[0].weight.mul_(30)
        if arch == 'bert': m.classifier.weight.add_(0.5)             # a trained head, saved under its own name
        y = m(**x).logits
    plain_ref = make().eval()
    if arch == 'bert':
        with torch.no_grad(): plain_ref.classifier.weight.copy_(m.classifier.weight)
    with quiet_transformers(): m.save_pretrained(tmp_path)
    assert 'subspace_xlora' in json.loads((tmp_path / 'config.json').read_text())
    cls = type(m)
    with quiet_transformers(): plain = cls.from_pretrained(tmp_path).eval()
    with torch.no_grad(): assert torch.equal(plain(**x).logits, plain_ref(**x).logits)   # no layer re-initialised
    back = from_pretrained(tmp_path).eval()
    assert back.xlora.experts == ['a', 'b'] and back.xlora.hp['top_k'] == 1
    with torch.no_grad(): torch.testing.assert_close(back(**x).logits, y, rtol=1e-6, atol=1e-6)
    m.load_state_dict(back.state_dict())                          # a Trainer resuming: the same names back in
    remove_xlora(back)
    assert not hasattr(back.config, 'subspace_xlora')
