"""bench/peers.py's tables, from its cached rows: every configuration, each tool's best, and
qdq's default against the best peer configuration and against the one closest to it in accuracy
(the latency issue 15 compares)."""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np


def shown_command(tool: str, config: str) -> str:
    """The command for the docs, with placeholder paths."""
    if tool == "qdq":
        return "qdq quantize FP32.onnx -o OUT.onnx --calib CALIB.npz"
    if tool == "ort":
        return f"python bench/peers.py --ort FP32.onnx OUT.onnx CALIB.npz {config}"
    return (
        f"/work/peers/{tool}/bin/python ../shared/peers/{tool}_quantize.py FP32.onnx OUT.onnx "
        f"CALIB.npz --config {config}"
    )


def summarize(rows: dict[str, dict], name: str, tools: Sequence[str]) -> list[dict]:
    """Per configuration of `name`: draws, metric mean and worst, SQNR mean, latency ratio."""
    found: dict[tuple[str, str], dict[int, dict]] = {}
    for key, row in rows.items():
        model, tool, config, draw = key.split("|")
        if model == name and tool != "FP32":
            found.setdefault((tool, config), {})[int(draw)] = row
    out = []
    for (tool, config), by_draw in found.items():
        first = by_draw.get(0, {})
        entry = {"tool": tool, "config": config}
        if "error" in first:
            entry["error"] = first["error"]
        else:
            metrics = [r["metric"] for r in by_draw.values() if "metric" in r]
            entry |= {
                "draws": len(metrics),
                "mean": float(np.mean(metrics)),
                "worst": float(np.min(metrics)),
                "top": float(np.max(metrics)),
                "sqnr": float(np.mean([r["sqnr_db"] for r in by_draw.values() if "sqnr_db" in r])),
                "quantize_s": first.get("quantize_s"),
                "reshaped": any(r.get("reshaped") for r in by_draw.values()),
            }
            if "int8_ms" in first:
                entry["ratio"] = first["int8_ms"] / first["fp32_ms"]
        out.append(entry)
    order = {t: i for i, t in enumerate(tools)}
    return sorted(out, key=lambda e: (order.get(e["tool"], 99), e["config"] != "default"))


def short(error: str) -> str:
    """An ONNX Runtime failure as the op that failed and ORT's reason, else the message."""
    node = re.search(r"while running (\w+) node\. Name:'([^']*)'", error)
    if node is None:
        return error[:120]
    reason = error.split("Status Message:")[-1].split(") ")[-1].strip()
    return f"its model fails in ORT at {node[1]} {node[2]}: {reason}"[:200]


def fmt(value: float, percent: bool) -> str:
    return f"{value:.2%}" if percent else f"{value:.3f}"


def spread(e: dict, percent: bool) -> str:
    """Mean [lowest-highest draw] (draws), or the one value (1)."""
    if e["draws"] == 1:
        return f"{fmt(e['mean'], percent)} (1)"
    low, high = fmt(e["worst"], percent), fmt(e["top"], percent)
    return f"{fmt(e['mean'], percent)} [{low}-{high}] ({e['draws']})"


def best_of(entries: list[dict]) -> dict | None:
    """The best mean among the measured entries with the most draws."""
    scored = [e for e in entries if "mean" in e]
    if not scored:
        return None
    most = max(e["draws"] for e in scored)
    return max((e for e in scored if e["draws"] == most), key=lambda e: e["mean"])


def closest_to(peers: list[dict], mean: float) -> dict | None:
    """The measured entry of `peers` whose mean is nearest `mean`, of equally near ones the one
    on the most draws, then the fastest: the peer whose latency qdq's must match."""
    scored = [e for e in peers if "mean" in e]
    return min(
        scored,
        key=lambda e: (round(abs(e["mean"] - mean), 9), -e["draws"], e.get("ratio", np.inf)),
        default=None,
    )


def ratio_pair(ours: dict, theirs: dict) -> str:
    """INT8/FP32 latency "qdq / peer", empty where either was not timed."""
    if "ratio" not in ours or "ratio" not in theirs:
        return ""
    return f"{ours['ratio']:.2f} / {theirs['ratio']:.2f}"


def tool_cell(entries: list[dict], tool: str, percent: bool) -> str:
    """One tool's best configuration on one model, "fails" when all failed, "" if not run."""
    mine = [e for e in entries if e["tool"] == tool]
    best = best_of(mine)
    if best is None:
        return f"fails: {short(mine[0]['error'])[:60]}" if mine else ""
    failed = sum("error" in e for e in mine)
    note = f", {failed} of {len(mine)} configs fail" if failed else ""
    config = "" if tool == "qdq" else f"{best['config']}: "
    return f"{config}{spread(best, percent)}{note}"


def markdown(
    rows: dict[str, dict], names: list[str], percents: dict[str, bool], tools: Sequence[str]
) -> str:
    """The three tables and the list of models where qdq's default is behind; `rows` by
    "model|tool|config|draw", `percents`: whether a model's metric prints as a percentage."""
    lines = [
        "| model | tool | config | metric mean [lowest-highest] (draws) | SQNR dB | "
        "INT8/FP32 latency | quantize s |",
        "|---|---|---|---|---|---|---|",
    ]
    columns = [
        "",
        "| model | FP32 | " + " | ".join(tools) + " |",
        "|---|---|" + "---|" * len(tools),
    ]
    verdicts = [
        "",
        "| model | FP32 | qdq default | best peer config | its metric | margin | "
        "latency qdq / peer | peer closest to qdq | latency qdq / closest | command |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    losses: list[str] = []
    for name in names:
        entries = summarize(rows, name, tools)
        if not entries:
            continue
        p = percents.get(name, True)
        fp32 = rows.get(f"{name}|FP32||0", {})
        if "labels_accuracy" in fp32:
            lines.append(f"| {name} | FP32 | | {fp32['labels_accuracy']:.2%} (labels) | | | |")
        for e in entries:
            if "error" in e:
                lines.append(
                    f"| {name} | {e['tool']} | {e['config']} | fails: {short(e['error'])} | | | |"
                )
                continue
            ratio = f"{e['ratio']:.2f}" if "ratio" in e else ""
            seconds = f"{e['quantize_s']:.0f}" if e.get("quantize_s") is not None else ""
            lines.append(
                f"| {name} | {e['tool']} | {e['config']}{' (output reshaped)' * e['reshaped']} | "
                f"{spread(e, p)} | {e['sqnr']:.2f} | {ratio} | {seconds} |"
            )
        fp32_text = (
            f"{fp32['labels_accuracy']:.2%}"
            if "labels_accuracy" in fp32
            else fmt(fp32["metric"], p)
        )
        cells = [tool_cell(entries, t, p) for t in tools]
        columns.append(f"| {name} | {fp32_text} | " + " | ".join(cells) + " |")
        ours = [e for e in entries if e["tool"] == "qdq"]
        peers = [e for e in entries if e["tool"] != "qdq"]
        best = best_of(peers)
        if best is None:
            continue
        peer = f"{best['tool']} {best['config']} | {spread(best, p)}"
        if not ours or "error" in ours[0]:
            state = f"fails: {short(ours[0]['error'])[:60]}" if ours else "not run"
            verdicts.append(f"| {name} | {fp32_text} | {state} | {peer} | | | | | |")
            continue
        margin = ours[0]["mean"] - best["mean"]
        flag = " **qdq behind**" if margin < 0 else ""
        scale = 100 if p else 1
        near = closest_to(peers, ours[0]["mean"])
        margin_text = f"{margin * scale:+.{2 if p else 3}f}{' points' if p else ''}"
        verdicts.append(
            f"| {name} | {fp32_text} | {spread(ours[0], p)} | {peer} | {margin_text}{flag} | "
            f"{ratio_pair(ours[0], best)} | {near['tool']} {near['config']} {spread(near, p)} | "
            f"{ratio_pair(ours[0], near)} | `{shown_command(best['tool'], best['config'])}` |"
        )
        if margin < 0:
            losses.append(
                f"- {name}: qdq {fmt(ours[0]['mean'], p)} against {best['tool']} "
                f"{best['config']} {fmt(best['mean'], p)}, {margin_text}"
            )
    behind = ["", "qdq's default behind:", *(losses or ["- none"])]
    return "\n".join([*lines, *columns, *verdicts, *behind])
