"""The self-contained HTML report of `finetune eval --prompts`: one file, inline CSS, no external URLs."""

from __future__ import annotations

from html import escape

CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:.4em .6em;vertical-align:top;text-align:left}th{background:#f3f3f3}
pre{white-space:pre-wrap;margin:0;font-family:inherit}.cut{color:#a40}.stop{color:#070}.muted{color:#777;font-size:.9em}
.prompt{background:#f8f8ff}.win{color:#070}.loss{color:#a00}.unparseable{color:#a40}"""


def _num(v, digits=2) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def html(prompts: list[dict], by_model: dict, summaries: dict, judge: dict | None, settings: dict) -> str:
    names = list(by_model)
    out = ["<!doctype html><html><head><meta charset='utf-8'><title>finetune eval: answers</title>",
           f"<style>{CSS}</style></head><body><h1>Answers side by side</h1>",
           f"<p class='muted'>{escape(', '.join(f'{k}: {v}' for k, v in settings.items()))}</p>",
           ("<h2>Summary</h2><table><tr><th>model</th><th>stop rate</th><th>mean tokens</th><th>mean words</th>"
            "<th>exact match</th><th>chrF</th><th>BLEU</th><th>ROUGE-L</th></tr>")]
    for m in names:
        s = summaries[m]
        out.append(f"<tr><td>{escape(m)}</td><td>{s['stop_rate']:.0%}</td><td>{_num(s['mean_tokens'], 1)}</td>"
                   f"<td>{_num(s['mean_words'], 1)}</td><td>{_num(s.get('exact_match'))}</td><td>{_num(s.get('chrf'), 1)}</td>"
                   f"<td>{_num(s.get('bleu'), 1)}</td><td>{_num(s.get('rougeL'), 1)}</td></tr>")
    out.append("</table><p class='muted'>Stop rate: share of answers that ended with the end-of-turn token rather than "
               "running into max_new_tokens. Reference metrics only over prompts that have a reference.</p>")
    if judge:
        out.append(f"<h2>Judge: {escape(judge['judge'])}</h2><p>Each model against {escape(judge['reference_model'])}, "
                   "judged in both orders; a win or loss needs both orders to agree.</p><table><tr><th>model</th>"
                   "<th>win</th><th>tie</th><th>loss</th><th>unparseable</th><th>win rate (95 % CI)</th><th>loss rate (95 % CI)</th></tr>")
        for m, p in judge["pairs"].items():
            wr = f"{_num(p['win_rate'])} ({p['win_ci95'][0]:.2f}–{p['win_ci95'][1]:.2f})" if p["judged"] else "—"
            lr = f"{_num(p['loss_rate'])} ({p['loss_ci95'][0]:.2f}–{p['loss_ci95'][1]:.2f})" if p["judged"] else "—"
            out.append(f"<tr><td>{escape(m)}</td><td>{p['win']}</td><td>{p['tie']}</td><td>{p['loss']}</td>"
                       f"<td>{p['unparseable']}</td><td>{wr}</td><td>{lr}</td></tr>")
        out.append(f"</table><details><summary>Judge prompt</summary><pre>{escape(judge['prompt'])}</pre></details>")
    out.append("<h2>Answers</h2><table><tr><th>prompt</th>" + "".join(f"<th>{escape(m)}</th>" for m in names) + "</tr>")
    for i, p in enumerate(prompts):
        prompt = "\n\n".join(f"[{m['role']}] {m['content']}" if len(p["messages"]) > 1 else m["content"] for m in p["messages"])
        cell = f"<pre>{escape(prompt)}</pre><div class='muted'>{escape(p['where'])}</div>"
        if p["reference"] is not None:
            cell += f"<div class='muted'>reference:</div><pre>{escape(p['reference'])}</pre>"
        row = [f"<td class='prompt'>{cell}</td>"]
        for m in names:
            a = by_model[m][i]
            end = "<span class='stop'>stopped</span>" if a["stopped"] else "<span class='cut'>cut at max_new_tokens</span>"
            metrics = "".join(f" · {k} {v:.2f}" for k, v in (a.get("metrics") or {}).items())
            verdict = ""
            if judge and m in judge["pairs"]:
                v = judge["pairs"][m]["verdicts"][i]
                raw = f"as B: {v['candidate_as_b']['raw']!r} · as A: {v['candidate_as_a']['raw']!r}"
                verdict = f"<div class='{v['outcome']}' title='{escape(raw)}'>judge: {v['outcome']}</div>"
            row.append(f"<td><pre>{escape(a['text'])}</pre><div class='muted'>{a['tokens']} tokens · {end}{metrics}</div>{verdict}</td>")
        out.append("<tr>" + "".join(row) + "</tr>")
    out.append("</table></body></html>\n")
    return "\n".join(out)
