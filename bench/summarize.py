"""Turns a pytest-benchmark JSON file into the Markdown tables of bench/RESULTS.md.

Usage: python bench/summarize.py RUN.json
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict


def _machine(data):
    m = data.get("machine_info", {})
    cpu = m.get("cpu", {})
    build = m.get("pycurv_build", {})
    return (f"{cpu.get('brand_raw', m.get('processor', '?'))}, {m.get('cpu_count', '?')} cores; "
            f"Python {m.get('python_version', '?')}; pycurv {m.get('pycurv', '?')} "
            f"({build.get('compiler', '?')}, OpenMP threads {build.get('max_threads', '?')})")


def lanczos_table(benches):
    rows = defaultdict(dict)
    for b in benches:
        e = b["extra_info"]
        if "solver" in e and "case" in e and "matvecs" in e:
            rows[e["case"]][e["solver"]] = (e, b["stats"]["median"])
    if not rows:
        return ""
    out = ["| spectrum | pycurv matvecs | ARPACK matvecs | ratio | power-iteration matvecs | "
           "pycurv s | ARPACK s | power s | correct (pycurv / ARPACK / power) |",
           "|---|---|---|---|---|---|---|---|---|"]
    ratios = []
    for case, by in rows.items():
        p, a, w = by.get("pycurv"), by.get("arpack"), by.get("power")
        ratio = ""
        if p and a and a[0]["correct"] and a[0]["matvecs"]:
            r = p[0]["matvecs"] / a[0]["matvecs"]
            ratios.append(r)
            ratio = f"{r:.2f}"
        def mv(x):
            return "–" if x is None else str(x[0]["matvecs"])
        def t(x):
            return "–" if x is None else f"{x[1]:.3g}"
        def ok(x):
            return "–" if x is None else ("yes" if x[0]["correct"] else "**no**")
        out.append(f"| {case} | {mv(p)} | {mv(a)} | {ratio} | {mv(w)} | {t(p)} | {t(a)} | {t(w)} | "
                   f"{ok(p)} / {ok(a)} / {ok(w)} |")
    if ratios:
        out.append("")
        out.append(f"Median matvec ratio pycurv/ARPACK over the spectra where ARPACK is correct: "
                   f"**{statistics.median(ratios):.2f}** ({len(ratios)} spectra).")
    equal = _equal_memory(rows)
    if equal:
        out += ["", equal]
    return "\n".join(out)


def _equal_memory(rows):
    """The two solvers at the same basis size: pycurv at 20 vs ARPACK's default, ARPACK at 32 vs pycurv's."""
    pairs = [("pycurv_ncv20", "arpack", 20), ("pycurv", "arpack_ncv32", 32)]
    if not any(p in by and a in by for by in rows.values() for p, a, _ in pairs):
        return ""
    out = ["Equal basis size (same operators; ratio pycurv/ARPACK where ARPACK is correct):", "",
           "| spectrum | pycurv ncv=20 | ARPACK ncv=20 | ratio | pycurv ncv=32 | ARPACK ncv=32 | ratio |",
           "|---|---|---|---|---|---|---|"]
    ratios = {20: [], 32: []}
    for case, by in rows.items():
        cells = []
        for p, a, ncv in pairs:
            pe, ae = by.get(p), by.get(a)
            r = ""
            if pe and ae and ae[0]["correct"] and ae[0]["matvecs"]:
                ratios[ncv].append(pe[0]["matvecs"] / ae[0]["matvecs"])
                r = f"{ratios[ncv][-1]:.2f}"
            cells += ["–" if pe is None else str(pe[0]["matvecs"]), "–" if ae is None else str(ae[0]["matvecs"]), r]
        out.append(f"| {case} | " + " | ".join(cells) + " |")
    out.append("")
    out.append("Median ratio at equal basis size: " + ", ".join(
        f"ncv = {ncv}: **{statistics.median(v):.2f}** ({len(v)} spectra)" for ncv, v in ratios.items() if v) + ".")
    return "\n".join(out)


def roofline_table(benches):
    rows = [b for b in benches if "roofline_s" in b["extra_info"] and b["extra_info"].get("device") != "gpu"]
    if not rows:
        return ""
    out = ["| n | ncv | steps | restarts | read bandwidth GB/s | core ms/step | roofline ms/step | "
           "core / roofline (median; all rounds) |",
           "|---|---|---|---|---|---|---|---|"]
    for b in sorted(rows, key=lambda b: (b["extra_info"]["n"], b["extra_info"]["ncv"])):
        e = b["extra_info"]
        every = ", ".join(f"{r:.2f}" for r in e.get("ratios", [e["ratio"]]))
        out.append(f"| {e['n']:.0e} | {e['ncv']} | {e['steps']} | {e['restarts']} | {e['bandwidth_gbs']:.1f} | "
                   f"{e['core_ms_per_step']:.1f} | {e['roofline_ms_per_step']:.1f} | {e['ratio']:.2f} ({every}) |")
    return "\n".join(out)


def torch_table(benches):
    rows = {b["extra_info"]["solver"]: b for b in benches if "hvps" in b["extra_info"] and "solver" in b["extra_info"]}
    if not rows:
        return ""
    any_e = next(iter(rows.values()))["extra_info"]
    out = [f"{any_e['case']}, {any_e['samples']} samples, float64 HVPs on {any_e['torch_threads']} torch thread(s) "
           f"(torch {any_e['torch']}); one HVP alone: {any_e['hvp_seconds']:.3f} s; tol {any_e['tol']:g}", "",
           "| solver | HVPs | wall s | λ1 | relative error | converged | HVPs vs pycurv | time vs pycurv |",
           "|---|---|---|---|---|---|---|---|"]
    p = rows.get("pycurv")
    for name in ("pycurv", "eigsh", "power"):
        b = rows.get(name)
        if b is None:
            continue
        e, t = b["extra_info"], b["stats"]["median"]
        r_mv = f"{e['hvps'] / p['extra_info']['hvps']:.2f}" if p else "–"
        r_t = f"{t / p['stats']['median']:.2f}" if p else "–"
        out.append(f"| {name} | {e['hvps']} | {t:.1f} | {e['value']:.10g} | {e['relative_error']:.1e} | "
                   f"{'yes' if e['converged'] else '**no**'} | {r_mv} | {r_t} |")
    if p and "overhead" in p["extra_info"]:
        e = p["extra_info"]
        steps = max(e["hvps"], 1)
        out.append("")
        out.append(f"pycurv's own time (compiled core + Python driver) is **{100 * e['overhead']:.1f}%** of the time "
                   f"in HVPs: {e['time_core']:.2f} s core + {e['time_other']:.3f} s driver against "
                   f"{e['time_matvec']:.1f} s of HVPs ({1e3 * (e['time_core'] + e['time_other']) / steps:.0f} ms "
                   f"per step against {1e3 * e['time_matvec'] / steps:.0f} ms per HVP).")
    return "\n".join(out)


def distributed_table(benches):
    rows = [b for b in benches if "basis_mib_per_rank" in b["extra_info"]]
    if not rows:
        return ""
    e0 = rows[0]["extra_info"]
    out = [f"MLP with n = {e0['n']:,} parameters, ncv = {e0['ncv']}, lambda_1 = {e0['value']:.6g}", "",
           "| ranks | layout | HVPs | s per HVP | core s | Lanczos s | basis MiB per rank |",
           "|---|---|---|---|---|---|---|"]
    for b in sorted(rows, key=lambda b: (b["extra_info"]["layout"], b["extra_info"]["ranks"])):
        e = b["extra_info"]
        out.append(f"| {e['ranks']} | {e['layout']} | {e['hvps']} | {e['seconds_per_hvp']:.3f} | {e['core_s']:.3f} | "
                   f"{e['lanczos_s']:.2f} | {e['basis_mib_per_rank']:.2f} |")
    return "\n".join(out)



def gpu_roofline_table(benches):
    rows = [b for b in benches if "roofline_s" in b["extra_info"] and b["extra_info"].get("device") == "gpu"]
    if not rows:
        return ""
    e0 = rows[0]["extra_info"]
    out = [f"GPU: {e0['gpu']} (compute capability {e0['compute_capability']}, CUDA runtime "
           f"{e0['cuda'].get('cuda_runtime', '?')}, driver {e0['cuda'].get('cuda_driver', '?')}); read bandwidth "
           f"(roofline reference) {e0['bandwidth_gbs']:.0f} GB/s", "",
           "| n | ncv | steps | restarts | core ms/step | roofline ms/step | core / roofline | matvec ms/step |",
           "|---|---|---|---|---|---|---|---|"]
    for b in sorted(rows, key=lambda b: (b["extra_info"]["n"], b["extra_info"]["ncv"])):
        e = b["extra_info"]
        out.append(f"| {e['n']:.0e} | {e['ncv']} | {e['steps']} | {e['restarts']} | {e['core_ms_per_step']:.2f} | "
                   f"{e['roofline_ms_per_step']:.2f} | {e['ratio']:.2f} | {e['matvec_ms_per_step']:.2f} |")
    return "\n".join(out)


def gpu_lambda_table(benches):
    by_model = defaultdict(dict)
    for b in benches:
        e = b["extra_info"]
        if e.get("device") == "gpu" and "hvps_gpu" in e:
            by_model[(e["model"], e["n"])][e["solver"]] = (e, b["stats"]["median"])
    if not by_model:
        return ""
    out = []
    for (model, n), rows in by_model.items():
        p = rows.get("pycurv")
        any_e = next(iter(rows.values()))[0]
        out += [f"{model}, n = {n:,} ({any_e.get('hvp_dtype', 'float64')} products, tol {any_e['tol']:g}); "
                f"lambda_max {any_e['lambda_max']:.6g}, lambda_min {any_e['lambda_min']:.6g} on {any_e['gpu']}", "",
                "| solver | products | wall s | lambda_1 | relative error | largest algebraic | time vs pycurv |",
                "|---|---|---|---|---|---|---|"]
        for name in ("pycurv", "scipy_host", "cupyx", "torch_lobpcg"):
            if name not in rows:
                continue
            e, t = rows[name]
            vs = f"{t / p[1]:.2f}" if p else "–"
            mv = str(e["hvps_gpu"]) if e["hvps_gpu"] >= 0 else "–"
            out.append(f"| {name} | {mv} | {t:.2f} | {e['value']:.8g} | {e['relative_error']:.1e} | "
                       f"{'yes' if e['largest_algebraic'] else '**no**'} | {vs} |")
        out.append("")
    return "\n".join(out).rstrip()


PEER_TOOLS = ("pycurv", "pycurv-eval", "pyhessian", "pyhessian-train", "eigenthings", "curvlinops", "scipy")
PEER_LABELS = {"pycurv": "pycurv", "pycurv-eval": "pycurv (mode=\"eval\")", "pyhessian": "PyHessian", "pyhessian-train": "PyHessian (train mode kept)", "eigenthings": "hessian-eigenthings",
               "curvlinops": "curvlinops + eigsh", "scipy": "scipy eigsh + double backward"}


def peers_table(benches):
    """test_bench_peers.py: one table, a block of rows per model, with each model's references above it."""
    rows = [b["extra_info"] for b in benches if "peer_tool" in b["extra_info"]]
    if not rows:
        return ""
    by_model = defaultdict(list)
    for e in rows:
        by_model[e["model"]].append(e)
    e0 = rows[0]
    out = [f"Scale {e0['scale']:g}; every run in its own process with {e0['torch_threads']} torch, OpenMP and BLAS "
           f"thread(s); product cap {e0['max_hvps']}; "
           "λ1 of the function each tool measures, errors against its float64 reference. "
           "HVPs: every product the tool computed (pycurv: `H.n_hvps`, its determinism probe's included; "
           "curvlinops: its determinism check's two included); s/HVP: time inside the products over their number; "
           "total s: building the operator to the answer; peak MB: ru_maxrss of the run's own process "
           "(in parentheses, the part above the baseline after imports, model and data).", ""]
    for model, es in by_model.items():
        ref = es[0]
        refs = "; ".join(f"{_PEER_FN.get(k, k)}: λ1 = {f['lambda1']:.8g}, λmin = {f['lambda_min']:.6g}"
                         for k, f in ref["ref_functions"].items())
        out.append(f"- **{model}**: {ref['description']}; {ref['n_params']:,} parameters. Reference "
                   f"({ref['ref_method']}): {refs}.")
    out += ["", "| model | tool | setting | function measured | λ1 | rel. error | end | HVPs | s/HVP | total s | "
            "peak MB | note |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    order = {t: i for i, t in enumerate(PEER_TOOLS)}
    for model, es in by_model.items():
        for e in sorted(es, key=lambda e: (order.get(e["peer_tool"], 99), e["config"])):
            tool = PEER_LABELS.get(e["peer_tool"], e["peer_tool"])
            if e.get("version"):
                tool += f" {e['version']}"
            peak = e.get("peak_mb")
            mem = "–" if peak is None else f"{peak:.0f}"
            if peak is not None and e.get("baseline_mb") is not None:
                mem += f" (+{peak - e['baseline_mb']:.0f})"
            if "error" in e or e.get("value") is None:
                out.append(f"| {model} | {tool} | {e['config']} | {e['function']} | **failed** | – | – | – | – | "
                           f"{e.get('seconds', float('nan')):.2f} | {mem} | {_sentence(e.get('error', 'no value'))} |")
                continue
            err = e.get("relative_error")
            err_s = "–" if err is None else f"{err:.1e}"
            end = e.get("end", "–")
            end_s = end if end == "top" else f"**{end}**"
            conv = "" if e.get("converged", True) else "not converged; "
            out.append(f"| {model} | {tool} | {e['config']} | {e['function']} | {e['value']:.8g} | {err_s} | {end_s} | "
                       f"{e['hvps']} | {e['hvp_seconds']:.4f} | {e['seconds']:.2f} | {mem} | "
                       f"{conv}{e.get('note', '')} |")
    return "\n".join(out)


_PEER_FN = {"batch_stats": "train mode (batch stats)", "eval": "eval mode (running stats)", "loss": "the loss"}


def products_table(benches):
    """test_bench_products.py: ms per product interleaved, whole solves, JAX linearised against jvp(grad)."""
    steady = [b["extra_info"] for b in benches if b["name"].startswith("test_steady_state_products")]
    solves = [b["extra_info"] for b in benches if b["name"].startswith("test_whole_solves")]
    jx = [b["extra_info"] for b in benches if b["name"].startswith("test_jax_linearised")]
    out = []
    if steady:
        out += ["Per product, steady state (ms, medians, interleaved with the order rotated):", "",
                "| model | parameters | pycurv | pycurv forward | double backward | cached double backward | "
                "pycurv / cached | cache MiB |", "|---|---|---|---|---|---|---|---|"]
        for e in steady:
            m = e["median_ms"]
            out.append(f"| {e['model']} | {e['n']:,} | {m['pycurv']:.1f} | {m['pycurv forward']:.1f} | "
                       f"{m['double backward']:.1f} | {m['cached double backward']:.1f} | "
                       f"**{e['ratio_to_cached']:.2f}** | {e['cache_mib']:.0f} |")
    if solves:
        out += ["", "Whole solves from scratch (medians, s):", "",
                "| model | pycurv (build + lanczos) | cached loop, same products | ratio | per product | "
                "per product, no probe | pycurv: build | core | Lanczos products | HVPs (H.n_hvps) |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for e in solves:
            out.append(f"| {e['model']} | {e['pycurv_s']:.3f} | {e['cached_loop_s']:.3f} | {e['ratio']:.2f} | "
                       f"**{e.get('per_product_ratio', float('nan')):.2f}** | "
                       f"{e.get('per_product_ratio_no_probe', float('nan')):.2f} | "
                       f"{e['build_s']:.3f} | {e['time_core_s']:.3f} | {e['lanczos_matvecs']:.0f} | "
                       f"{e['pycurv_products']:.0f} |")
    if jx:
        out += ["", "JAX, jitted, CPU (ms per product, medians, interleaved):", "",
                "| model | parameters | linearised (default) | jvp(grad) | ratio | linearisation MiB |",
                "|---|---|---|---|---|---|"]
        for e in jx:
            m = e["median_ms"]
            out.append(f"| {e['model']} | {e['n']:,} | {m['linearized']:.2f} | {m['jvp(grad)']:.2f} | "
                       f"**{e['ratio']:.2f}** | {e['cache_mib']:.1f} |")
    return "\n".join(out)


def _per_round(values):
    """One figure when every round agrees, else each round's."""
    return str(values[0]) if len(set(values)) == 1 else ", ".join(str(v) for v in values)


def ratios_table(benches):
    """test_bench_peers.py::test_time_ratios: median seconds and median per-round ratios."""
    rows = [b["extra_info"] for b in benches if "ratio_model" in b["extra_info"]]
    if not rows:
        return ""
    out = ["| model | run | seconds per round | median s | HVPs | rel. error | pycurv (λ1 to 1e-4) / run "
           "(PyHessian in eval mode: pycurv-eval / run) |",
           "|---|---|---|---|---|---|---|"]
    for e in rows:
        for k in e["keys"]:
            r = e["median_ratio_to_pycurv"].get(k)
            errs = [x for x in e["relative_error"][k] if x is not None]
            out.append(f"| {e['ratio_model']} | {k} | {', '.join(f'{s:.2f}' for s in e['seconds'][k])} | "
                       f"{e['median_seconds'][k]:.2f} | {_per_round(e['hvps'][k])} | "
                       f"{max(errs):.1e} | {'–' if r is None or r != r else f'**{1 / r:.2f}**'} |")
    return "\n".join(out)


def criteria_table(benches):
    """test_bench_criteria.py: per spectrum and tol, how often each stopping rule misses lambda_1."""
    rows = [b["extra_info"] for b in benches if b["name"].startswith("test_criteria")]
    if not rows:
        return ""
    e0 = rows[0]
    out = [f"n = {e0['n']}, {e0['seeds']} random starts per cell; miss: fraction of starts further than "
           "tol * scale from λ1; worst: largest error in units of tol * scale; beyond r: fraction whose error "
           "exceeds the returned residual.", "",
           "| spectrum | tol | solver | miss | worst | beyond r | matvecs |", "|---|---|---|---|---|---|---|"]
    for e in rows:
        for r in e["rows"]:
            out.append(f"| {e['spectrum']} | {r['tol']:g} | {r['solver']} | {r['miss']:.2f} | {r['worst']:.2g} | "
                       f"{r['beyond_r']:.2f} | {r['matvecs']:.1f} |")
    return "\n".join(out)


def _sentence(text, limit=160):
    first = text.split(". ")[0]
    return first if len(first) <= limit else first[:limit - 1] + "…"


def main(path):
    data = json.load(open(path))
    benches = data["benchmarks"]
    print(f"Machine: {_machine(data)}\n")
    for table in (lanczos_table(benches), roofline_table(benches), torch_table(benches),
                  distributed_table(benches), gpu_roofline_table(benches), gpu_lambda_table(benches),
                  peers_table(benches), products_table(benches), criteria_table(benches), ratios_table(benches)):
        if table:
            print(table + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
