"""The `channelscope` command. Each subcommand imports what it needs when it runs, so `--help`
stays instant; bad input ends with one line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import argparse
import json
import math
import sys

from channelscope.settings import config
from channelscope.tokens import visible


class CliError(Exception):
    """A problem with the user's input, reported as one line."""


def _int_range(text: str) -> list[int]:
    """`20-29`, `3`, `0-3,7` -> a sorted list of ints."""
    values: set[int] = set()
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            values.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a range like 20-29 or 0-3,7") from None
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r} is an empty range")
    return sorted(values)


def _progress(total: int, label: str):
    """A tqdm bar on stderr; returns the callback that advances it."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc=label, unit="ch", file=sys.stderr, leave=False, dynamic_ncols=True)

    def advance(n: int) -> None:
        bar.update(n)
        if bar.n >= bar.total:
            bar.close()

    return advance


def _settings(args):
    from worker import rotate

    base = rotate.PAPER if args.solver == "paper" else rotate.Settings()
    return rotate.with_overrides(
        base,
        channels=args.channels,
        precision=args.precision,
        downweight_generic=args.downweight_generic or None,
    )


def _load(spec: str):
    from worker.weights import ModelError, load_model

    try:
        return load_model(spec)
    except ModelError as error:
        raise CliError(str(error)) from None


# --- rotate --------------------------------------------------------------------------------------


def cmd_rotate(args) -> None:
    from worker.analysis import Decomposer

    model = _load(args.model)
    if not 0 <= args.layer < model.n_layers:
        raise CliError(f"layer {args.layer} is out of range: {model.name} has layers 0-{model.n_layers - 1}")
    if not 0 <= args.neuron < model.d_mlp:
        raise CliError(f"neuron {args.neuron} is out of range: layers have neurons 0-{model.d_mlp - 1}")
    if args.side not in model.sides:
        raise CliError(f"unknown side {args.side!r}: {model.name} has sides {', '.join(model.sides)}")
    settings = _settings(args)
    decomposer = Decomposer(
        model,
        settings,
        device=args.device,
        seed=args.seed,
        cache_dir=config().data_dir / "references",
        progress=_progress,
    )
    on_channel = _progress(settings.channels, f"layer {args.layer} {args.side} neuron {args.neuron}")
    (record,) = decomposer.neurons(args.layer, args.side, [args.neuron], on_channel)
    tokens = model.vocabulary.tokens
    if args.json:
        print(json.dumps(_rotate_json(model.name, record, tokens), ensure_ascii=False))
    else:
        _rotate_table(model.name, record, tokens)


def _number(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), 6)


def _rotate_json(model_name: str, record, tokens: list[str]) -> dict:
    return {
        "model": model_name,
        "layer": record.layer,
        "neuron": record.neuron,
        "side": record.side,
        "neuron_kurtosis": _number(record.kurtosis),
        "channels": [
            {
                "index": ch.index,
                "kurtosis": _number(ch.kurtosis),
                "skew": _number(ch.skew),
                "cos": _number(ch.cos),
                "loss": _number(ch.loss),
                "masked": int(len(ch.masked)),
                "step": ch.step,
                "alpha": _number(ch.alpha),
                "faithfulness": _number(ch.faithfulness),
                "faithfulness_percentile": _number(ch.faithfulness_percentile),
                "generic": ch.generic,
                "top_tokens": [
                    {"id": int(i), "token": tokens[i], "z": _number(z)}
                    for i, z in zip(ch.top_ids, ch.top_z, strict=True)
                ],
            }
            for ch in record.channels
        ],
        "reconstruction": [_number(x) for x in record.reconstruction],
        "reconstruction_baseline": [_number(x) for x in record.reconstruction_baseline],
    }


def _rotate_table(model_name: str, record, tokens: list[str]) -> None:
    print(
        f"{model_name}  layer {record.layer}  neuron {record.neuron}  side {record.side}  "
        f"|w| {record.norm:.3f}  kurtosis {record.kurtosis:.2f}"
    )
    print("  #   kurt   skew    cos    loss  masked  step  alpha  faith  pct  top tokens")
    for ch in record.channels:
        flag = " generic" if ch.generic else ""
        top = "  ".join(visible(tokens[i]) for i in ch.top_ids[:8])
        numbers = (
            f"{ch.index:3d} {ch.kurtosis:6.1f} {ch.skew:6.2f} {ch.cos:6.3f} {ch.loss:7.3f} "
            f"{len(ch.masked):7d} {ch.step:5d} {ch.alpha:6.3f} {ch.faithfulness:6.2f} "
            f"{ch.faithfulness_percentile:4.0f}"
        )
        print(f"{numbers}  {top}{flag}")
    recon = " ".join(f"{x:.2f}" for x in record.reconstruction)
    base = " ".join(f"{x:.2f}" for x in record.reconstruction_baseline)
    print(f"reconstruction |P_k w|/|w|: {recon}\n  random vectors at the same cosines: {base}")
    print(
        "faith = mean z of the channel's top tokens in the neuron's own projection; pct = its "
        "percentile against random vectors' channels"
    )


# --- serve ---------------------------------------------------------------------------------------


def cmd_serve(args) -> None:
    import uvicorn
    from sqlalchemy.exc import SQLAlchemyError

    from channelscope import db

    # Like the worker, serve only checks the schema (decompose and `db upgrade` migrate it): a
    # web process of older code must never migrate a shared database under the others.
    try:
        current, head = db.current_revision(db.engine()), db.head_revision()
        if current != head:
            print(
                f"warning: the database is at migration {current}, not {head}: channelscope db upgrade",
                file=sys.stderr,
            )
    except SQLAlchemyError as error:
        print(f"warning: the database is unreachable for now ({str(error).splitlines()[0]})", file=sys.stderr)
    shown = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host
    print(f"Channelscope is serving at http://{shown}:{args.port}/", flush=True)
    uvicorn.run(
        "app.main:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level="warning",
    )


# --- the parser ----------------------------------------------------------------------------------


def _add_solver_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--channels", type=int, default=None, help="channels per vector (default 50; rotate: 5)")
    p.add_argument("--solver", choices=["fast", "paper"], default="fast")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None, help="GEMM precision against U")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: auto)")
    p.add_argument(
        "--downweight-generic",
        action="store_true",
        help="down-weight the tokens on the tails of many random vectors' channels (off by default)",
    )


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="channelscope", description=__doc__.splitlines()[0])
    sub = top.add_subparsers(dest="command", required=True)

    p = sub.add_parser("rotate", help="decompose one neuron vector and print its channels")
    p.add_argument("model", help="smollm2, a .gguf file or a Hugging Face model folder")
    p.add_argument("layer", type=int)
    p.add_argument("neuron", type=int)
    p.add_argument("--side", default="out", help="gate, in or out (default out)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _add_solver_options(p)
    p.set_defaults(run=cmd_rotate, default_channels=5)

    p = sub.add_parser("serve", help="the web app: browse neurons, search channels by token")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="default 8000")
    p.add_argument("--workers", type=int, default=1, help="web processes (default 1)")
    p.set_defaults(run=cmd_serve)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if getattr(args, "channels", 0) is None:
        args.channels = args.default_channels
    if getattr(args, "channels", 1) is not None and args.channels < 1:
        print("error: --channels must be at least 1", file=sys.stderr)
        return 2
    if hasattr(args, "device") and args.device is None:
        args.device = config().device
    try:
        args.run(args)
    except CliError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
