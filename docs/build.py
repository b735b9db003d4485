"""Build the static site in _docs/ from the notebooks as committed (never executed here).

Steps: stage each notebook with nbdev's directives applied (`#| hide` cells dropped, directive lines removed,
backticked names linked to the API reference), write one API page per module of the package from `__all__`
(signatures and docstrings, like nbdev's `show_doc`), give the home page a sidebar ordered by notebook number,
copy MathJax from the npm package into the site, and run Sphinx (myst-nb renders the stored outputs).

    python docs/build.py [--nbs DIR] [--out DIR]
"""
from __future__ import annotations
import argparse, importlib, inspect, json, re, shutil, sys, time
from configparser import ConfigParser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / 'docs'
STAGE = ROOT / 'build' / 'docs-src'           # generated Sphinx sources (git-ignored via build/)
MATHJAX = DOCS / 'node_modules' / 'mathjax' / 'es5'

# the paper's order: the first digit of a notebook's number names its part
PARTS = {'0': 'Foundations', '1': 'Reconstruction', '2': 'Extension', '3': 'Combination', '4': 'Experiments',
         '5': 'Reproduction', '6': 'Benchmarks', '7': 'Catalogue'}
OTHER = 'More'


def settings() -> dict:
    cfg = ConfigParser(delimiters=['='])
    cfg.read(ROOT / 'settings.ini', encoding='utf-8')
    return dict(cfg['DEFAULT'])


def write_if_changed(path: Path, text: str):
    "Write only when the content differs."
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text(encoding='utf-8') != text: path.write_text(text, encoding='utf-8')


# ---------------------------------------------------------------- notebooks

DIRECTIVE = re.compile(r'^\s*#\|\s*([\w-]+)\s*:?\s*(.*?)\s*$')


def directives(src: str) -> tuple[dict, str]:
    "nbdev's `#| key value` lines at the top of a code cell, and the source without them."
    lines, found = src.splitlines(), {}
    while lines and (m := DIRECTIVE.match(lines[0])):
        found[m[1].lower()] = m[2]
        lines.pop(0)
    return found, '\n'.join(lines).strip('\n')


def is_false(v: str) -> bool: return v.strip().lower() in ('false', 'no', '0')


def notebook_title(nb: dict, fallback: str) -> str:
    for c in nb['cells']:
        if c['cell_type'] == 'markdown':
            m = re.search(r'^#\s+(.+)$', ''.join(c['source']), re.M)
            if m: return m[1].strip()
    return fallback


FENCE = re.compile(r'^(\s*)(```+|~~~+)')
CODE_SPAN = re.compile(r'(?<![`\[])`(\w[\w.]*)(\(\))?`(?![`\]])')


def autolink(md: str, syms: dict, pages: dict, prefix: str = '') -> str:
    "Link backticked package names to the API reference and backticked notebook names to their pages."
    def sub(m):
        name = m[1]
        if name in syms: return '{%s}`%s%s <%s>`' % (syms[name][0], name, m[2] or '', syms[name][1])
        if name in pages and not m[2]: return f'[`{name}`]({prefix}{pages[name]})'
        return m[0]
    out, fence = [], None
    for line in md.split('\n'):
        f = FENCE.match(line)
        if f and (fence is None or f[2].startswith(fence)): fence = None if fence else f[2][:3]
        elif fence is None and not line.lstrip().startswith('#'): line = CODE_SPAN.sub(sub, line)
        out.append(line)
    return '\n'.join(out)


def stage_notebook(nb: dict, syms: dict, pages: dict, prefix: str) -> dict:
    "Apply nbdev's display directives; outputs stay exactly as committed."
    cells = []
    for c in nb['cells']:
        src = ''.join(c['source'])
        tags = list(c.get('metadata', {}).get('tags', []))
        if c['cell_type'] == 'raw': continue                      # front matter and raw text are not shown
        if c['cell_type'] == 'markdown':
            c = dict(c, source=autolink(src, syms, pages, prefix))
        elif c['cell_type'] == 'code':
            d, body = directives(src)
            if 'hide' in d or 'hide' in tags or is_false(d.get('include', 'true')): continue
            if not body and not c.get('outputs'): continue        # e.g. a cell holding only `#| default_exp`
            if is_false(d.get('echo', 'true')) or 'hide_input' in d: tags.append('remove-input')
            if is_false(d.get('output', 'true')) or 'hide_output' in d: tags.append('remove-output')
            c = dict(c, source=body, metadata=dict(c.get('metadata', {}), tags=tags))
        cells.append(c)
    return dict(nb, cells=cells)


def find_notebooks(nbs: Path) -> list[Path]:
    "Every notebook nbdev would process: no `_`/`.`-prefixed file or folder, no checkpoints."
    return sorted(p for p in nbs.rglob('*.ipynb')
                  if not any(part.startswith(('_', '.')) for part in p.relative_to(nbs).parts))


def part_of(path: Path) -> str: return PARTS.get(path.name[0], OTHER) if path.name[:2].isdigit() else OTHER


# ---------------------------------------------------------------- API reference

class _Raw(str):
    "Shows as itself in a signature (string annotations without quotes, long defaults shortened)."
    def __repr__(self): return str(self)


def short(v, n: int = 60) -> str:
    r = repr(v)
    return r if len(r) <= n else f'<{type(v).__name__}>'


def signature(obj, method: bool = False) -> str:
    "The signature as written (a method without its `self`/`cls`)."
    try: sig = inspect.signature(obj)
    except (TypeError, ValueError): return '()'
    ann = lambda a: a if a is inspect.Parameter.empty else _Raw(a if isinstance(a, str) else inspect.formatannotation(a))
    ps = [p.replace(annotation=ann(p.annotation),
                    default=p.default if p.default is inspect.Parameter.empty else _Raw(short(p.default)))
          for i, p in enumerate(sig.parameters.values()) if not (method and i == 0 and p.name in ('self', 'cls'))]
    return str(sig.replace(parameters=ps, return_annotation=ann(sig.return_annotation)))


def own_doc(obj) -> str:
    return inspect.cleandoc(obj.__doc__) if isinstance(getattr(obj, '__doc__', None), str) else ''


def params_table(f) -> str:
    "nbdev-style parameter table, only when the source documents parameters with comments (docments)."
    try:
        from fastcore.docments import docments
        d = docments(f, full=True)
    except Exception: return ''
    rows = [(k, v) for k, v in d.items() if v.get('docment')]
    if not rows: return ''
    cell = lambda x: '' if x is inspect.Parameter.empty else f'`{x if isinstance(x, str) else short(x, 40)}`'
    lines = ['| | Type | Default | Details |', '|---|---|---|---|']
    lines += [f"| **{k}** | {cell(v.get('anno'))} | {cell(v.get('default', inspect.Parameter.empty))} | {v['docment']} |"
              for k, v in rows]
    return '\n'.join(lines)


def directive(kind: str, sig: str, module: str, body: str, ticks: int = 3, opts: dict | None = None) -> str:
    fence = '`' * ticks
    head = [f'{fence}{{py:{kind}}} {sig}'] + [f':{k}: {v}' for k, v in ({'module': module} | (opts or {})).items()]
    return '\n'.join(head) + '\n\n' + body.strip() + f'\n{fence}\n'


def class_members(cls, module: str, syms: dict, pages: dict) -> list[str]:
    "A class's own declarations: simple class attributes (its registry declaration) and documented methods."
    out = []
    for k, v in vars(cls).items():
        if k.startswith('_'): continue
        if isinstance(v, (str, int, float, bool, tuple, type(None))) and len(repr(v)) <= 120:
            out.append(directive('attribute', f'{cls.__name__}.{k}', module, '', opts={'value': json.dumps(repr(v))}))
        elif isinstance(v, (classmethod, staticmethod)) or inspect.isfunction(v) or isinstance(v, property):
            f = v.fget if isinstance(v, property) else getattr(v, '__func__', v)
            doc = own_doc(f)
            if not doc or getattr(f, '__module__', None) != cls.__module__: continue   # e.g. `staticmethod(torch.relu)`
            kind = 'property' if isinstance(v, property) else 'method'
            opts = {'classmethod': ''} if isinstance(v, classmethod) else {'staticmethod': ''} if isinstance(v, staticmethod) else {}
            sig = f'{cls.__name__}.{k}' + ('' if kind == 'property' else signature(f, method=not isinstance(v, staticmethod)))
            out.append(directive(kind, sig, module, autolink(doc, syms, pages, '../') + '\n\n' + params_table(f), opts=opts))
    return out


def source_notebook(mod) -> str | None:
    m = re.search(r'File to edit: (?:\.\./)+nbs/(\S+?\.ipynb)', Path(mod.__file__).read_text(encoding='utf-8'))
    return m[1] if m else None


def page_name(mod) -> str:
    "The API page of a module: its path below the package, dots as dashes (`extension-lora`)."
    return mod.__name__.partition('.')[2].replace('.', '-')


def package_modules(lib: str) -> list:
    "The package's modules that nbdev exports from a notebook, in notebook order."
    sys.path.insert(0, str(ROOT))
    names = ['.'.join(p.relative_to(ROOT).with_suffix('').parts) for p in sorted((ROOT / lib).rglob('*.py'))]
    mods = [importlib.import_module(n) for n in names if not n.rpartition('.')[2].startswith('_')]   # subpackages too
    mods = [m for m in mods if hasattr(m, '__all__') and source_notebook(m)]
    return sorted(mods, key=source_notebook)


def symbols(mods) -> dict:
    "name -> (Sphinx role, target) for every name a module exports."
    syms = {}
    for mod in mods:
        for name in mod.__all__:
            obj = getattr(mod, name)
            role = 'py:class' if inspect.isclass(obj) else 'py:func' if callable(obj) else 'py:data'
            syms.setdefault(name, (role, f'{mod.__name__}.{name}'))
    return syms


def api_page(mod, syms: dict, pages: dict) -> str:
    nb = source_notebook(mod)
    lines = [f'# {mod.__name__}', '', f'> {own_doc(mod)}' if own_doc(mod) else '', '',
             (f'Written in [`{Path(nb).stem}`](../{pages[Path(nb).stem]}); ' if Path(nb).stem in pages else '')
             + f'`from {mod.__name__} import *` gives the names below.', '',
             f'```{{py:module}} {mod.__name__}', ':no-index:', '```', '']
    for name in mod.__all__:
        obj = getattr(mod, name)
        doc = autolink(own_doc(obj), syms, pages, '../') if (inspect.isclass(obj) or inspect.isfunction(obj)) else ''
        if inspect.isclass(obj):
            bases = ', '.join(f'`{b.__name__}`' for b in obj.__bases__ if b is not object)
            lib = mod.__name__.partition('.')[0]                # the nearest __init__ the package wrote
            init = next((c.__dict__['__init__'] for c in obj.__mro__
                         if '__init__' in c.__dict__ and c.__module__.startswith(lib)), None)
            body = doc + ('\n\nBases: ' + autolink(bases, syms, pages, '../') if bases else '') + '\n\n' + (params_table(init) if init else '')
            members = class_members(obj, mod.__name__, syms, pages)
            body += '\n\n' + '\n'.join(members)
            lines.append(directive('class', name + (signature(init, method=True) if init else ''), mod.__name__, body, ticks=4))
        elif callable(obj):
            lines.append(directive('function', name + signature(obj), mod.__name__, doc + '\n\n' + params_table(obj)))
        else:
            size = f', {len(obj)} entries' if hasattr(obj, '__len__') and not isinstance(obj, str) else ''
            lines.append(directive('data', name, mod.__name__, f'`{type(obj).__name__}`{size}', opts={'value': json.dumps(short(obj, 100))}))
    return '\n'.join(lines) + '\n'


# ---------------------------------------------------------------- site

def toctree(caption: str, entries: list[str]) -> str:
    return '\n'.join(['```{toctree}', ':hidden:', f':caption: {caption}', ''] + entries + ['```', ''])


def vendor_mathjax(dest: Path):
    "MathJax from the npm package (docs/package.json), copied into the site's static files."
    if not (MATHJAX / 'tex-chtml-full.js').exists():
        sys.exit(f'{MATHJAX} is missing: run `npm ci` in docs/ (make docs does)')
    shutil.rmtree(dest, ignore_errors=True)
    # the combined TeX + CommonHTML build, its fonts, and the components its menu loads on demand
    for k in ['tex-chtml-full.js', 'a11y', 'ui', 'sre', 'adaptors', 'input', 'output/chtml.js', 'output/chtml']:
        src, dst = MATHJAX / k, dest / k
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(src, dst) if src.is_dir() else shutil.copy2(src, dst)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--nbs', type=Path, default=None, help="notebooks folder (default: settings.ini's nbs_path)")
    ap.add_argument('--out', type=Path, default=None, help="site folder (default: settings.ini's doc_path)")
    args = ap.parse_args(argv)
    cfg = settings()
    nbs = (args.nbs or ROOT / cfg['nbs_path']).resolve()
    out = (args.out or ROOT / cfg['doc_path']).resolve()
    t0 = time.time()

    paths = find_notebooks(nbs)
    if not any(p.name == 'index.ipynb' and p.parent == nbs for p in paths): sys.exit(f'no index.ipynb in {nbs}')
    docnames = {p: p.relative_to(nbs).with_suffix('').as_posix() for p in paths}
    pages = {p.stem: p.relative_to(nbs).as_posix() for p in paths}
    mods = package_modules(cfg['lib_name'])
    syms = symbols(mods)

    STAGE.mkdir(parents=True, exist_ok=True)
    wanted = {'_static'}
    nav = {}                                                   # part -> [docname]
    for p in paths:
        nb = json.loads(p.read_text(encoding='utf-8'))
        prefix = '../' * (len(p.relative_to(nbs).parts) - 1)
        staged = stage_notebook(nb, syms, pages, prefix)
        if docnames[p] != 'index': nav.setdefault(part_of(p), []).append(docnames[p])
        else: index = staged
        wanted.add(p.relative_to(nbs).parts[0])
        if docnames[p] != 'index':
            write_if_changed(STAGE / p.relative_to(nbs), json.dumps(staged, indent=1, ensure_ascii=False))

    # the home page carries the sidebar: one caption per part of the paper, then the API reference
    parts = [*PARTS.values(), OTHER]
    trees = [toctree(part, nav[part]) for part in parts if part in nav]
    trees.append(toctree('API reference', [f'api/{page_name(m)}' for m in mods]))
    index['cells'].append({'cell_type': 'markdown', 'id': 'sitenav', 'metadata': {}, 'source': '\n'.join(trees)})
    write_if_changed(STAGE / 'index.ipynb', json.dumps(index, indent=1, ensure_ascii=False))

    for m in mods:
        write_if_changed(STAGE / 'api' / f'{page_name(m)}.md', api_page(m, syms, pages))
    wanted.add('api')
    for f in list(STAGE.iterdir()):                           # notebooks removed since the last build
        if f.name not in wanted: shutil.rmtree(f) if f.is_dir() else f.unlink()
    for f in (STAGE / 'api').iterdir():
        if f.stem not in {page_name(m) for m in mods}: f.unlink()

    vendor_mathjax(STAGE / '_static' / 'mathjax')

    from sphinx.cmd.build import build_main
    rc = build_main(['-b', 'html', '-q', '-E', '-a', '-j', 'auto', '-c', str(DOCS), '-d', str(ROOT / 'build' / 'docs-doctrees'), str(STAGE), str(out)])
    if rc: sys.exit(rc)
    shutil.rmtree(out / '_sources', ignore_errors=True)       # empty: sources are not copied into the site
    print(f'site: {out}/index.html ({len(paths)} notebooks, {len(mods)} API pages) in {time.time() - t0:.1f}s')


if __name__ == '__main__': main()
