"""Check the built site as a reader gets it.

Without a browser, over every page of the site: each internal link and resource answers 200 from a local
`python -m http.server` (anchors included), nothing is loaded from another host (scripts, styles, fonts, images),
no Markdown table or `$...$` was left unparsed. In headless Chromium, on a few pages: the math is typeset by the
vendored MathJax (no raw `$`, `\\(` or `\\[` in the visible text), every image has loaded, no request leaves the
local server, no console error; a screenshot of each goes to the output folder.

    python tools/docs_check.py [--site _docs] [--out _docs_check] [PAGE ...]
"""
from __future__ import annotations
import argparse, re, socket, subprocess, sys, tempfile, time, urllib.error, urllib.request
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urljoin, urlsplit, unquote

ROOT = Path(__file__).resolve().parents[1]
PAGES = ['index.html', '11_mode2_singular_vectors.html', '20_lora.html', '21_lora_family.html']   # home, methods
FIGURES = {'21_lora_family.html'}   # pages whose committed outputs hold figures: at least one must show
CHROME_FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                '--disable-background-networking', '--disable-component-update', '--disable-sync',
                '--window-size=1280,900']
RAW_MATH = re.compile(r'\$\$|\$[^\s$][^$]*\$|\\\(|\\\[')
NO_TEXT = {'pre', 'code', 'script', 'style', 'textarea', 'kbd', 'samp'}   # where `$` and `\(` may be literal
VOID = {'area', 'base', 'br', 'col', 'embed', 'hr', 'img', 'input', 'link', 'meta', 'source', 'track', 'wbr'}


class Page(HTMLParser):
    "Links, loaded resources, element ids, and the prose text outside code and math of one HTML page."
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.links, self.loads, self.ids, self.text, self.stack = [], [], set(), [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if 'id' in a: self.ids.add(a['id'])
        if tag == 'a' and 'name' in a: self.ids.add(a['name'])
        if tag == 'a' and a.get('href'): self.links.append(a['href'])
        if tag in ('script', 'img', 'iframe', 'source', 'video', 'audio', 'embed') and a.get('src'): self.loads.append(a['src'])
        if tag == 'link' and a.get('href') and set((a.get('rel') or '').split()) & {'stylesheet', 'preload', 'icon', 'modulepreload', 'prefetch'}:
            self.loads.append(a['href'])
        if tag not in VOID:
            cls = (a.get('class') or '').split()
            skip = tag in NO_TEXT or 'math' in cls or 'highlight' in ' '.join(cls)
            self.stack.append((tag, skip or (self.stack[-1][1] if self.stack else False), 'cell_output' in cls))

    def handle_endtag(self, tag):
        while self.stack:
            if self.stack.pop()[0] == tag: break

    def handle_data(self, data):
        if self.stack and not self.stack[-1][1]: self.text.append((data, any(s[2] for s in self.stack)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def serve(site: Path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, '-m', 'http.server', str(port), '--bind', '127.0.0.1', '--directory', str(site)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f'http://127.0.0.1:{port}/'
    for _ in range(100):
        try: urllib.request.urlopen(base, timeout=1).close(); return proc, base
        except OSError: time.sleep(0.1)
    proc.kill()
    sys.exit(f'the local server on port {port} did not answer')


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r: return r.status, r.read()
    except urllib.error.HTTPError as e: return e.code, b''


def crawl(site: Path, base: str) -> list[str]:
    "Every internal link and resource of every page answers 200; anchors exist; nothing external is loaded."
    errors, pages, checked = [], {}, {}
    for f in sorted(site.rglob('*.html')):
        p = Page(); p.feed(f.read_text(encoding='utf-8')); pages[f.relative_to(site).as_posix()] = p
    for name, p in pages.items():
        for ref in p.loads:
            if urlsplit(ref).scheme in ('http', 'https') or ref.startswith('//'):
                errors.append(f'{name}: loads {ref} from another host')
        prose = ''.join(t for t, _ in p.text)
        for m in RAW_MATH.finditer(prose): errors.append(f'{name}: unparsed math {m[0][:60]!r}')
        for t, in_output in p.text:
            if in_output and re.match(r'\s*\|.*\|\s*$', t) and '---' in t: errors.append(f'{name}: a Markdown table left as text')
        for ref in p.links + p.loads:
            parts = urlsplit(ref)
            if parts.scheme or ref.startswith(('//', 'mailto:', 'javascript:')): continue    # other sites: not ours to check
            url = urljoin(base + name, ref)
            path = urlsplit(url).path
            if path not in checked:
                status, body = get(url.split('#')[0])
                checked[path] = status
                if path.endswith('.css') and status == 200:
                    for m in re.finditer(rb'(?:url\(\s*[\'"]?|@import\s+[\'"])(https?:)?//', body):
                        errors.append(f'{path}: css loads from another host ({body[m.start():m.start() + 80]!r})')
            if checked[path] != 200: errors.append(f'{name}: {ref} -> HTTP {checked[path]}'); continue
            target = unquote(path[len(urlsplit(base).path):]) or 'index.html'
            if parts.fragment and target in pages and unquote(parts.fragment) not in pages[target].ids:
                errors.append(f'{name}: {ref} -> no #{parts.fragment} in {target}')
    print(f'crawl: {len(pages)} pages, {len(checked)} internal URLs, {len(errors)} problems')
    return errors


BROWSER_JS = r"""
const done = arguments[arguments.length - 1];
(window.MathJax && MathJax.startup ? MathJax.startup.promise : Promise.resolve()).then(() => {
  const skip = 'pre, code, script, style, textarea, mjx-container, mjx-assistive-mml';
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  let text = '';
  for (let n = walker.nextNode(); n; n = walker.nextNode()) {
    const el = n.parentElement;
    if (el && !el.closest(skip) && el.offsetParent !== null) text += n.textContent + ' ';
  }
  const imgs = [...document.images].map(i => ({src: i.currentSrc || i.src, ok: i.complete && i.naturalWidth > 0}));
  const loaded = performance.getEntriesByType('resource').map(r => r.name);
  done({text, imgs, loaded, math: document.querySelectorAll('mjx-container').length,
        tables: document.querySelectorAll('article table').length, height: document.documentElement.scrollHeight});
}).catch(e => done({error: String(e)}));
"""


def browse(base: str, pages: list[str], out: Path) -> list[str]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    errors = []
    opts = webdriver.ChromeOptions()
    opts.binary_location = '/usr/bin/chromium'
    with tempfile.TemporaryDirectory() as profile:
        for flag in CHROME_FLAGS + [f'--user-data-dir={profile}']: opts.add_argument(flag)
        opts.set_capability('goog:loggingPrefs', {'browser': 'ALL'})
        drv = webdriver.Chrome(service=Service('/usr/bin/chromedriver'), options=opts)
        try:
            drv.set_script_timeout(60)
            for page in pages:
                drv.get(base + page)
                r = drv.execute_async_script(BROWSER_JS)
                if 'error' in r: errors.append(f'{page}: {r["error"]}'); continue
                raw = [m[0][:60] for m in RAW_MATH.finditer(r['text'])]
                errors += [f'{page}: raw math left in the page: {x!r}' for x in raw]
                errors += [f'{page}: image did not load: {i["src"][:100]}' for i in r['imgs'] if not i['ok']]
                if page in FIGURES and not r['imgs']: errors.append(f'{page}: no figure on a page whose notebook has figures')
                errors += [f'{page}: loaded from another host: {u}' for u in r['loaded'] if not u.startswith(base)]
                errors += [f'{page}: console: {e["message"][:200]}' for e in drv.get_log('browser') if e['level'] == 'SEVERE']
                drv.save_screenshot(str(out / page.replace('/', '_').replace('.html', '.png')))
                h = min(r['height'], 8000)                                  # the whole page, up to 8000 px
                drv.set_window_size(1280, h)
                drv.save_screenshot(str(out / page.replace('/', '_').replace('.html', '-full.png')))
                drv.set_window_size(1280, 900)
                print(f'browser: {page}: {r["math"]} formulas typeset, {len(r["imgs"])} images, {r["tables"]} tables, '
                      f'{len(r["loaded"])} resources loaded')
        finally: drv.quit()
    return errors


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--site', type=Path, default=ROOT / '_docs')
    ap.add_argument('--out', type=Path, default=ROOT / '_docs_check')
    ap.add_argument('pages', nargs='*', default=PAGES)
    args = ap.parse_args(argv)
    if not (args.site / 'index.html').exists(): sys.exit(f'{args.site}/index.html is missing: run make docs first')
    missing = [p for p in args.pages if not (args.site / p).exists()]
    if missing: sys.exit(f'pages to open are not in the site: {missing}')
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    server, base = serve(args.site)
    try: errors = crawl(args.site, base) + browse(base, args.pages, args.out)
    finally: server.terminate(); server.wait()
    for e in errors: print('FAIL', e)
    print(f'docs-check: {len(errors)} problems, screenshots in {args.out} ({time.time() - t0:.1f}s)')
    sys.exit(1 if errors else 0)


if __name__ == '__main__': main()
