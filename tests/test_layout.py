"""The package's layout: the import graph points one way, the old module paths still import, and a notebook that
defines its classes again in a process that already imported the package leaves every other notebook working.

The ground floor (core, inject, models, trainer, named) imports no method and no study; the method subpackages
(reconstruction, extension, combination) import no study; nothing imports the command line; there is no cycle."""
import __future__, ast, json, os, re, subprocess, sys, tempfile, warnings
from pathlib import Path
import pytest, torch

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / 'subspace_nb'
GROUND = {'subspace_nb.core', 'subspace_nb.inject', 'subspace_nb.models', 'subspace_nb.trainer', 'subspace_nb.named'}
METHOD_PACKAGES = ('subspace_nb.reconstruction', 'subspace_nb.extension', 'subspace_nb.combination')


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix('').parts
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def imports(path: Path) -> set:
    "The package's modules that `path` imports anywhere in it (module level and inside functions)."
    me, out = module_name(path), set()
    pkg = me if path.name == '__init__.py' else me.rpartition('.')[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import): names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:
                up = pkg.split('.')[: len(pkg.split('.')) - node.level + 1]
                base = '.'.join(up + ([base] if base else []))
            names = [base] + [f'{base}.{a.name}' for a in node.names]
        else: continue
        out |= {n for n in names if n.split('.')[0] == 'subspace_nb'}
    return out


def graph() -> dict:
    mods = {module_name(p): p for p in PKG.rglob('*.py') if p.name != '_modidx.py'}
    return {m: {i for i in imports(p) if i in mods and i != m} for m, p in mods.items()}


def test_the_graph_has_the_modules():
    g = graph()
    assert {'subspace_nb.core', 'subspace_nb.extension.lora', 'subspace_nb.studies.sweeps', 'subspace_nb.cli'} <= set(g)
    assert 'subspace_nb.core' in g['subspace_nb.extension.lora']            # the parser sees relative imports


def test_the_ground_floor_imports_no_method_and_no_study():
    g = graph()
    bad = {m: sorted(i for i in g[m] if i not in GROUND) for m in GROUND}
    assert not any(bad.values()), bad


def test_methods_import_no_study_and_nothing_imports_the_cli():
    g = graph()
    up = ('subspace_nb.studies', 'subspace_nb.cli', 'subspace_nb.peft_adapters')
    bad = {m: sorted(i for i in deps if i.startswith(up)) for m, deps in g.items() if m.startswith(METHOD_PACKAGES)}
    assert not any(bad.values()), bad
    assert [m for m, deps in g.items() if 'subspace_nb.cli' in deps] == ['subspace_nb']   # only the public API's demo_cli


def test_no_cycle():
    g, state, path = graph(), {}, []
    def visit(m):
        state[m] = 'open'; path.append(m)
        for d in sorted(g[m]):
            if state.get(d) == 'open': raise AssertionError(' -> '.join(path[path.index(d):] + [d]))
            if d not in state: visit(d)
        state[m] = 'done'; path.pop()
    for m in sorted(g):
        if m not in state: visit(m)


def test_a_cycle_is_found():
    "The cycle check on a made-up graph: it can fail."
    g = {'a': {'b'}, 'b': {'c'}, 'c': {'a'}}
    state = {}
    def visit(m, path):
        state[m] = 'open'
        for d in g[m]:
            if state.get(d) == 'open': return path + [d]
            if d not in state and (c := visit(d, path + [d])): return c
        state[m] = 'done'
    assert visit('a', ['a']) == ['a', 'b', 'c', 'a']


@pytest.mark.parametrize('old,name,new', [('lora', 'LoRA', 'subspace_nb.extension.lora'),
                                          ('sweeps', 'sweep', 'subspace_nb.studies.sweeps')])
def test_an_old_path_warns_and_works(old, name, new):
    code = f"import subspace_nb.{old} as m; print({name!r} in m.__all__, m.{name}.__module__)"
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, HF_HUB_OFFLINE='1', OMP_NUM_THREADS='1'))
    assert r.returncode == 0, r.stderr[-2000:]
    assert f'FutureWarning: subspace_nb.{old} moved to {new}' in r.stderr
    assert r.stdout.split() == ['True', new]


# -- order: every notebook's classes defined again in one process, then everything asked for by name -------------

def export_cells(nb: Path) -> list[str]:
    cells = json.loads(nb.read_text())['cells']
    return [''.join(c['source']) for c in cells if c['cell_type'] == 'code'
            and re.match(r'\s*#\|\s*export\s*$', ''.join(c['source']).splitlines()[0] if c['source'] else '')]


def redefine(notebooks):
    "Run each notebook's exported cells in a namespace of its own, as nbdev_test's worker runs one notebook after another."
    for nb in notebooks:
        ns = {'__name__': '__main__'}
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            for src in export_cells(nb):                    # as in a module: `from __future__ import annotations` holds
                exec(compile(src, nb.name, 'exec', flags=__future__.annotations.compiler_flag), ns)


def probe():
    "What earlier order-dependent failures broke: the package's code handed a class some notebook registered again."
    from subspace_nb import apply_tuning, tuners, merge, unmerge, save_tuning, load_tuning, tiny_model, tiny_batch, report
    from subspace_nb.core import METHODS, get_method
    from subspace_nb.named import switchable
    from subspace_nb.extension.shared import shared_factors
    from subspace_nb.studies.lab import lab_count
    from subspace_nb.studies.bench_kernels import as_prototype, PROTOTYPES
    x = tiny_batch()
    for name in sorted(METHODS):
        cls = get_method(name)
        m = apply_tuning(tiny_model('bert'), name, **getattr(cls, 'test_hp', {}))
        assert all(t.name == name for t in tuners(m).values()), name
        assert report(m)['method'] == name
        if cls.linear and cls.wraps:
            y = m(**x).logits; merge(m); unmerge(m); torch.testing.assert_close(m(**x).logits, y)
        with tempfile.TemporaryDirectory() as d:
            save_tuning(m, d); load_tuning(tiny_model('bert'), d)
    assert switchable('vera') and switchable('lora') and not switchable('bitfit')
    assert shared_factors(apply_tuning(tiny_model('bert'), 'vera', r=4)).keys == ['32x32', '32x37', '37x32']   # one set of factors per layer shape
    assert lab_count('diff-pruning', torch.nn.Linear(10, 10)) < lab_count('full', torch.nn.Linear(10, 10))
    as_prototype(apply_tuning(tiny_model('bert'), 'lora', r=2), PROTOTYPES[0])


def order_check():
    "Every notebook's classes defined again after the package's, in reading order and in reverse, each pass probed."
    import subspace_nb
    from subspace_nb.core import METHODS, load_all
    load_all()
    nbs = sorted((ROOT / 'nbs').glob('[0-9]*.ipynb'))
    redefine(nbs)                                            # every notebook after the package, in reading order
    assert sum(c.__module__ == '__main__' for c in METHODS.values()) > 20   # the probe meets the notebooks' classes
    probe()
    redefine(nbs[::-1]); probe()                             # and in the reverse order
    print('order check passed')


def test_notebooks_in_any_order_leave_the_registry_working():
    "In a process of its own: the notebooks' classes must not leak into the other tests' registry."
    r = subprocess.run([sys.executable, __file__], capture_output=True, text=True, timeout=900,
                       env=dict(os.environ, HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1', OMP_NUM_THREADS='1'))
    assert r.returncode == 0 and 'order check passed' in r.stdout, (r.stdout + r.stderr)[-4000:]


if __name__ == '__main__': order_check()
