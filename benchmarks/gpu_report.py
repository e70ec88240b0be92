"""The report of `flannel gpu-check`: one JSON with every figure and one Markdown page to read.

    flannel gpu-check --out runs/gpu-check     # writes runs/gpu-check/gpu_check.{json,md}

The report is the dict ``flannel.benchmarks.gpu_check.run_gpu_check`` builds: ``host``,
``steps`` (each step's status, seconds and reason), ``tests``, ``subject``, ``gates`` (backend
-> gate figures), ``decode`` (``flannel.nvjpeg.compare_decoders``), ``bench_model`` and
``bench_serve`` (their Markdown tables and files), ``seconds``, ``budget_s``, ``passed``. Any of
the figures may be None where its step failed or was skipped; the page then says so.
"""
from __future__ import annotations

import json
from pathlib import Path

REPORT_STEM = "gpu_check"


def _host_lines(host: dict | None) -> list[str]:
    if not host:
        return ["Host facts were not read (see the steps)."]
    return ["| GPU | compute capability | memory | driver | CUDA (torch) | CPU (lscpu) | cores |",
            "| --- | --- | --- | --- | --- | --- | --- |",
            f"| {host['gpu']} (x{host['gpus']}) | {host['compute_capability']} | "
            f"{host['gpu_memory_gb']} GB | {host['driver']} | {host['cuda']} | {host['cpu']} | "
            f"{host['cores']} |", "",
            f"torch {host['torch']}, torchvision {host['torchvision']}, onnxruntime "
            f"{host['onnxruntime']} ({', '.join(host['onnxruntime_providers'])}), TensorRT "
            f"{host['tensorrt']}."]


def _step_lines(steps: list[dict]) -> list[str]:
    lines = ["| step | status | seconds | why |", "| --- | --- | --- | --- |"]
    lines += [f"| {s['step']} | {s['status']} | {s['seconds']:.1f} | {s['why'] or '-'} |"
              for s in steps]
    return lines


def _test_lines(tests: dict | None) -> list[str]:
    if not tests or "counts" not in tests:
        return [f"Not run: {(tests or {}).get('why') or 'see the steps'}."]
    c = tests["counts"]
    lines = [f"{c['passed']} passed, {c['failed']} failed, {c['skipped']} skipped "
             f"(pytest -m gpu, exit status {tests['exit_status']}; log: {tests['log']}).", ""]
    lines += [f"- {t['outcome']}: `{t['name']}`" + (f" ({t['message']})" if t["message"] else "")
              for t in tests["cases"]]
    return lines


def _gate_lines(subject: dict | None, gates: dict) -> list[str]:
    from flannel.export.gate import format_gate

    if not subject or "model" not in subject:
        return ["No subject, so no gates (see the steps)."]
    lines = [f"Subject: `{subject['run_dir']}` ({subject['source']}): {subject['kind']} "
             f"{subject['model']}, input {subject['input']} px"
             + (f", learners {', '.join(subject['members'])}" if subject["members"] else "")
             + ".", ""]
    for backend, gate in gates.items():
        lines.append(f"- {format_gate(backend, gate)}" if gate else
                     f"- {backend}: not gated (see the steps)")
    return lines


def _decode_lines(decode: dict | None) -> list[str]:
    if not decode:
        return ["Not measured (see the steps)."]
    lines = [f"The whole `decode_gray` call per file, median of {decode['repeats']} "
             f"(nvJPEG on {decode['device']}):", "",
             "| file | bytes | CPU ms | nvJPEG ms | CPU / nvJPEG | on the GPU | same levels |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in decode["rows"]:
        same = "yes" if r["identical"] else (f"no: {r['pixels_differing']} pixels, up to "
                                             f"{r['max_abs_diff']} levels")
        lines.append(f"| {r['file']} | {r['bytes']:,} | {r['cpu_ms']:.2f} | {r['nvjpeg_ms']:.2f} "
                     f"| {r['cpu_ms'] / r['nvjpeg_ms']:.2f}x | {'yes' if r['on_gpu'] else 'no'} "
                     f"| {same} |")
    lines += ["", f"**The numbers favour {decode['favours']}**: {decode['reason']}. "
                  f"`flannel archive --jpeg-decoder auto` makes the same choice on this host."]
    return lines


def _bench_lines(bench: dict | None) -> list[str]:
    if not bench:
        return ["Not run (see the steps)."]
    # The benchmark's own title becomes a sub-heading of this page.
    table = [f"##{line}" if line.startswith("# ") else line
             for line in bench["markdown"].splitlines()]
    return [*table, "", "Files: " + ", ".join(f"`{f}`" for f in bench["files"])]


def report_markdown(report: dict) -> str:
    """The report as one Markdown page: verdict, host, steps, tests, gates, JPEG decoding, the
    two benchmarks."""
    host = report.get("host") or {}
    seconds, budget = report["seconds"], report["budget_s"]
    failed = [s["step"] for s in report["steps"] if s["status"] != "passed"]
    why = [f"{', '.join(failed)} did not pass"] if failed else []
    if seconds > budget:
        why.append(f"the check took {seconds:.0f} s, over its {budget:.0f} s budget")
    verdict = (f"Every step passed in {seconds:.0f} s of the {budget:.0f} s budget."
               if report["passed"] else f"Not passed: {'; '.join(why)}.")
    sections = [
        [f"# GPU check on {host.get('gpu', 'an unknown GPU')} (CPU: {host.get('cpu', 'unknown')})",
         "", verdict],
        ["## Host", "", *_host_lines(report.get("host"))],
        ["## Steps", "", *_step_lines(report["steps"])],
        ["## GPU tests", "", *_test_lines(report.get("tests"))],
        ["## Gates", "", *_gate_lines(report.get("subject"), report.get("gates") or {})],
        ["## JPEG decoding: CPU against nvJPEG", "", *_decode_lines(report.get("decode"))],
        ["## bench model", "", *_bench_lines(report.get("bench_model"))],
        ["## bench serve", "", *_bench_lines(report.get("bench_serve"))],
    ]
    return "\n\n".join("\n".join(s) for s in sections) + "\n"


def write_report(report: dict, out: str | Path) -> tuple[Path, Path]:
    """Write ``gpu_check.json`` and ``gpu_check.md`` into ``out``; their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{REPORT_STEM}.json", out / f"{REPORT_STEM}.md"
    json_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    md_path.write_text(report_markdown(report))
    return json_path, md_path
