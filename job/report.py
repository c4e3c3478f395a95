"""`peftopt report`: compare runs (built from run directories, an output directory of runs, or
experiments_log.csv): each target's prompts passed against the base, answers beside what was expected and why a
check failed, and PNG plots. Writes report.md, report.html and plots/.

    python -m job report runs/t1 runs/t2 --out runs/report
    python -m job report runs --out runs/report
"""
from __future__ import annotations

import csv
import html
from pathlib import Path
from typing import Any

from job.display import one_line, table_cell
from job.errors import SpecError
from job.rundir import atomic_write_bytes, read_json, read_jsonl

COLUMNS = [("final_loss", "Final loss"), ("heldout_loss", "Held-out loss"), ("runtime_s", "Runtime (s)"),
           ("peak_gpu_gb", "Peak GPU (GB)"), ("lora_gpu_gb", "LoRA GPU (GB)"), ("tokens_per_s", "Tokens/s"),
           ("pass_rate", "Prompts passed (share)"), ("leaking_answers", "Leaking answers"),
           ("reward_accuracy", "Reward accuracy (held out)"), ("reward_first", "Reward, first step"),
           ("reward_last", "Reward, last step")]
TARGET_ORDER = ("adapter", "merged", "gguf-q8_0", "gguf-f16", "gguf-bf16", "gguf-q4_k_m", "base")


def _num(value) -> float | None:
    try:
        return None if value in (None, "") else float(value)
    except (TypeError, ValueError):
        return None


def _target_rank(target: str) -> tuple[int, str]:
    """Plot order: base, adapter, merged, then each GGUF."""
    order = ("base", "adapter", "merged")
    return (order.index(target), target) if target in order else (len(order), target)


def load_run(run_dir: Path) -> dict[str, Any]:
    metrics = read_json(run_dir / "metrics.json")
    if metrics is None:
        raise SpecError(f"{run_dir}: not a run directory (no metrics.json)")
    spec = read_json(run_dir / "spec.json") or {}
    summary = (read_json(run_dir / "eval" / "summary.json") or {}).get("targets", {})
    target = next((t for t in TARGET_ORDER if t in summary), next(iter(summary), None))
    train = metrics.get("train", {})
    row = {"run": spec.get("name", run_dir.name), "target": target,
           **{k: train.get(k) for k in ("final_loss", "runtime_s", "peak_gpu_gb", "lora_gpu_gb", "tokens_per_s")}}
    if target:
        row.update(pass_rate=summary[target].get("pass_rate"), leaking_answers=summary[target].get("leaking_answers"),
                   checks=summary[target].get("checks", {}))
    heldout = (metrics.get("evaluate") or {}).get("heldout") or {}
    row["heldout_loss"] = (heldout.get("adapter") or {}).get("loss")
    preferences = (metrics.get("evaluate") or {}).get("preferences") or {}
    scores = preferences.get("heldout") or preferences.get("train") or {}
    row.update(method=(spec.get("train") or {}).get("method", "sft"), reward_accuracy=scores.get("reward_accuracy"))
    answers = {}
    for path in sorted((run_dir / "eval").glob("*.jsonl")):
        answers[path.stem] = read_jsonl(path)
    row["r"] = (spec.get("lora") or {}).get("r")
    curve = train.get("reward_curve") or []
    if curve:
        row.update(reward_first=curve[0].get("reward"), reward_last=curve[-1].get("reward"))
    return {"row": row, "loss_curve": train.get("loss_curve", []), "reward_curve": curve, "answers": answers,
            "summary": summary,
            "sources": (metrics.get("prepare") or {}).get("sources", []), "preferences": preferences,
            "heldout": heldout, "harness": (metrics.get("evaluate") or {}).get("harness") or {}}


def run_directories(paths: list[Path]) -> list[Path]:
    """The run directories among `paths`: each one itself, or, for an output directory, the runs in it (what
    `peftopt report runs/` and `peftopt report runs/*` mean); files beside the runs (experiments_log.csv) are
    passed over."""
    found = []
    for path in paths:
        if (path / "metrics.json").is_file():
            found.append(path)
        elif path.is_dir():
            found += sorted(p for p in path.iterdir() if p.is_dir() and (p / "metrics.json").is_file())
    return found


def passed_cell(summary: dict) -> str:
    """"2/3 (0.21-0.94)": prompts passed of the prompts with declared checks, with the 95% interval."""
    if not summary.get("checked"):
        return "no declared checks"
    low, high = summary.get("pass_rate_interval") or (None, None)
    return f"{summary['passed']}/{summary['checked']}" + (f" ({low:.2f}-{high:.2f})" if low is not None else "")


def versus_cell(summary: dict) -> str:
    paired = summary.get("vs_base")
    if not paired or not paired.get("prompts"):
        return ""
    return f"+{paired['fixed']} fixed, -{paired['broken']} broken (p = {paired['p_value']:.3g})"


def targets_section(run: dict) -> list[str]:
    """Each target of one run: prompts passed with their interval, the sanity checks on their own, the paired
    comparison with the base, the held-out loss, and each check's pass rate."""
    summary, heldout = run["summary"], run["heldout"]
    rows = []
    for target, s in sorted(summary.items(), key=lambda kv: _target_rank(kv[0])):
        sanity = s.get("sanity") or {}
        loss = (heldout.get(target) or {}).get("loss")
        rows.append([target, passed_cell(s), str(sanity.get("leakage", s.get("leaking_answers", ""))),
                     str(sanity.get("degenerate", "")), versus_cell(s), _fmt(loss) if loss is not None else "",
                     ", ".join(f"{k} {v:.2f}" for k, v in s.get("checks", {}).items()
                               if k not in ("leakage", "degenerate"))])
    heads = ["target", "prompts passed (95% interval)", "leakage fired", "degenerate fired", "against the base",
             "held-out loss", "each check's pass rate"]
    keep = [i for i in range(len(heads)) if i < 2 or any(r[i] for r in rows)]  # columns some target has
    lines = [f"### Targets of {run['row']['run']}", "", "| " + " | ".join(heads[i] for i in keep) + " |",
             "|" + "---|" * len(keep)]
    lines += ["| " + " | ".join(r[i] for i in keep) + " |" for r in rows]
    notes = ["", "A prompt passes when every check it declares passes and neither sanity check (leakage, "
             "degenerate) fires; prompts without declared checks are not counted."]
    if any(s.get("vs_base") for s in summary.values()):
        notes.append("Against the base: prompts the base failed and the target passed (fixed) or the reverse "
                     "(broken); p is the exact McNemar test's, small when the difference is more than chance.")
    return lines + notes + [""]


def divergence_note(summary: dict) -> list[str]:
    """Why the merged model and the GGUFs can score otherwise than the adapter they come from."""
    parted = {t: s["vs_adapter"] for t, s in summary.items() if s.get("vs_adapter")}
    if not parted:
        return []
    lines = ["Greedy answers against the adapter's: " + "; ".join(
        f"{t} identical on {v['identical']:.0%} of the prompts" + (
            ", the others part after " + ", ".join(str(n) for n in v["parts_after_tokens"] if n is not None) + " tokens"
            if v["identical"] < 1 else "") for t, v in parted.items()) + ".",
             "", "The merged model is the adapter folded into bfloat16 weights: bfloat16 keeps about 1 part in 256 of "
             "each weight, which is as large as a short run's LoRA update, so where two next tokens are nearly tied "
             "the merged model (and every GGUF made from it, quantized further) can take the other one, and from "
             "there the answers differ. A different pass rate between these targets is that divergence, not a "
             "broken merge: the merge itself is checked (its float32 logits equal the adapter's) and each GGUF is "
             "verified against the merged model it was made from.", ""]
    return lines


def preferences_section(runs: list[dict]) -> list[str]:
    """The preference runs' implicit rewards: how the adapter ranks chosen over rejected, held out and in training."""
    lines = ["## Preferences", "", "| run | method | examples | reward accuracy | reward margin | log p chosen "
             "(reference) | log p rejected (reference) |", "|---|---|---|---|---|---|---|"]
    for run in runs:
        for part, s in run["preferences"].items():
            if "logps_chosen" in s:
                lines.append(f"| {run['row']['run']} ({part}) | {run['row']['method']} | {s['examples']} | "
                             f"{_fmt(s['reward_accuracy'])} | {_fmt(s['reward_margin'])} | {_fmt(s['logps_chosen'])} "
                             f"({_fmt(s['reference_logps_chosen'])}) | {_fmt(s['logps_rejected'])} "
                             f"({_fmt(s['reference_logps_rejected'])}) |")
            elif "reward_accuracy" in s:
                lines.append(f"| {run['row']['run']} ({part}) | {run['row']['method']} | {s['examples']} | "
                             f"{_fmt(s['reward_accuracy'])} | | {_fmt(s.get('logps_desirable'))} "
                             f"({_fmt(s.get('reference_logps_desirable'))}) | {_fmt(s.get('logps_undesirable'))} "
                             f"({_fmt(s.get('reference_logps_undesirable'))}) |")
    return lines + [""] if len(lines) > 4 else []


def _with_error(figures: dict, metric: str, value) -> str:
    error = figures.get(f"{metric}_stderr")
    return _fmt(value) + (f" ± {_fmt(error)}" if isinstance(error, (int, float)) else "")


def harness_section(runs: list[dict]) -> list[str]:
    """lm-evaluation-harness: each task's metrics for the base and the adapter, with their standard errors."""
    lines = ["## Benchmarks (lm-evaluation-harness)", "", "| run | task | metric | base | adapter | adapter - base |",
             "|---|---|---|---|---|---|"]
    for run in runs:
        base, adapter = run["harness"].get("base", {}), run["harness"].get("adapter", {})
        for task in adapter:
            for metric, value in adapter[task].items():
                if metric.endswith("_stderr") or metric == "examples" or not isinstance(value, (int, float)):
                    continue
                before = base.get(task, {}).get(metric)
                lines.append(f"| {run['row']['run']} | {task} | {metric} | "
                             f"{_with_error(base.get(task, {}), metric, before)} | "
                             f"{_with_error(adapter[task], metric, value)} | "
                             f"{_fmt(value - before) if isinstance(before, (int, float)) else '—'} |")
    return lines + ["", "± is the harness's standard error of each score."] + [""] if len(lines) > 4 else []


def sources_section(runs: list[dict]) -> list[str]:
    """What each data source gave each run: rows used, duplicates dropped, training rows and tokens."""
    lines = ["## Data", "", "| run | source | rows used | duplicates dropped | skipped | training rows | "
             "trainable tokens |", "|---|---|---|---|---|---|---|"]
    for run in runs:
        for source in run["sources"]:
            lines.append(f"| {run['row']['run']} | {source['source']} {source.get('split', '')} | "
                         f"{source.get('rows_used')} | {source.get('duplicates_dropped', 0)} | "
                         f"{sum(source.get('skipped', {}).values())} | {source.get('train_rows')} | "
                         f"{source.get('trainable_tokens')} |")
    return lines + [""] if len(lines) > 4 else []


def load_log(path: Path) -> list[dict]:
    try:
        with open(path, encoding="utf-8") as fh:
            return [{"run": r["run_name"], **{k: r.get(k) for k, _ in COLUMNS}, "r": r.get("r")}
                    for r in csv.DictReader(fh)]
    except (OSError, KeyError) as exc:
        raise SpecError(f"--log {path}: cannot read an experiments log ({exc})") from None


def _fmt(value) -> str:
    number = _num(value)
    if number is None:
        return "—"
    return f"{number:.4g}" if abs(number) < 1000 else f"{number:,.0f}"


def _delta(value, base) -> str:
    a, b = _num(value), _num(base)
    if a is None or b is None or b == 0:
        return ""
    return f" ({(a - b) / abs(b):+.1%})"


def metrics_table(rows: list[dict], baseline: str | None) -> list[str]:
    base = next((r for r in rows if r["run"] == baseline), rows[0] if rows else None)
    columns = [(k, label) for k, label in COLUMNS if any(_num(r.get(k)) is not None for r in rows)]
    lines = ["| Run | r | " + " | ".join(label for _, label in columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    for row in rows:
        cells = [_fmt(row.get(k)) + ("" if row is base else _delta(row.get(k), base.get(k))) for k, _ in columns]
        lines.append(f"| {row['run']}{' (baseline)' if row is base else ''} | {row.get('r') or '—'} | "
                     + " | ".join(cells) + " |")
    return lines


def _save(fig, path: Path) -> None:
    """Writes a figure to a temporary name and renames it into place."""
    import os

    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def plots(runs: list[dict], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    (out / "plots").mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    for run in runs:
        curve = run.get("loss_curve") or []
        if curve:
            ax.plot([p["step"] for p in curve], [p["loss"] for p in curve], label=run["row"]["run"])
    ax.set(xlabel="step", ylabel="training loss", title="Loss curves")
    if ax.lines:
        ax.legend(fontsize=8)
        fig.tight_layout()
        _save(fig, out / "plots" / "loss.png")
        made.append("plots/loss.png")
    plt.close(fig)

    # A run trained on rewards (grpo): each reward function's mean per step, and the weighted reward.
    rewarded = [run for run in runs if run.get("reward_curve")]
    if rewarded:
        fig, ax = plt.subplots(figsize=(7, 4))
        for run in rewarded:
            curve, name = run["reward_curve"], run["row"]["run"]
            steps = [p["step"] for p in curve]
            ax.plot(steps, [p["reward"] for p in curve], label=f"{name}: reward")
            functions = sorted({f for p in curve for f in (p.get("rewards") or {})})
            for function in functions if len(functions) > 1 else ():  # one function's mean is the reward itself
                ax.plot(steps, [(p.get("rewards") or {}).get(function, float("nan")) for p in curve],
                        linestyle="--", linewidth=1, label=f"{name}: {function}")
        ax.set(xlabel="step", ylabel="mean reward", title="Reward curves")
        ax.legend(fontsize=8)
        fig.tight_layout()
        _save(fig, out / "plots" / "rewards.png")
        plt.close(fig)
        made.append("plots/rewards.png")

    # Every target of every run side by side, per check: the notebook's T0-against-T1 comparison is the base
    # against the adapter of one run, and a GGUF is judged beside the model it was made from.
    bars = [(f"{run['row']['run']} / {target}", summary.get("checks", {}))
            for run in runs for target, summary in sorted(run["summary"].items(), key=lambda kv: _target_rank(kv[0]))]
    names = sorted({c for _, checks in bars for c in checks})
    if names:
        fig, ax = plt.subplots(figsize=(max(8, 1.2 * len(names) + 0.15 * len(bars) * len(names)), 4.5))
        width = 0.8 / max(len(bars), 1)
        for i, (label, checks) in enumerate(bars):
            ax.bar([j + i * width for j in range(len(names))], [checks.get(n, float("nan")) for n in names], width,
                   label=label)
        ax.set_xticks([j + width * (len(bars) - 1) / 2 for j in range(len(names))], names, rotation=20, fontsize=8)
        ax.set(ylim=(0, 1.05), ylabel="pass rate", title="Answer checks, every target")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        _save(fig, out / "plots" / "checks.png")
        plt.close(fig)
        made.append("plots/checks.png")

    labels = [run["row"]["run"] for run in runs]
    on_gpu = any(_num(run["row"].get("peak_gpu_gb")) for run in runs)  # a CPU run has no GPU memory to chart
    fig, axes = plt.subplots(1, 2 if on_gpu else 1, figsize=(9 if on_gpu else 5, 3.5), squeeze=False)
    left = axes[0][0]
    left.bar(labels, [_num(run["row"].get("runtime_s")) or 0 for run in runs], color="tab:blue")
    left.set(title="Training runtime (s)")
    if on_gpu:
        right = axes[0][1]
        right.bar(labels, [_num(run["row"].get("peak_gpu_gb")) or 0 for run in runs], color="tab:orange", label="peak")
        right.bar(labels, [_num(run["row"].get("lora_gpu_gb")) or 0 for run in runs], color="tab:green", label="LoRA")
        right.set(title="GPU memory (GB)")
        right.legend(fontsize=8)
    for axis in axes[0]:
        axis.tick_params(axis="x", labelrotation=20, labelsize=8)
    fig.tight_layout()
    _save(fig, out / "plots" / ("runtime_memory.png" if on_gpu else "runtime.png"))
    plt.close(fig)
    made.append("plots/runtime_memory.png" if on_gpu else "plots/runtime.png")
    return made


def answers_section(runs: list[dict]) -> list[str]:
    lines = ["## Answers side by side", ""]
    prompt_order: list[tuple[str, str]] = []
    for run in runs:
        for answers in run["answers"].values():
            for a in answers:
                if (a["id"], a["prompt"]) not in prompt_order:
                    prompt_order.append((a["id"], a["prompt"]))
    for pid, prompt in prompt_order:
        lines += [f"### {one_line(prompt)}", ""]
        expected = next((a for run in runs for answers in run["answers"].values() for a in answers
                         if a["id"] == pid), {})
        if expected.get("reference") is not None:
            lines += [f"Expected: {one_line(expected['reference'])}", ""]
        declared = [c["type"] + (f" {one_line(str(c['value']))}" if "value" in c else "")
                    for c in expected.get("declared", [])]
        if declared:
            lines += [f"Checks: {'; '.join(declared)}", ""]
        lines += ["| run / target | answer | passed | why not |", "|---|---|---|---|"]
        for run in runs:
            for target, answers in run["answers"].items():
                for a in answers:
                    if a["id"] == pid:
                        if "failed" in a:  # declared checks (and the sanity checks when they fire)
                            verdict = {True: "yes", False: "no", None: "—"}[a.get("passed")]
                            why = [table_cell(reason, 200) for reason in a["failed"]]
                        else:  # a run of an earlier version: its named checks
                            verdict = "—"
                            why = [n for n, c in a.get("checks", {}).items() if not c.get("passed")]
                        text = table_cell(a["answer"], 600)
                        lines.append(f"| {run['row']['run']} / {target} | {text} | {verdict} | "
                                     f"{'<br>'.join(why) or '—'} |")
        lines.append("")
    return lines


def build(run_dirs: list[Path], out: Path, baseline: str | None = None, log: Path | None = None) -> Path:
    given = [Path(d) for d in run_dirs]
    found = run_directories(given)
    if given and not found:
        raise SpecError(f"report: not a run directory, nor a directory of runs (none has metrics.json): {', '.join(map(str, given))}")
    runs = [load_run(d) for d in found]
    rows = [r["row"] for r in runs] + (load_log(log) if log else [])
    if not rows:
        raise SpecError("report: give run directories and/or --log experiments_log.csv")
    out.mkdir(parents=True, exist_ok=True)
    md = ["# peftopt report", "", "## Metrics", "",
          "Changes are against the baseline run. Prompts passed is the share of prompts with declared checks "
          "that passed, for each run's main target (adapter, else merged, GGUF or base).", "", *metrics_table(rows, baseline), ""]
    if runs:
        images = plots(runs if runs else [], out)
        md += ["## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in images] + [""]
        for run in runs:
            if run["summary"]:
                md += targets_section(run)
                md += divergence_note(run["summary"])
        md += sources_section(runs)
        md += preferences_section(runs)
        md += harness_section(runs)
        md += answers_section(runs)
    text = "\n".join(md) + "\n"
    atomic_write_bytes(out / "report.md", text.encode())
    atomic_write_bytes(out / "report.html", to_html(text).encode())
    return out / "report.md"


def to_html(markdown: str) -> str:
    """A small Markdown-to-HTML for what build() writes: headings, tables, images, paragraphs."""
    body, in_table = [], False
    for line in markdown.split("\n"):  # the lines build() wrote; a model's text is inside one of them (display.py)
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            if set(line) <= set("|-"):
                continue
            if not in_table:
                body.append("<table>")
                in_table = True
                body.append("<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cells) + "</tr>")
            else:
                body.append("<tr>" + "".join(f"<td>{html.escape(c).replace('&lt;br&gt;', '<br>')}</td>"
                                             for c in cells) + "</tr>")
            continue
        if in_table:
            body.append("</table>")
            in_table = False
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{html.escape(line[level:].strip())}</h{level}>")
        elif line.startswith("!["):
            src = line[line.index("(") + 1:-1]
            body.append(f'<p><img src="{html.escape(src)}" alt="{html.escape(src)}"></p>')
        elif line.strip():
            body.append(f"<p>{html.escape(line)}</p>")
    if in_table:
        body.append("</table>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse;"
             "margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top;font-size:13px}"
             "img{max-width:100%}")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>peftopt report</title><style>{style}</style>" \
           f"</head><body>{''.join(body)}</body></html>\n"
