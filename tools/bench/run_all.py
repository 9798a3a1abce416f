"""Run the three benchmarks, each in its own process, and rewrite ``docs/benchmarks.md``.

    .venv/bin/python tools/bench/run_all.py                # 5 repeats each (make bench)
    .venv/bin/python tools/bench/run_all.py --repeats 3 --only update_step objective_overhead
    .venv/bin/python tools/bench/run_all.py --smoke --no-memory --doc /tmp/b.md   # seconds: do they run?

Each benchmark is also a standalone script (``--repeats``, ``--out``); this runner calls them with
``--out`` into a temporary folder (or ``--json-dir``) and writes the document from their JSON.

The rest of the document is its sections (``<!-- section: NAME -->`` ... ``<!-- /section: NAME -->``):
the long benchmarks write their own there (``reward_throughput.py``, ``zero_memory.py``,
``sp_memory.py``, ``real_size.py``; :func:`flowdppo_video.commands.benchmarking.write_section`), the others are
edited in place (the algorithm comparison's summary, the GPU check). A rewrite keeps every section
of the document it replaces, verbatim and in its order.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from flowdppo_video.commands.benchmarking import section_block, sections, verdict_text

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
BENCHES = ["rollout_vs_pipeline", "update_step", "objective_overhead"]


def _rel(p: Path) -> str:
    try:
        return str(p.resolve().relative_to(REPO))
    except ValueError:
        return str(p)


def run_one(name: str, repeats: int, out: Path, device: str, extra: list[str]) -> tuple[dict[str, Any] | None, float]:
    cmd = [sys.executable, str(HERE / f"{name}.py"), "--repeats", str(repeats), "--device", device,
           "--out", str(out), *extra]
    print(f"\n### {name}: {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    rc = subprocess.run(cmd, cwd=REPO).returncode
    wall = time.perf_counter() - t0
    if rc != 0 or not out.is_file():
        print(f"### {name} failed (rc {rc})", flush=True)
        return None, wall
    data = json.loads(out.read_text())
    # The command as a reader would type it from the repository root.
    data["command"] = " ".join([".venv/bin/python", f"tools/bench/{name}.py", "--repeats", str(repeats),
                                *(["--device", device] if device != "cpu" else []), *extra])
    data["wall_s"] = wall
    data["run_all_command"] = " ".join([".venv/bin/python", "tools/bench/run_all.py", *sys.argv[1:]])
    out.write_text(json.dumps(data, indent=1))
    return data, wall


def _fmt_mem(m: dict[str, Any] | None) -> str:
    if not m or "peak_mb" not in m:
        return "n/a"
    return f"{m['peak_mb']:.0f} MB (+{m['peak_extra_mb']:.0f} MB)"


def _section(r: dict[str, Any], wall: float) -> list[str]:
    m = r["machine"]
    lines = [f"## {r['title']}", "", "```", r["command"], "```", ""]
    lines += [f"- Machine: {m['cpu']}, {m['cpus_available']} of {m['logical_cpus']} logical CPUs available, "
              f"torch {m['torch']} ({m['torch_threads']} threads), diffusers {m['diffusers']}, Python {m['python']}, "
              f"device `{m['device']}`" + (f" ({m['gpu']})" if m.get("gpu") else "") + ".",
              f"- Repeats: {r['repeats']} timed per variant after a warm-up, variants interleaved "
              f"(order rotated every repeat); wall time of the benchmark process "
              f"{'n/a' if wall != wall else f'{wall:.0f} s'} "
              f"(OMP_WAIT_POLICY={m.get('omp_wait_policy')}).",
              "- Setup: " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in r["config"].items() if k != "model_init")
              + ".", ""]
    lines += ["| variant | median s | min s | max s | all runs (s) | others' CPU share (median) | minor page faults "
              "(median) | peak memory |", "|---|---:|---:|---:|---|---:|---:|---|"]
    for n, v in r["variants"].items():
        share, flt = v.get("others_cpu_share_median"), v.get("minor_faults_median")
        share_s = "n/a" if share is None else f"{100 * share:.0f}%"
        flt_s = "n/a" if flt is None else f"{flt:.0f}"
        runs = ", ".join(f"{t:.2f}" for t in v["times_s"])
        lines.append(f"| `{n}` | {v['median_s']:.3f} | {min(v['times_s']):.3f} | {max(v['times_s']):.3f} | {runs} | "
                     f"{share_s} | {flt_s} | {_fmt_mem(v.get('memory'))} |")
    lines += ["", "| comparison (ours / baseline) | ratio of medians | median of paired ratios (interval) "
              "| ratio of minima | target | verdict |", "|---|---:|---:|---:|---:|---|"]
    for c in r["comparisons"]:
        paired_verdict = c.get("verdict_on") == "paired_ratio_median"
        lo, hi = c.get("paired_interval", [float("nan")] * 2)
        cover = c.get("paired_interval_coverage", float("nan"))
        med, paired = f"{c['ratio']:.3f}x", f"{c['paired_ratio_median']:.3f}x ({lo:.3f}-{hi:.3f}x, {100 * cover:.0f}%)"
        med, paired = (med, f"**{paired}**") if paired_verdict else (f"**{med}**", paired)
        lines.append(f"| {c['label']} | {med} | {paired} | {c['ratio_of_minima']:.3f}x | <= {c['target']:.2f}x | "
                     f"{verdict_text(c)} |")
    if any(c.get("verdict_on") == "paired_ratio_median" for c in r["comparisons"]):
        lines += ["", "The verdict (bold) is the median of the per-repeat ratios, each pair run back to back; in "
                  "brackets a distribution-free interval for that median (order statistics) and its coverage."]
    lines += ["", f"Setup in words: {r['note']}", "", f"What the numbers mean: {interpret(r)}", ""]
    prof = r.get("profile")
    if prof:
        a, b = prof["variants"]
        lines += [f"Profile of `{a}` vs `{b}` (taken because the latent pair missed its target): `torch.profiler` "
                  f"self CPU time per run, {prof['rounds']} run(s) each (order A B B A ...); page-fault time is charged to the op that first writes a fresh buffer; wall under the profiler "
                  f"{prof['wall_s'][a]:.2f} s vs {prof['wall_s'][b]:.2f} s, self CPU total "
                  f"{prof['self_cpu_total_ms'][a]:.0f} ms vs {prof['self_cpu_total_ms'][b]:.0f} ms "
                  f"({prof['self_cpu_total_ms'][a] - prof['self_cpu_total_ms'][b]:+.0f} ms). Ops with the largest "
                  "differences:", "",
                  f"| op | `{a}` ms | calls | `{b}` ms | calls | difference ms | per element |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for row in prof["top"]:
            ta, tb = row[f"{a}_ms"], row[f"{b}_ms"]
            lines.append(f"| `{row['op']}` | {ta:.1f} | {row[f'{a}_calls']:.0f} | {tb:.1f} | {row[f'{b}_calls']:.0f} | "
                         f"{row['diff_ms']:+.1f} | {f'{ta / tb:.2f}x' if ta and tb else 'n/a'} |")
        lines += ["", "For the transformer's ops both sides push the same rows through the same ops, ours in half as "
                  "many calls of twice the rows ([cond; uncond] joined), so \"per element\" is the ratio of the two "
                  "times: above 1 means the op costs more per element in the joint 2B-row call. Ops on one side only "
                  "(e.g. `aten::normal_`, our SDE noise) show n/a.", ""]
    return lines


def interpret(r: dict[str, Any]) -> str:
    """A few sentences read off the numbers of this run."""
    v, comps = r["variants"], {c["ours"]: c for c in r["comparisons"]}
    out = []
    if r["name"] == "rollout_vs_pipeline":
        steps = r["config"]["num_steps"]
        lat = comps.get("ours_latent")
        if lat:
            o, t = v["ours_latent"]["median_s"], v["pipeline_latent"]["median_s"]
            ratio = lat.get("verdict_ratio", lat["ratio"])
            lo, hi = lat.get("paired_interval", [ratio, ratio])
            out.append(f"Without decoding, our rollout took {o:.2f} s against the pipeline's {t:.2f} s for {steps} "
                       f"steps ({o / steps:.3f} vs {t / steps:.3f} s per step): a paired ratio of {ratio:.3f}x "
                       f"(interval {lo:.3f}-{hi:.3f}x), {'within' if lat['pass'] else 'outside'} the "
                       f"{lat['target']:.2f}x target" + (", though the interval reaches past it" if
                                                          lat["pass"] and hi > lat["target"] else "") + ".")
            fo, ft = v["ours_latent"].get("minor_faults_median"), v["pipeline_latent"].get("minor_faults_median")
            if fo is not None and ft is not None:
                out.append(f"Per run our rollout took {fo:.0f} minor page faults (fresh 4 KiB pages, about "
                           f"{fo * 4 / 1024:.0f} MiB first-touched) against the pipeline's {ft:.0f} "
                           f"(about {ft * 4 / 1024:.0f} MiB).")
        joint = comps.get("ours_latent_joint")
        if joint:
            out.append(f"With sampler.cfg_batch=joint ([cond; uncond] as one call of 2B rows, the GPU default) it was "
                       f"{joint['ratio']:.3f}x; the difference between the two of ours is the cost of the joint "
                       "CFG batch on this machine, which is why `auto` splits on the CPU.")
        dec = comps.get("ours_decoded")
        if dec:
            out.append(f"With the same VAE decode on both sides the paired ratio is "
                       f"{dec.get('verdict_ratio', dec['ratio']):.3f}x; the decode adds "
                       f"about {v['ours_decoded']['median_s'] - o:.1f} s to ours and "
                       f"{v['pipeline_decoded']['median_s'] - t:.1f} s to the pipeline, which dilutes the sampler "
                       "difference.")
            fo_d = v["ours_decoded"].get("minor_faults_median")
            ft_d = v["pipeline_decoded"].get("minor_faults_median")
            if fo_d is not None and ft_d is not None:
                out.append(f"Page faults per decoded run: ours {fo_d:.0f}, pipeline {ft_d:.0f} (decoder included).")
        diag = r.get("diagnostic_malloc_tuned")
        if diag:
            dc = diag["comparisons"][0]
            dv = diag["variants"]
            o_d, p_d = dv["ours_latent"], dv["pipeline_latent"]
            per = "; ".join(f"{a:.2f} s vs {b:.2f} s (others' CPU {100 * fa:.0f}% vs {100 * fb:.0f}%)"
                            for a, b, fa, fb in zip(o_d["times_s"], p_d["times_s"], o_d["others_cpu_share"],
                                                    p_d["others_cpu_share"]))
            out.append(f"Diagnostic in the same run_all run: the latent pair again with glibc malloc set to keep "
                       f"freed memory (`{diag['command']}`, mallopt {json.dumps(diag['config'].get('malloc'))}): "
                       f"{o_d['minor_faults_median']:.0f} vs {p_d['minor_faults_median']:.0f} page faults per run; "
                       f"ours vs pipeline per repeat: {per}; ratio of medians {dc['ratio']:.3f}x, of minima "
                       f"{dc['ratio_of_minima']:.3f}x.")
            fo = v["ours_latent"].get("minor_faults_median")
            ft = v["pipeline_latent"].get("minor_faults_median")
            if fo and ft and fo > 2 * ft and (o_d["minor_faults_median"] or 0) < 0.01 * fo:
                out.append("Reading: the gap goes with the page faults. The joint [cond; uncond] call allocates "
                           "activation blocks twice as large; glibc malloc hands freed blocks of that size back to the "
                           "OS (heap trimming / munmap) and the next call first-touches fresh pages, charged to "
                           "whichever op writes them first (GELU outputs, copies). With malloc keeping freed memory the "
                           "faults vanish on both sides; compare the two sides in the diagnostic's repeats where the "
                           "other processes' load was equal.")
    elif r["name"] == "update_step":
        c = r["comparisons"][0]
        o, b = v[c["ours"]]["median_s"], v[c["baseline"]]["median_s"]
        out.append(f"One Flow-DPPO optimizer step took {o:.2f} s, the bare forward+backward+AdamW step {b:.2f} s: "
                   f"the policy-gradient machinery (SDE mean, token log-probs and KL, mask, stats, trajectory "
                   f"slicing) costs {100 * (o / b - 1):+.1f}% on top of the transformer's own work "
                   f"({'within' if c['pass'] else 'outside'} the {c['target']:.2f}x target).")
    elif r["name"] == "objective_overhead":
        c = r["comparisons"][0]
        o, b = v[c["ours"]]["median_s"], v[c["baseline"]]["median_s"]
        out.append(f"Flow-DPPO {o:.2f} s vs grpo_clip {b:.2f} s per optimizer step ({100 * (o / b - 1):+.1f}%, "
                   f"{'within' if c['pass'] else 'outside'} the {c['target']:.2f}x target). The two objectives differ "
                   "only in a few elementwise ops over (B, N) token tensors; the transformer's forward and backward, "
                   "identical on both sides, are nearly all of the time.")
    noise = []
    for c in r["comparisons"]:
        vo, vb = v[c["ours"]], v[c["baseline"]]
        pr = [x / y for x, y in zip(vo["times_s"], vb["times_s"])]
        uneven = sum(abs(a - b) > 0.05 for a, b in zip(vo.get("others_cpu_share", []),
                                                        vb.get("others_cpu_share", [])))
        if len(pr) > 1:
            noise.append(f"{c['ours']}/{c['baseline']} {min(pr):.3f}x to {max(pr):.3f}x"
                         + (f" ({uneven} of {len(pr)} repeats with other processes' load differing by more than "
                            "5 points between the two sides)" if uneven else ""))
    if noise:
        out.append("Run-to-run noise, per-repeat ratios: " + "; ".join(noise) + ".")
    spread = [c["paired_ratio_median"] / c["ratio"] for c in r["comparisons"]]
    if any(abs(x - 1) > 0.02 for x in spread):
        out.append("The paired and median ratios differ by more than 2% somewhere: the load changed during the run; "
                   "read the verdicts with that noise in mind.")
    return " ".join(out)


def write_doc(path: Path, results: list[tuple[str, dict[str, Any] | None, float]], argv: list[str],
              findings: str, run_time: str | None = None) -> None:
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    if run_time is None:
        origin = f"Written by `{' '.join(argv)}` on {now}."
    else:
        origin = (f"Numbers from one run of `{' '.join(argv)}` (finished {run_time}); this text was regenerated "
                  f"from that run's JSON files with `--from-json` on {now}.")
    lines = ["# Benchmarks", "",
             f"{origin} Rerun with `make bench` (or the command above); every number below comes from that one "
             "run.", "",
             "How to read it:", "",
             "- Each benchmark compares our code with a baseline **measured in the same run, on the same model "
             "weights and inputs**. The verdict is the ratio of the two medians against the target; for (a), the "
             "median of the per-repeat (paired) ratios, with an interval.",
             "- Timing: `time.perf_counter` around one call, `torch.set_num_threads(2)`, one untimed warm-up per "
             "variant, then the variants interleaved in every repeat, order rotated (A B, B A, ...; A B C, B C A, ...). The median of the per-repeat "
             "ratios (each pair ran back to back) and the ratio of the minima are shown as checks: the machine is "
             "shared, and \"others' CPU share\" is the fraction of the machine's CPUs other processes kept busy "
             "during the runs (from `/proc/stat`), i.e. how contended the measurement was.",
             "- The scripts set `OMP_WAIT_POLICY=PASSIVE` (unless it is set) before torch loads: on a shared machine "
             "where another process holds one of the two cores, OpenMP's default spinning made every parallel region "
             "wait for a descheduled peer thread (a transformer forward took 2.7 s instead of 0.86 s, and varied "
             "wildly). It applies to both sides of every comparison alike.",
             "- Peak memory: each variant runs once more in a fresh process after the same setup; on CPU the peak "
             "is the resident-set high-water mark `VmHWM` (reset through `/proc/self/clear_refs` just before the "
             "call), shown as the absolute peak and (+) the increase over the resident set before the call. On "
             "CUDA it is `torch.cuda.max_memory_allocated`. One sample per variant, and RSS-based: while writing "
             "these scripts, seven probes of the same variant (`flow_dppo_update`) gave +1050 to +1233 MB, so "
             "differences under ~20% are not meaningful.",
             "- The model is a random-weight Wan 2.1 built from the real diffusers classes "
             "(`WanTransformer3DModel`, `AutoencoderKLWan`, UMT5): 4 blocks, 4 heads x 32 dims, patch (1, 2, 2), "
             "a 33-frame 256x256 video -> latent (16, 9, 32, 32) -> 2304 tokens; 32 text tokens; float32. "
             "The model settings are `tools/bench/_common.py` `WAN_INIT`.", ""]
    for name, r, wall in results:
        if r is None:
            lines += [f"## {name}", "", f"Failed: see the output of `.venv/bin/python tools/bench/{name}.py`.", ""]
        else:
            lines += _section(r, wall)
    if findings:
        lines += ["## Findings", "", findings.strip(), ""]
    # The sections of the benchmarks that run on their own (hours, other machines), and the ones
    # edited by hand, are kept from the document this rewrite replaces.
    kept = sections(path.read_text()) if path.is_file() else {}
    text = "\n".join(lines)
    if kept:
        text = text.rstrip("\n") + "\n\n" + "\n".join(section_block(name, body) for name, body in kept.items())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"\nwrote {_rel(path)}")


def results_argv(results: list[tuple[str, dict[str, Any] | None, float]]) -> list[str]:
    """The run_all arguments that produced stored results (for a document rewritten from JSON)."""
    r = next((r for _, r, _ in results if r), None)
    if r is None:
        return []
    args = [] if r["repeats"] == 5 else ["--repeats", str(r["repeats"])]
    names = [n for n, d, _ in results if d]
    return args + ([] if names == BENCHES else ["--only", *names])


def main(argv: list[str] | None = None) -> list[dict[str, Any] | None]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--only", nargs="+", choices=BENCHES, default=BENCHES)
    p.add_argument("--doc", type=Path, default=REPO / "docs" / "benchmarks.md")
    p.add_argument("--json-dir", type=Path, default=None, help="keep each benchmark's JSON here")
    p.add_argument("--findings", type=Path, default=None,
                   help="a Markdown file appended to the document as a 'Findings' section")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--smoke", action="store_true",
                   help="every benchmark at smoke size (seconds each; its numbers mean nothing): does it run?")
    p.add_argument("--from-json", type=Path, default=None,
                   help="do not run: rewrite the document from the JSON files a --json-dir run kept")
    a = p.parse_args(argv)
    if a.from_json:
        results = []
        for name in a.only:
            f = a.from_json / f"{name}.json"
            data = json.loads(f.read_text()) if f.is_file() else None
            results.append((name, data, (data or {}).get("wall_s", float("nan"))))
        mtimes = [(a.from_json / f"{n}.json").stat().st_mtime for n, d, _ in results if d]
        run_time = (datetime.fromtimestamp(max(mtimes), timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
                    if mtimes else "unknown")
        first = next((d for _, d, _ in results if d), {})
        shown_from = (first.get("run_all_command", "").split()
                      or [".venv/bin/python", "tools/bench/run_all.py", *results_argv(results)])
        write_doc(a.doc, results, shown_from,
                  a.findings.read_text() if a.findings else "", run_time=run_time)
        return [r for _, r, _ in results]
    extra = (["--no-memory"] if a.no_memory else []) + (["--smoke"] if a.smoke else [])
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        jdir = a.json_dir or Path(tmp)
        jdir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        for name in a.only:
            data, wall = run_one(name, a.repeats, jdir / f"{name}.json", a.device, extra)
            if name == "rollout_vs_pipeline" and data and not data["comparisons"][0]["pass"] and not a.smoke:
                # The latent pair missed: measure it again with glibc malloc keeping freed memory.
                diag_args = ["--malloc-tuned", "--no-decoded", "--no-extra", "--no-memory", "--profile", "never"]
                diag, _ = run_one(name, min(a.repeats, 3), jdir / f"{name}_malloc_tuned.json", a.device, diag_args)
                data["diagnostic_malloc_tuned"] = diag
                (jdir / f"{name}.json").write_text(json.dumps(data, indent=1))
            results.append((name, data, wall))
        total = time.perf_counter() - t0
    shown = [".venv/bin/python", "tools/bench/run_all.py", *(argv if argv is not None else sys.argv[1:])]
    findings = a.findings.read_text() if a.findings else ""
    write_doc(a.doc, results, shown, findings)
    print(f"total {total:.0f} s")
    for name, r, _ in results:
        for c in (r or {}).get("comparisons", []):
            print(f"{name}: {c['label']}: {c.get('verdict_ratio', c['ratio']):.3f}x (target <= {c['target']:.2f}x) "
                  f"{verdict_text(c)}")
    return [r for _, r, _ in results]


if __name__ == "__main__":
    main()
