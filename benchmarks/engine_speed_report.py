"""engine_speed.py's markdown: one table of every peer's rows, the ratios the issue asks for,
the served weights' perplexity and what each column means."""

from __future__ import annotations

from readmoe.models.device import Placement


def read_bandwidth_text(result: dict) -> str:
    """'27.1 GB/s on 1 thread (torch's sum 18.2), ...': the roofline's bandwidth per thread
    count beside one stream a thread's."""
    parts = []
    for count, read in result["read_bandwidth"].items():
        parts.append(f"{read['best']:.1f} GB/s on {count} thread{'s' if int(count) > 1 else ''} "
                     f"(torch's sum {read['sum']:.1f})")
    return ", ".join(parts)


def contention_text(r: dict) -> str:
    """'97%, 0.1%' (slowest read of the best, CPU time stolen), 'contended' added when either
    is past its limit."""
    if "read_of_best" not in r:
        return ""
    return (f"{r['read_of_best']:.0%}, {r['stolen_share']:.1%}"
            + (" contended" if r["contended"] else ""))


def markdown(result: dict, described: str, dense: str, placement: Placement,
             peers: tuple[str, ...]) -> str:
    """The results as one table of every peer's rows (in the order of ``peers``), then the
    comparisons the issue asks."""
    rows, args = result["rows"], result
    products = ("the fused ops' panels (the `-onednn` rows: oneDNN's prepacked copies)"
                if args.get("panels") else "oneDNN's prepacked copies")
    lines = ["# Decode speed: the engine beside HF generate and llama.cpp, and the machine's "
             "limits", "",
             f"ReadME model: {described}; dense model: {dense}; {placement.describe()}; "
             f"{args['prompt_len']}-token prompts mixed over domains, {args['new_tokens']} new "
             f"tokens, greedy; measured read bandwidth {read_bandwidth_text(args)}; "
             f"fused CPU ops {'on' if args.get('fused_cpu_ops') else 'off'} for the engine rows "
             f"(the `-torch-ops` rows keep torch's); products of 2-48 rows (1-48 where "
             f"`panel_min_rows` is 1: the AVX2 panels) through {products}.",
             "", f"Command: `{result['command']}`  ", f"Machine: {result['machine']}", "",
             "| threads | batch | peer | weights | precision | MB read / token | tok/s | "
             "x HF, same weights | roofline tok/s | of roofline | matmul floor tok/s | of floor "
             "| of best-step floor | experts / step | slowest read of best, CPU stolen |",
             "|---:|---:|---|---|---|" + "---:|" * 10]
    hf = {(r["weights"], r["threads"], r["batch"]): r["tokens_per_s"]
          for r in rows if r["peer"] in ("hf", "hf-dense")}
    order = {peer: i for i, peer in enumerate(peers)}
    for r in sorted(rows, key=lambda r: (r["threads"], r["batch"], order[r["peer"]])):
        base = hf.get((r["weights"], r["threads"], r["batch"]))
        vs_hf = "" if base is None else f"{r['tokens_per_s'] / base:.2f}x"
        floor, of_floor, of_best, experts = "", "", "", ""
        if "matmul_floor_tokens_per_s" in r:
            floor = f"{r['matmul_floor_tokens_per_s']:.1f}"
            of_floor = f"{r['fraction_of_floor']:.0%}"
            of_best = f"{r['fraction_of_best_step_floor']:.0%}"
            experts = f"{r['distinct_experts_per_decode_step']:.2f}"
        lines.append(
            f"| {r['threads']} | {r['batch']} | {r['peer']} | {r['weights']} | {r['precision']} "
            f"| {r['bytes_per_token'] / 1e6:.1f} | {r['tokens_per_s']:.1f} | {vs_hf} | "
            f"{r['roofline_tokens_per_s']:.1f} | {r['fraction_of_roofline']:.0%} | {floor} | "
            f"{of_floor} | {of_best} | {experts} | {contention_text(r)} |")
    rate = {(r["peer"], r["threads"], r["batch"]): r["tokens_per_s"] for r in rows}
    contended = {(r["peer"], r["threads"], r["batch"]) for r in rows if r.get("contended")}
    for peer, versus, label in (
            ("engine", "engine-torch-ops", "Engine with its fused CPU ops over the same engine "
             "with torch ops (ReadME model)"),
            ("engine-dense", "engine-dense-torch-ops", "The same on the dense model"),
            ("engine", "engine-onednn", "Engine with the panel products over the same engine "
             "with oneDNN's prepacked copies (ReadME model)"),
            ("engine-dense", "engine-dense-onednn", "The same on the dense model"),
            ("engine-kvf16", "engine", "Engine with a float16 KV cache over the same engine "
             "with a float32 one (ReadME model)"),
            ("engine-dense-kvf16", "engine-dense", "The same on the dense model"),
            ("engine", "engine-eager", "Engine replaying its decode steps from CUDA graphs over "
             "the same engine run eagerly (ReadME model)"),
            ("engine-dense", "engine-dense-eager", "The same on the dense model"),
            ("engine-dense", "llama.cpp-f32", "Engine on the dense model over llama.cpp F32 on "
             "the same weights (the same work)"),
            ("engine-dense-kvf16", "llama.cpp-f32", "The same with the engine's KV cache in "
             "float16, as llama.cpp's"),
            ("engine-dense-int8", "llama.cpp-quantized", "Engine int8 on the dense model over "
             "llama.cpp's quantized GGUF"),
            ("engine-bf16", "engine", "Engine with bf16 weights (--quantize bf16) over the same "
             "engine in float32 (ReadME model)"),
            ("engine-dense-bf16", "engine-dense", "The same on the dense model")):
        pairs = [(t, b, rate[(peer, t, b)] / rate[(versus, t, b)],
                  {(peer, t, b), (versus, t, b)} & contended)
                 for (name, t, b) in rate if name == peer and (versus, t, b) in rate]
        if pairs:
            lines += ["", f"{label}: " + ", ".join(
                f"{t} thread(s) batch {b}: {x:.2f}x" + (" (contended)" if busy else "")
                for t, b, x, busy in pairs) + "."]
    if result.get("served_quality"):
        tokens = result["served_quality"][0]["tokens_per_domain"]
        lines += ["", f"Held-out perplexity of the weights as the engine serves them (through "
                  f"its runner; {tokens} tokens per domain, 256-token windows):", "",
                  "| weights | precision | mean ppl | " + " | ".join(
                      sorted(result["served_quality"][0]["ppl"])) + " |",
                  "|---|---|---:|" + "---:|" * len(result["served_quality"][0]["ppl"])]
        for q in result["served_quality"]:
            lines.append(f"| {q['weights']} | {q['precision']} | {q['mean_ppl']:.2f} | "
                         + " | ".join(f"{q['ppl'][d]:.2f}" for d in sorted(q["ppl"])) + " |")
    for line in result["missing"]:
        lines += ["", f"**Missing rows `{line['peer']}`**: {line['reason']}."]
    lines += ["", "MB read / token: weight bytes one decode step reads, over the batch. Matmul "
              "floor: the engine's packed matrix products alone, on the rows its own decode "
              "steps routed to each expert, run as the engine runs them (where a step is "
              "one parallel region, that region with every other op skipped; on CUDA each "
              "step replayed from a CUDA graph) and timed as "
              "the engine is (best of the repeats of a whole run of decode steps, per step; "
              "'of best-step floor' divides by the best single step instead); no engine built on "
              "these kernels beats it on this machine (at batch 1 they stream the weights from "
              "memory, at batch 32 they are compute-bound). Outside it: attention (the KV "
              "cache's bytes), norms, activations, the router's step, sampling. Slowest read "
              "of best, CPU stolen (`benchmarks/contention.py`): a 256 MiB read timed before "
              "each timed run of a row, the slowest over the best read at its thread count in "
              "the whole run; and the share of the runs' CPU time the hypervisor stole "
              f"(`/proc/stat`). A row below {result['quiet']:.0%} or past "
              f"{result['max_stolen']:.0%} stolen is contended (a neighbour took the machine's "
              "memory bandwidth or its cores; it was timed again up to `--quiet-retries` times "
              "and the quietest try kept: `tries` in the JSON), and a ratio with a contended "
              "row says '(contended)'. A burst between two reads goes unseen. Each row's "
              "`command` in the JSON says how it was produced."]
    return "\n".join(lines)
