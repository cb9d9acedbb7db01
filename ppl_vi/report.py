"""The run report: one self-contained HTML page per run directory.

``write_report(RUN_DIR)`` reads what a run directory holds and writes ``RUN_DIR/report.html``:

* the verdict of the consistency check, when ``RUN_DIR/check.json`` exists
  (``ppl-vi check MODEL --json RUN_DIR/check.json``, or ``ppl-vi report RUN_DIR --check``);
* the metrics (``metrics.json``: training summary, exact log-likelihoods, and the test NELBO /
  IWAE-k that ``ppl-vi eval`` adds) and the per-epoch history;
* every figure in ``RUN_DIR/figures/*.png`` embedded as a base64 ``data:`` URI (training curves,
  bound against k, samples, reconstructions, latent scatter, GMM density, ...);
* the check table, row by row;
* the resolved configuration and the environment (versions, device, git commit, command).

The page has no scripts and loads nothing from anywhere: it can be mailed, archived or opened
from a file system. ``ppl-vi train`` writes it at the end of training; ``ppl-vi eval`` refreshes
it; ``ppl-vi report RUN_DIR`` (re)writes it at any time.

Floor 2, beside :mod:`ppl_vi.plots`: it reads only the files of a run directory, so training,
evaluation and the command line can all (re)write it without importing one another.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import json
import math
import re
from pathlib import Path
from typing import Any, Callable, Iterable, List, Optional, Tuple

from matplotlib import mathtext

from ppl_vi import run as rundir
from ppl_vi.mathml import UnsupportedLatex, to_mathml
from ppl_vi.config import FIELDS
from ppl_vi.errors import ConfigError, PplViError
from ppl_vi.fields import applies
from ppl_vi.models.base import get_spec

REPORT, CHECK = rundir.REPORT, rundir.CHECK
MAX_FIGURE_BYTES = 64 * 2**20
PNG_SIGNATURE, PNG_END = b"\x89PNG\r\n\x1a\n", b"IEND\xaeB`\x82"  # a PNG's first 8 and last 8 bytes

#: figures in the order the report shows them, with a caption; any other PNG follows, by name.
FIGURE_CAPTIONS = {
    "training_curves": "Training and validation loss per epoch (nats per datapoint).",
    "bound_vs_k": "Test -IWAE_k against k, with the NELBO and (where exact) -log p(x) for reference.",
    "samples": "Samples from the prior (decoder pixel probabilities).",
    "reconstructions": "Test images, each row over the row of their reconstructions (pixel probabilities).",
    "latent_scatter": "Guide means of test images, coloured by label.",
    "gmm_density": "Data and the fitted mixture's log-density contours.",
    "confusion_matrix": "Classifier confusion matrix on the test set.",
    "accuracy": "Classifier accuracy per epoch (validation, test) against the supervised-only baseline "
                "(the same classifier network trained on the labelled images alone).",
}

#: metrics shown first in the metrics table (when present), in this order.
METRIC_ORDER = (
    "final_train_loss", "final_val_loss", "test_nelbo", "test_kl", "test_rec", "test_iwae",
    "test_log_likelihood", "train_log_likelihood", "true_log_likelihood", "test_accuracy",
    "baseline_test_accuracy", "accuracy_gain", "baseline_m1_test_accuracy", "final_test_accuracy",
    "epochs_done", "steps", "train_seconds", "skipped_steps", "eval_seconds", "eval_device",
)

CSS = """
:root { --fg: #1f2328; --muted: #59636e; --line: #d1d9e0; --bg-alt: #f6f8fa; --ok: #1a7f37; --bad: #cf222e; }
* { box-sizing: border-box; }
body { font: 15px/1.5 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: var(--fg);
       max-width: 1100px; margin: 0 auto; padding: 24px 32px 64px; background: #fff; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 19px; margin: 36px 0 10px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
.sub { color: var(--muted); margin: 0 0 12px; }
.badge { display: inline-block; padding: 2px 10px; border-radius: 12px; font-weight: 600; font-size: 13px;
         color: #fff; }
.badge.ok { background: var(--ok); } .badge.bad { background: var(--bad); } .badge.none { background: var(--muted); }
table { border-collapse: collapse; margin: 6px 0 12px; font-size: 13.5px; }
th, td { border: 1px solid var(--line); padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: var(--bg-alt); font-weight: 600; }
td.num { text-align: right; white-space: nowrap; font-variant-numeric: tabular-nums; font-family: ui-monospace, Menlo, Consolas, monospace; }
td.ok { color: var(--ok); font-weight: 600; } td.bad { color: var(--bad); font-weight: 600; }
tr.bad td { background: #fff0f0; }
table.inner td, table.inner th { border: none; padding: 0 12px 0 0; }
code, pre { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 12.5px; }
pre { background: var(--bg-alt); padding: 8px; overflow-x: auto; margin: 0; max-height: 16em; }
.figures { display: flex; flex-wrap: wrap; gap: 20px; }
figure { margin: 0; flex: 1 1 460px; max-width: 100%; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); display: block; }
figcaption { color: var(--muted); font-size: 13px; margin-top: 4px; }
details summary { cursor: pointer; color: var(--muted); }
.nowrap { white-space: nowrap; }
.columns { display: flex; flex-wrap: wrap; gap: 32px; }
.scaled { border-left: 4px solid #bf8700; background: #fff8c5; padding: 6px 12px; margin: 8px 0; }
.scaled ul { margin: 4px 0; }
.scroll { max-height: 28em; overflow-y: auto; display: inline-block; border-bottom: 1px solid var(--line); }
.scroll th { position: sticky; top: 0; }
img.formula { max-width: 100%; height: auto; }
div.formula { border: 1px solid var(--line); padding: 4px 12px 8px; margin: 8px 0 12px; }
div.formula h3 { font-size: 15px; margin: 6px 0; }
div.formula pre { white-space: pre-wrap; }
"""


# ----------------------------------------------------------------------------------------------
# Formatting


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt_number(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if value != 0 and (abs(value) >= 1e6 or abs(value) < 1e-3):
            return f"{value:.4e}"
        return f"{value:.5g}" if abs(value) < 1e4 else f"{value:.1f}"
    return _esc(value)


def _numeric_nest(value: Any, depth: int = 0) -> bool:
    """Numbers, or (up to 2 levels of) short lists of them."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return True
    return (isinstance(value, (list, tuple)) and depth < 2 and len(value) <= 16
            and all(_numeric_nest(v, depth + 1) for v in value))


def _compact(value: Any) -> str:
    """[[1.23456, 2], [3, 4]] -> "(1.235, 2) (3, 4)": short numeric nests, 4 significant digits."""
    if isinstance(value, (list, tuple)):
        if value and all(isinstance(v, (list, tuple)) for v in value):
            return " ".join(_compact(v) for v in value)
        return "(" + ", ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in value) + ")"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _cell(value: Any) -> str:
    """One table cell: numbers right-aligned, short lists inline, dicts as a small table, else JSON."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f'<td class="num">{_fmt_number(value)}</td>'
    if value is None:
        return '<td class="num">&mdash;</td>'
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return f"<td><code>{_esc(', '.join(value))}</code></td>"
    if _numeric_nest(value):
        return f"<td><code>{_esc(_compact(value))}</code></td>"
    if isinstance(value, dict) and value and all(_numeric_nest(v) or isinstance(v, str) for v in value.values()):
        rows = "".join(f"<tr><th>{_esc(k)}</th><td><code>{_esc(_compact(v))}</code></td></tr>" for k, v in value.items())
        return f"<td><table class='inner'>{rows}</table></td>"
    if isinstance(value, (dict, list, tuple)):
        return f"<td><pre>{_esc(json.dumps(value, indent=1, default=str))}</pre></td>"
    return f"<td>{_fmt_number(value)}</td>"


def _num(value: Any, spec: str) -> str:
    """A numeric cell in a fixed format; NaN / missing as a dash."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
        return '<td class="num">&mdash;</td>'
    return f'<td class="num">{format(value, spec)}</td>'


def _table(header: Iterable[str], rows: Iterable[str], cls: str = "") -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    klass = f' class="{cls}"' if cls else ""
    return f"<table{klass}><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _key_value_table(mapping: dict, header=("key", "value")) -> str:
    return _table(header, (f"<tr><th>{_esc(k)}</th>{_cell(v)}</tr>" for k, v in mapping.items()))


# ----------------------------------------------------------------------------------------------
# Sections


def _metrics_section(metrics: dict) -> str:
    if not metrics:
        return "<p class='sub'>No metrics.json in this run directory.</p>"
    iwae, iwae_se = metrics.get("test_iwae"), metrics.get("test_iwae_se", {})
    keys = [k for k in METRIC_ORDER if k in metrics] + sorted(k for k in metrics if k not in METRIC_ORDER)
    rows: List[str] = []
    for key in keys:
        if key.endswith("_se") or key in ("test_iwae_se", "confusion_matrix"):
            continue
        value = metrics[key]
        if key == "test_iwae" and isinstance(value, dict):
            for k in sorted(value, key=lambda s: int(s) if str(s).isdigit() else s):
                se = iwae_se.get(k)
                rows.append(f"<tr><th>-IWAE_{_esc(k)} (test)</th>{_cell(value[k])}"
                            f"{_cell(se) if se is not None else '<td></td>'}</tr>")
            continue
        se = metrics.get(key + "_se")
        if isinstance(value, (dict, list)):
            rows.append(f"<tr><th>{_esc(key)}</th>{_cell(value)}<td></td></tr>")
        else:
            rows.append(f"<tr><th>{_esc(key)}</th>{_cell(value)}{_cell(se) if se is not None else '<td></td>'}</tr>")
    note = ("<p class='sub'>Losses and bounds are in nats per datapoint, lower is better "
            "(-IWAE_k is the negative bound). &plusmn; is the standard error over test datapoints.")
    if iwae is None:
        note += " Run <code>ppl-vi eval RUN_DIR</code> for test NELBO and IWAE-k (the report is refreshed)."
    return _table(("metric", "value", "± SE"), rows) + note + "</p>"


def _history_section(history: List[dict]) -> str:
    """Every epoch record (the table scrolls when it is long)."""
    if not history:
        return ""
    columns = [c for c in ("epoch", "step", "train_loss", "val_loss", "beta", "seconds") if any(c in h for h in history)]
    columns += sorted({k for h in history for k in h} - set(columns))
    rows = ("<tr>" + "".join(_cell(h.get(c)) for c in columns) + "</tr>" for h in history)
    return (f"<h2>History ({len(history)} epoch{'s' if len(history) != 1 else ''})</h2>"
            f"<div class='scroll'>{_table(columns, rows)}</div>")


def _figure_files(run_dir: Path) -> Tuple[List[Tuple[Path, bytes]], List[str]]:
    """The PNGs to embed, read without following links, and why any other *.png was left out.

    A symbolic link is never read (it could point at any file: the page is meant for sharing), and
    an empty or truncated image (not a PNG) is left out rather than shown broken.
    """
    folder = run_dir / rundir.FIGURES
    if folder.is_symlink():
        return [], [f"{rundir.FIGURES}/ (a symbolic link, not followed)"]
    found, skipped = [], []
    for path in sorted(folder.glob("*.png")) if folder.is_dir() else []:
        if path.is_symlink():
            skipped.append(f"{path.name} (a symbolic link, not followed)")
            continue
        try:
            data = rundir.read_file(path, MAX_FIGURE_BYTES)
        except PplViError as exc:
            skipped.append(f"{path.name} ({exc})")
            continue
        if not (data.startswith(PNG_SIGNATURE) and data.endswith(PNG_END)):
            skipped.append(f"{path.name} ({'empty' if not data else 'not a complete PNG image'})")
            continue
        found.append((path, data))
    return found, skipped


def _figures_section(run_dir: Path) -> str:
    pngs, skipped = _figure_files(run_dir)
    note = (f"<p class='sub'>Not embedded: {_esc('; '.join(skipped))}.</p>" if skipped else "")
    if not pngs:
        return "<h2>Figures</h2><p class='sub'>No figures in this run directory.</p>" + note
    order = {name: i for i, name in enumerate(FIGURE_CAPTIONS)}
    pngs.sort(key=lambda item: (order.get(item[0].stem, len(order)), item[0].stem))
    items = []
    for path, raw in pngs:
        data = base64.b64encode(raw).decode("ascii")
        caption = FIGURE_CAPTIONS.get(path.stem, "")
        title = path.stem.replace("_", " ")
        items.append(f'<figure id="fig-{_esc(path.stem)}"><img alt="{_esc(title)}" src="data:image/png;base64,{data}">'
                     f"<figcaption><b>{_esc(title)}</b>{' — ' + _esc(caption) if caption else ''}</figcaption></figure>")
    return "<h2>Figures</h2><div class='figures'>" + "".join(items) + "</div>" + note


def _check_section(check: Optional[dict], typeset: Optional[Callable[[str], Optional[str]]] = None) -> str:
    if check is None:
        return ("<h2>Consistency check</h2><p class='sub'>Not run for this directory: "
                "<code>ppl-vi check MODEL --json RUN_DIR/check.json</code> then <code>ppl-vi report RUN_DIR</code>, "
                "or <code>ppl-vi report RUN_DIR --check</code>.</p>")
    rows = []
    for r in check.get("rows", []):
        ok, skipped = bool(r.get("passed")), r.get("not_run")  # a row the checker could not run: neither
        note = f"not run: {skipped}" if skipped else "; ".join(s for s in (r.get("tolerance", ""), r.get("note", "")) if s)
        rows.append(f"<tr class='{'' if ok or skipped else 'bad'}'><td class='nowrap'>{_esc(r.get('kind', ''))}</td>"
                    f"<td>{_esc(r.get('name', ''))}</td>{_num(r.get('reference'), '.8g')}{_num(r.get('value'), '.8g')}"
                    f"{_num(r.get('abs_diff'), '.2e')}"
                    f"{_num(r.get('rel_diff') if str(r.get('tolerance', '')).startswith('rel') else None, '.2e')}"
                    f"<td class='{'ok' if ok or skipped else 'bad'}'>{'n/a' if skipped else 'ok' if ok else 'FAIL'}"
                    f"</td><td>{_esc(note)}</td></tr>")
    ran = [r for r in check.get("rows", []) if not r.get("not_run")]
    failed = sum(1 for r in ran if not r.get("passed"))
    verdict = ("passed" if check.get("passed") else f"failed ({failed} of {len(ran)} checks)") + (
        f"; {len(ran)} of {len(rows)} rows ran" if len(ran) < len(rows) else "")
    diagnoses = "".join(f"<li>{_esc(v)}</li>" for v in check.get("verdicts", []) if isinstance(v, str))
    return (f"<h2>Consistency check: {_esc(verdict)}</h2><p class='sub'>Hand-derived bounds against Pyro's losses "
            "(same sample: value and every gradient; statistical: means over seeds) and against the exact answer "
            "where there is one. Values per datapoint (the mean over the batch) unless a row says otherwise.</p>"
            + (f"<div class='scaled'><b>Diagnosis</b><ul>{diagnoses}</ul></div>" if diagnoses else "")
            + _formula_section(check.get("formula"), typeset or formula_image)
            + _table(("kind", "check", "reference", "value", "abs diff", "rel diff (equalities)", "ok",
                      "tolerance / note"), rows))


def formula_image(latex: str) -> Optional[str]:
    """A LaTeX formula as a self-contained SVG ``<img>`` (matplotlib's mathtext: no TeX, no network);
    None where mathtext cannot typeset it."""
    buffer = io.BytesIO()
    try:
        mathtext.math_to_image(f"${latex}$", buffer, format="svg", dpi=130)
    except Exception:  # noqa: BLE001 - a formula mathtext cannot parse: the plain text stands alone
        return None
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f"<img class='formula' alt='{_esc(latex)}' src=\"data:image/svg+xml;base64,{data}\">"


def formula_mathml(latex: str) -> Optional[str]:
    """A LaTeX formula as MathML, typeset by the browser (text, not an image); the SVG image where
    the formula uses LaTeX that :mod:`ppl_vi.mathml` does not cover."""
    try:
        return to_mathml(latex)
    except UnsupportedLatex:
        return formula_image(latex)


def _formula_section(formula: Any, typeset: Callable[[str], Optional[str]] = formula_image) -> str:
    """The objective Pyro optimises, typeset (and as plain text and LaTeX), beside the check table."""
    if not isinstance(formula, dict) or not isinstance(formula.get("text"), str):
        return ""
    parts = ["<div class='formula'><h3>The objective Pyro optimises (per datapoint)</h3>"]
    for text_key, tex_key in (("text", "latex"), ("iwae_text", "iwae_latex")):
        text, tex = formula.get(text_key), formula.get(tex_key)
        if not isinstance(text, str):
            continue
        image = typeset(tex) if isinstance(tex, str) else None
        parts.append(f"<div class='typeset'>{image}</div>" if image else "")
        parts.append(f"<pre>{_esc(text)}</pre>")
        if isinstance(tex, str):
            parts.append(f"<details><summary>LaTeX</summary><pre>{_esc(tex)}</pre></details>")
    if isinstance(formula.get("note"), str):
        parts.append(f"<p class='sub'>{_esc(formula['note'])}</p>")
    return "".join(parts) + "</div>"


def render_check_page(check: dict, title: str) -> str:
    """A page with only a check (``ppl-vi check FILE.py --html``): verdict, diagnoses, formula, table."""
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return "".join([
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>{_esc(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{_esc(title)}</h1><p class='sub'>written {_esc(now)}</p><p>{_badge(check)}</p>",
        _check_section(check), "</body></html>\n"])


def _scoped(css: str, scope: str) -> str:
    """The page's style sheet with every selector confined to ``scope`` (a notebook cell must not
    restyle the notebook around it): ``body`` and ``:root`` become the scope itself."""
    rules = []
    for selectors, body in re.findall(r"([^{}]+)\{([^{}]*)\}", css):
        scoped = [scope if s.strip() in ("body", ":root") else f"{scope} {s.strip()}" for s in selectors.split(",")]
        rules.append(f"{', '.join(scoped)} {{{body}}}")
    return "\n".join(rules)


FRAGMENT_CSS = """
.ppl-vi-check { max-width: none; margin: 0; padding: 12px 16px; border: 1px solid #d1d9e0; border-radius: 6px; }
.ppl-vi-check h2 { margin: 4px 0 8px; }
.ppl-vi-check div.formula { overflow-x: auto; }
.ppl-vi-check math { font-size: 1.15em; font-family: "STIX Two Math", "Cambria Math", "Latin Modern Math",
                     "DejaVu Math TeX Gyre", math; }
"""


def render_check_fragment(check: dict) -> str:
    """The check as one ``<div>`` for a notebook cell (``CheckReport._repr_html_``): the verdict, the
    diagnoses, the objective typeset as MathML and the table with failing rows highlighted; its style
    confined to the div, no script, nothing loaded."""
    return (f"<div class='ppl-vi-check'><style>{_scoped(CSS, '.ppl-vi-check')}{FRAGMENT_CSS}</style>"
            f"<p>{_badge(check)}</p>{_check_section(check, formula_mathml)}</div>")


def _scaled_down_note(metrics: dict) -> str:
    """What a ``ppl-vi run`` profile scaled down, said at the top (nothing for the full protocol)."""
    notes = metrics.get("scaled_down") or []
    if not notes:
        return ""
    items = "".join(f"<li>{_esc(n)}</li>" for n in notes)
    return (f"<div class='scaled'><b>Scaled down ({_esc(metrics.get('profile', '?'))} profile)</b>; "
            f"<code>ppl-vi run --full</code> runs the full protocol:<ul>{items}</ul></div>")


def _config_section(config: dict) -> str:
    """The fields that apply to the run's model (:mod:`ppl_vi.fields`); the others are named below it."""
    model = config.get("model", "?")
    try:
        kind = get_spec(model).data
    except ConfigError:  # a model registered only by the script that trained it
        return (_key_value_table(config, ("field", "value"))
                + f"<p class='sub'>Model {_esc(model)} is not registered here: every field shown.</p>")
    shown = {k: v for k, v in config.items() if k not in FIELDS or applies(k, model, kind)}
    left_out = [k for k in config if k not in shown]
    note = (f"<p class='sub'>Fields {_esc(model)} does not read (still in config.json): "
            f"<code>{_esc(', '.join(left_out))}</code>.</p>" if left_out else "")
    return _key_value_table(shown, ("field", "value")) + note


def _badge(check: Optional[dict]) -> str:
    if check is None:
        return "<span class='badge none'>check not run</span>"
    if check.get("passed"):
        return "<span class='badge ok'>check passed</span>"
    return "<span class='badge bad'>check FAILED</span>"


def _read_optional_json(path: Path) -> Optional[dict]:
    return rundir.read_json(path) if path.exists() or path.is_symlink() else None  # a link: refused in one line


def _read_check(path: Path) -> Optional[dict]:
    check = _read_optional_json(path)
    if check is not None and not (isinstance(check.get("rows", []), list)
                                  and all(isinstance(r, dict) for r in check.get("rows", []))):
        raise ConfigError(f"{path} has 'rows' that are not a list of objects; expected the output of "
                          "ppl-vi check --json")
    return check


# ----------------------------------------------------------------------------------------------


def render_report(run_dir: Path, check: Optional[dict] = None) -> str:
    """The report page for ``run_dir`` as a string (``check``: a CheckReport.to_dict(), else check.json)."""
    run_dir = Path(run_dir)
    saved = _read_optional_json(run_dir / rundir.CONFIG)
    if saved is None:
        raise ConfigError(f"{run_dir} is not a run directory (no {rundir.CONFIG}); train into it first "
                          f"(ppl-vi train MODEL --out {run_dir})")
    config, env = saved.get("config", {}), saved.get("environment", {})
    metrics = _read_optional_json(run_dir / rundir.METRICS) or {}
    history = rundir.read_history(run_dir)
    if check is None:
        check = _read_check(run_dir / CHECK)
    model = config.get("model", "?")
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    headline = []
    for key, label in (("final_train_loss", "train loss"), ("final_val_loss", "val loss"),
                       ("test_log_likelihood", "test log p(x)"), ("test_accuracy", "test accuracy"),
                       ("final_test_accuracy", "test accuracy (last epoch)"),
                       ("baseline_test_accuracy", "supervised-only baseline"),
                       ("accuracy_gain", "gain over the baseline")):
        if isinstance(metrics.get(key), (int, float)):
            headline.append(f"{label} <b>{_fmt_number(metrics[key])}</b>")
    summary = (f"model <b>{_esc(model)}</b> · loss <b>{_esc(config.get('loss', '?'))}</b> · "
               f"{_esc(metrics.get('epochs_done', config.get('epochs', '?')))} epochs · device "
               f"<b>{_esc(env.get('device', config.get('device', '?')))}</b>")
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>ppl-vi report: {_esc(model)} ({_esc(run_dir.name)})</title><style>{CSS}</style></head><body>",
        f"<h1>ppl-vi run report: {_esc(model)}</h1>",
        f"<p class='sub'><code>{_esc(run_dir.resolve())}</code> · written {_esc(now)}</p>",
        f"<p>{_badge(check)} &nbsp; {summary}</p>",
        f"<p>{' · '.join(headline)}</p>" if headline else "",
        _scaled_down_note(metrics),
        "<h2>Metrics</h2>", _metrics_section(metrics),
        _figures_section(run_dir),
        _history_section(history),
        _check_section(check),
        "<h2>Configuration</h2><p class='sub'>Reproduce with <code>ppl-vi train --config "
        f"{_esc(run_dir / rundir.CONFIG)} --out NEW_DIR</code>.</p>",
        "<div class='columns'><div>", _config_section(config), "</div>",
        "<div><details open><summary>environment</summary>", _key_value_table(env, ("", "")), "</details></div></div>",
        "</body></html>\n",
    ]
    return "".join(parts)


def write_report(run_dir, check: Optional[dict] = None) -> Path:
    """Write ``RUN_DIR/report.html`` (atomically) and return its path."""
    run_dir = Path(run_dir)
    with rundir.locked(run_dir):  # re-entrant: train and eval already hold it
        text = render_report(run_dir, check)
        path = run_dir / REPORT
        rundir.atomic_write(path, lambda h: h.write(text.encode("utf-8")))
    return path
