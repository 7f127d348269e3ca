"""Tables of docs/*.md generated from the JSON files under docs/, each after its `<!-- table NAME ... -->` marker.

    python docs/tables.py            # rewrite them;  --check: exit 1 where a page differs (the tests run it)
"""
import json
import re
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent


def rows(name: str) -> list[dict]:
    """The rows of a results JSON under docs/."""
    return json.loads((DOCS / name).read_text())["rows"]


def source(name: str) -> str:
    """The line under a table that names its runs' date and machine, as its JSON records them."""
    found = json.loads((DOCS / name).read_text())
    machine = found["machine"]
    if isinstance(machine, dict):
        machine = machine.get("cpu") or machine["device"]
    depth = 0
    for i, c in enumerate(machine):  # the CPU up to its first bracket's end; its settings stay in the JSON
        depth += (c == "(") - (c == ")")
        if c == ")" and depth == 0:
            machine = machine[:i + 1]
            break
    dates = sorted({found.get("date") or found["machine"]["date"]} | {r["date"] for r in found["rows"] if "date" in r})
    return f"Runs of {' and '.join(dates)}, {machine} (`{name}`)."


def table(columns: list[str], body: list[str], name: str) -> list[str]:
    """A Markdown table: the header of columns, its separator, the body's lines, then the runs' date and machine as
    the JSON `name` records them."""
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns), *body, "", source(name)]


def one_step(name: str = "one-step/xeon.json") -> list[str]:
    """One step from make train's flow, routes at equal added minutes: each reading's excess Fréchet by both readers
    (its ratio to the flow's own excess at its recorded sampler, the first row), digits as asked, and per-class
    precision / recall in the reader's features; readings at two noise seeds are averaged."""
    routes = rows(name)
    flow = routes[0]["readings"][0]
    body = []
    for row in routes:
        added = "—" if row["added_minutes"] is None else f"{row['added_minutes']:.1f}"
        for r in row["readings"]:
            cells = [f"{r[k]:.{2 if k == 'bn' else 1}f} ({r[k] / flow[k]:.1f}x, {r[f'{k}_accuracy']:.1%}, "
                     f"{r[f'{k}_precision']:.2f} / {r[f'{k}_recall']:.2f})" for k in ("cnn", "bn")]
            seeds = f" (seeds {', '.join(map(str, r['seeds']))})" if len(r.get("seeds", [0])) > 1 else ""
            body.append(f"| {row['route']} | {added} | {r['sampler']}{seeds} | {r['nfe']} | {' | '.join(cells)} |")
    return table(["route (commands in the JSON)", "minutes after the flow", "sampler", "NFE",
                  "CNN: excess (x flow, as asked, P / R)", "BN-CNN: excess (x flow, as asked, P / R)"], body, name)


def one_step_photos(name: str = "one-step/cifar-xeon.json") -> list[str]:
    """The committed photo flow and its one-step conversion: Inception FID at N = 1,000, the excess over the floor and
    its ratio to the flow's (the first row)."""
    found = rows(name)
    flow = found[0]["excess"]
    return table(["model", "minutes after the flow", "sampler", "NFE", "Inception FID", "excess (x flow)"],
                 [f"| {r['model']} | {r['added_minutes'] or '—'} | {r['solver']} {r['steps']}, w = {r['guidance']:g} | "
                  f"{r['nfe']} | {r['fid']:.1f} | {r['excess']:.1f} ({r['excess'] / flow:.1f}x) |" for r in found],
                 name)


def backbones(name: str = "results-mnist/zen4-backbones.json") -> list[str]:
    """U-Net against DiT on MNIST at equal minutes: steps, speed and both readers at N = 4,000."""
    body = []
    for r in rows(name):
        bn = "not read" if r["bn_accuracy"] is None else f"{r['bn_accuracy']:.1%}, {r['bn_excess']:.2f}"
        speed = "—" if r["img_per_s_step"] is None else f"{r['img_per_s_step']:.0f}"
        body.append(f"| {r['run']} | {r['params_M']:.2f}M | {r['steps']} | {speed} | "
                    f"{r['cnn_accuracy']:.1%}, {r['cnn_excess']:.1f} | {bn} |")
    return table(["run (commands in the JSON)", "parameters", "steps", "img/s (step)", "CNN: as asked, excess",
                  "BN-CNN: as asked, excess"], body, name)


def preset_change(name: str = "results-mnist/zen4-two-thirds.json") -> list[str]:
    """The MNIST preset before and after its two-thirds-time recipe: minutes, speed and both readers at N = 4,000."""
    return table(["run (commands in the JSON)", "minutes", "steps", "img/s", "CNN: as asked, excess",
                  "BN-CNN: as asked, excess"],
                 [f"| {r['run']} | {r['minutes']:.1f} | {r['steps']} | {r['img_per_s'] or '—'} | "
                  f"{r['cnn_accuracy']:.1%}, **{r['cnn_excess']:.1f}** | {r['bn_accuracy']:.1%}, {r['bn_excess']:.2f} |"
                  for r in rows(name)], name)


def mnist_sweep(name: str, first: str) -> list[str]:
    """`benchmark.py nfe` or `guidance` on a committed MNIST model: accuracy and excess per setting (CNN reader)."""
    body = []
    for r in rows(name):
        steps = f"tol {r['rtol']:g}" if r["solver"] == "dopri5" else r["steps"]
        body.append(f"| {r['solver']} {steps}, w = {r['guidance']:g} | {r['nfe']} | {r['accuracy']:.1%} | "
                    f"**{r['frechet'] - r['floor']:.1f}** |")
    return table([first, "NFE", "as asked", "excess Fréchet"], body, name)


def sampler_name(r: dict) -> str:
    """A row's sampler, e.g. 'euler 16, w = 2', and the noise seeds its FID averages where more than seed 0."""
    seeds = r.get("seeds", [0])
    return f"{r['solver']} {r['steps_sampler']}, w = {r['guidance']:g}" + (
        f" (mean of seeds {', '.join(map(str, seeds))})" if seeds != [0] else "")


def photos(name: str) -> list[str]:
    """CIFAR-10 runs at equal minutes: Inception FID at N = 1,000 beside the real-vs-real floor at the same N."""
    return table(["run", "sampler", "parameters", "minutes", "steps", "img/s", "FID", "floor", "excess"],
                 [f"| {r['run']} | {sampler_name(r)} | {r['params_M']:.2f}M | {r['minutes']:.1f} | {r['steps']} | "
                  f"{r['img_per_s']:.0f} | {r['fid']:.1f} | {r['floor']:.1f} | **{r['fid'] - r['floor']:.1f}** |"
                  for r in rows(name)], name)


def photo_samplers(name: str = "results-cifar/zen4-sampler.json") -> list[str]:
    """One CIFAR-10 model under several samplers: Inception FID at N = 1,000 and its excess over the floor."""
    return table(["sampler", "NFE", "FID", "excess"],
                 [f"| {sampler_name(r)} | {r['nfe']} | {r['fid']:.1f} | **{r['fid'] - r['floor']:.1f}** |"
                  for r in rows(name)], name)


def fid_sizes(name: str = "cifar/fid_sizes.json") -> list[str]:
    """`benchmark.py fid-sizes`: the FID of real and generated photos against the same reference, per N."""
    by = {(r["set"], r["n"]): r for r in rows(name)}
    sizes = sorted({n for _, n in by})
    return table(["N", *(f"{s} FID (mean of subsets)" for s in ("real", "generated")), "excess"],
                 [f"| {n:,} | {by['real', n]['fid_mean']:.1f} ({by['real', n]['subsets']}) | "
                  f"{by['generated', n]['fid_mean']:.1f} ({by['generated', n]['subsets']}) | "
                  f"{by['generated', n]['fid_mean'] - by['real', n]['fid_mean']:.1f} |" for n in sizes], name)


TABLES = {  # page -> {table: its rows}
    "one-step.md": {"one-step": one_step, "one-step-photos": one_step_photos},
    "results-mnist.md": {"solvers": lambda: mnist_sweep("results-mnist/xeon-solvers.json", "solver, steps"),
                         "guidance": lambda: mnist_sweep("results-mnist/xeon-guidance.json", "sampler"),
                         "preset-change": preset_change, "make-train-xeon": lambda: preset_change(
        "results-mnist/xeon-make-train.json"), "backbones": backbones},
    "results-cifar.md": {"photos-60": lambda: photos("results-cifar/zen4-60min.json"),
                         "photos-xeon": lambda: photos("results-cifar/xeon-60min.json"),
                         "photo-samplers": photo_samplers, "fid-sizes": fid_sizes},
}


def main(argv: list[str]) -> int:
    stale = []
    for page, tables in TABLES.items():
        text = old = (DOCS / page).read_text()
        for name, make in tables.items():
            marker = f"<!-- table {name}: generated by docs/tables.py -->\n"
            assert marker in text, f"docs/{page} lost the marker of table {name}: {marker}"
            table_and_source = re.escape(marker) + r"(?:\|.*\n)*(?:\nRuns of .*\n)?"
            text = re.sub(table_and_source, lambda _: marker + "\n".join(make()) + "\n", text)
        if text != old:
            stale.append(page)
            if "--check" not in argv:
                (DOCS / page).write_text(text)
    print(f"{'stale' if '--check' in argv else 'rewrote'}: {', '.join(stale)}" if stale else "up to date")
    return 1 if stale and "--check" in argv else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
