"""`python -m experiments.figures <name> [options]`: one figure; `all`: every figure on one shared model.

With `all`, --out is the root (each figure writes <out>/<name>/, runs are reused from <out>/runs), options
that only some figures know go to those figures, and a single --concept is paired with a default second
concept for the composition figure.
"""

from __future__ import annotations

import logging
import sys
import time

from experiments.figures import FIGURES, figure_module

log = logging.getLogger("experiments.figures")

USAGE = (
    f"usage: python -m experiments.figures <{'|'.join(FIGURES)}|all> [--model tiny] [--concept cat] "
    "[--run DIR] [--out DIR] [--steps N] [--n N] [--seed S] [--device D] …; add --help after a name"
)


def _value(argv: list[str], flag: str) -> str | None:
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def _without(argv: list[str], flag: str) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == flag:
            skip = True
            continue
        if not a.startswith(flag + "="):
            out.append(a)
    return out


def _parser(name: str, module):
    from experiments.figures import _common as C

    p = C.base_parser(name, "")
    module.add_arguments(p)
    return p


def run_all(argv: list[str]) -> int:
    """Every figure in turn, sharing one model, one CLIP and the trained runs."""
    from pathlib import Path

    from experiments.figures import _common as C

    root = Path(_value(argv, "--out") or C.OUT_ROOT)
    base = _without(argv, "--out")
    if _value(base, "--runs-dir") is None:
        base += ["--runs-dir", str(root / "runs")]
    modules = {name: figure_module(name) for name in FIGURES}
    parsers = {name: _parser(name, m) for name, m in modules.items()}
    for a in base:
        flag = a.split("=")[0]
        if a.startswith("--") and not any(flag in p._option_string_actions for p in parsers.values()):
            raise C.FigureError(f"no figure takes {flag}; see python -m experiments.figures <name> --help")
    ctx = None
    started = time.time()
    done = []
    for name, m in modules.items():
        argv_f = _strip_unknown(base, parsers[name]) + ["--out", str(root / name)]
        if name == "composition":
            known = parsers[name].parse_args(argv_f)
            concepts = C.split_list(known.concept)
            if len(C.split_list(known.run)) == 1:
                log.warning("composition skipped: it needs two learned words and RUN= names one")
                continue
            if len(concepts) == 1:
                partner = next(c for c in ("cat", "shapes-ring", "shapes-heart") if c != concepts[0])
                argv_f = _without(argv_f, "--concept") + ["--concept", f"{concepts[0]},{partner}"]
        if ctx is None:
            ctx = C.Context(C.finish_args(parsers[name].parse_args(argv_f)))
            ctx.scorer()  # bias and tradeoff need CLIP: a missing file fails now, not an hour later
        result = C.run_figure(m, argv_f, ctx)
        done.append((name, result["png"]))
    print(f"figures: {len(done)} written under {root} in {time.time() - started:.0f} s")
    return 0


def _strip_unknown(argv: list[str], parser) -> list[str]:
    """argv without the options (and their values) that this parser does not know."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--") and a.split("=")[0] not in parser._option_string_actions:
            takes_value = "=" not in a and i + 1 < len(argv) and not argv[i + 1].startswith("--")
            i += 2 if takes_value else 1
            continue
        out.append(a)
        i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    from experiments.figures import _common as C

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name == "all":
        return run_all(rest)
    C.run_figure(figure_module(name), rest)
    return 0


if __name__ == "__main__":
    from ldm import cli

    sys.exit(cli.run(main))
