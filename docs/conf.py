# Sphinx configuration of the documentation site; docs/build.py stages the sources and runs Sphinx with it.
from configparser import ConfigParser
from pathlib import Path

_root = Path(__file__).resolve().parents[1]
_cfg = ConfigParser(delimiters=['='])
_cfg.read(_root / 'settings.ini', encoding='utf-8')
_cfg = _cfg['DEFAULT']

project, author = _cfg['lib_name'], _cfg['author']
copyright, release = _cfg['copyright'], _cfg['version']
root_doc = 'index'
extensions = ['myst_nb', 'sphinx.ext.mathjax']

# notebooks are rendered with the outputs they were committed with
nb_execution_mode = 'off'
nb_render_markdown_format = 'myst'          # tables and math in Markdown outputs (taxonomy, %Params)
nb_merge_streams = True
nb_ipywidgets_js = {}                        # no widget scripts from a CDN
myst_enable_extensions = ['dollarmath', 'amsmath', 'colon_fence']
myst_heading_anchors = 3
myst_dmath_double_inline = True             # $$...$$ inside a paragraph or list item, as Jupyter shows it
suppress_warnings = ['myst.header']          # notebooks may step from # to ### on purpose

# math from the vendored npm package (docs/package.json), never a CDN
mathjax_path = 'mathjax/tex-chtml-full.js'
mathjax3_config = {'chtml': {'displayAlign': 'center'}}

html_theme = 'furo'
html_title = _cfg['lib_name']
html_static_path = ['static', str(_root / 'build' / 'docs-src' / '_static')]
html_css_files = ['custom.css']
html_favicon = 'static/favicon.svg'
html_copy_source = html_show_sourcelink = False
html_theme_options = {'navigation_with_keys': True, 'top_of_page_buttons': []}
add_function_parentheses = add_module_names = False
python_display_short_literal_types = True
pygments_style, pygments_dark_style = 'friendly', 'monokai'


def setup(app):
    # myst-nb writes output images next to the site folder by default; keep them under build/
    def outputs_in_build(app):
        app.env.mystnb_config = app.env.mystnb_config.copy(output_folder=str(_root / 'build' / 'docs-outputs'))
    app.connect('builder-inited', outputs_in_build, priority=900)
