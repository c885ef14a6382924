"""Commands that write the scientific reports under reports/."""

from __future__ import annotations

import os
from pathlib import Path

from channelscope.cli.common import CliError, database, int_range, load, log, progress_bar, references_dir


def cmd_eval(args) -> None:
    from channelscope.experiments.eval_report import evaluate, render

    if args.render:
        print(f"wrote {render(args.out)} from {args.out / 'eval.json'}")
        return
    model = load(args.model)
    evaluate(model, args.out, per_cell=args.per_cell, channels=args.channels, aligned=args.aligned,
             seed=args.seed, cache_dir=references_dir(), progress=progress_bar,
             held_out=args.held_out, paper=args.paper, planted=args.planted,
             reconstruction_channels=args.reconstruction_channels,
             reconstruction_sample=args.reconstruction_sample)  # fmt: skip
    print(f"wrote {args.out / 'eval.md'}")


def _thresholds(engine, model) -> dict | None:
    """Each layer's activation thresholds from the stored pass over the real corpus
    (`channelscope activations`), or None: the evaluation then takes each neuron's quantile over
    the committed corpus itself, exactly, and stores nothing."""
    from channelscope.core import db
    from channelscope.worker import activations, store

    with db.session(engine) as session, session.begin():
        stored = activations.layer_thresholds(session, store.ensure_model(session, model).id)
    if len(stored) == model.n_layers:
        return stored
    log("no activation pass is stored: thresholds over the committed corpus, computed as needed, not stored")
    return None


def cmd_eval_ablation(args) -> None:
    import time

    from channelscope.core import db
    from channelscope.experiments import ablation_report
    from channelscope.method import rotate
    from channelscope.method.decomposer import Decomposer
    from channelscope.method.intervention import load_language_model

    if args.render:
        print(f"wrote {ablation_report.render(args.out)} from {args.out / 'ablation.json'}")
        return
    started = time.monotonic()
    model = load(args.model)
    layers = int_range(args.layers, "--layers")
    if max(layers) >= model.n_layers:
        raise CliError(f"--layers: {model.name} has layers 0-{model.n_layers - 1}")
    _, engine = database(migrate=True)
    lm = load_language_model(model.source)
    thresholds = _thresholds(engine, model)
    settings = rotate.with_overrides(rotate.Settings(), channels=args.channels)
    decomposer = Decomposer(model, settings, device=args.device, seed=args.seed, cache_dir=references_dir())
    with db.session(engine) as session:
        result = ablation_report.evaluate(
            model, lm, decomposer, session, thresholds, layers, per_cell=args.per_cell, aligned=args.aligned,
            channels=args.channels, draws=args.draws, texts=args.texts, seed=args.seed,
            out_vectors=args.out_vectors, log=log,
        )  # fmt: skip
    command = (
        f"channelscope eval-ablation {args.model} --layers {args.layers} --per-cell {args.per_cell} "
        f"--aligned {args.aligned} --channels {args.channels} --draws {args.draws} --texts {args.texts} "
        f"--seed {args.seed}" + (f" --out-vectors {args.out_vectors}" if args.out_vectors is not None else "")
    )
    result["run"] |= {"command": command, "wall_seconds": round(time.monotonic() - started, 1)}
    print(f"wrote {ablation_report.write(result, args.out)}")


def cmd_behaviour(args) -> None:
    from channelscope.core.config import config
    from channelscope.experiments import behaviour_report
    from channelscope.method import precision, rotate
    from channelscope.method.decomposer import Decomposer
    from channelscope.method.intervention import load_language_model
    from channelscope.worker import corpus

    if args.render:
        print(f"wrote {behaviour_report.render(args.out)} from {args.out / 'behaviour.json'}")
        return
    model = load(args.model)
    layers = int_range(args.layers, "--layers")
    if max(layers) >= model.n_layers:
        raise CliError(f"--layers: {model.name} has layers 0-{model.n_layers - 1}")
    built = corpus.ensure_built(config().data_dir, log)
    lm = load_language_model(model.source)
    settings = rotate.with_overrides(rotate.Settings(), channels=args.channels)
    decomposer = Decomposer(model, settings, device=args.device, seed=args.seed, cache_dir=references_dir())
    texts = list(built.texts[: args.documents] if args.documents else built.texts)
    result = behaviour_report.evaluate(
        model, lm, decomposer, texts, built.key, layers,
        aligned=args.aligned, random=args.random, seed=args.seed, log=log,
    )  # fmt: skip
    documents = f" --documents {args.documents}" if args.documents else ""
    result["command"] = (
        f"channelscope behaviour {args.model} --layers {args.layers} --aligned {args.aligned} "
        f"--random {args.random} --channels {args.channels}{documents} --seed {args.seed}"
    )
    result["cpu"] = f"{precision.cpu_model()} ({os.cpu_count()} cores)"
    print(f"wrote {behaviour_report.write(result, args.out)}")


def add_commands(sub) -> None:
    p = sub.add_parser(
        "eval", help="the scientific report: channels against random vectors (reports/eval.md)"
    )
    p.add_argument("model", nargs="?", default="smollm2")
    p.add_argument("--per-cell", type=int, default=8, help="random neurons per layer group and side")
    p.add_argument("--aligned", type=int, default=8, help="highest-kurtosis late neurons per side")
    p.add_argument("--channels", type=int, default=10)
    p.add_argument(
        "--planted", type=int, default=8, help="token and generic directions planted per cosine (0: none)"
    )
    p.add_argument("--reconstruction-channels", type=int, default=50, help="C of the paper's reconstruction")
    p.add_argument(
        "--reconstruction-sample", type=int, default=8, help="aligned and random late out vectors (0: none)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--held-out", type=int, default=64, help="random vectors outside the reference, to check the score"
    )
    p.add_argument(
        "--paper",
        type=int,
        default=0,
        help="random and aligned neurons each to decompose with the paper preset too",
    )
    p.add_argument("--out", type=Path, default=Path("reports"))
    p.add_argument("--render", action="store_true", help="only rewrite eval.md and its plots from eval.json")
    p.set_defaults(uses_torch=True, run=cmd_eval, default_channels=10)

    p = sub.add_parser(
        "behaviour", help="do channels say what their neuron does on real text? (reports/behaviour.md)"
    )
    p.add_argument("model", nargs="?", default="smollm2")
    p.add_argument("--layers", default="5,15,25", help="layers to sample (default 5,15,25)")
    p.add_argument("--aligned", type=int, default=8, help="most aligned vectors per layer and side")
    p.add_argument("--random", type=int, default=8, help="random vectors per layer and side")
    p.add_argument("--channels", type=int, default=5)
    p.add_argument(
        "--documents", type=int, default=None, help="run the model over the first N documents (default: all)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda ... (default: auto)")
    p.add_argument("--out", type=Path, default=Path("reports"))
    p.add_argument("--render", action="store_true", help="only rewrite behaviour.md from behaviour.json")
    p.set_defaults(uses_torch=True, run=cmd_behaviour)

    p = sub.add_parser(
        "eval-ablation", help="selectivity of channel ablations, weights and real model (reports/ablation.md)"
    )
    p.add_argument("model", nargs="?", default="smollm2")
    p.add_argument("--layers", default="2,8,14,20,25,29", help="layers to sample (default 2,8,14,20,25,29)")
    p.add_argument("--per-cell", type=int, default=2, help="random neurons per layer and side (default 2)")
    p.add_argument(
        "--aligned", type=int, default=2, help="highest-kurtosis neurons per layer and side (default 2)"
    )
    p.add_argument(
        "--out-vectors", type=int, default=None,
        help="random and aligned out vectors per layer, each (default: as --per-cell and --aligned)",
    )  # fmt: skip
    p.add_argument("--channels", type=int, default=None, help="first channels of each neuron (default 5)")
    p.add_argument("--draws", type=int, default=8, help="random directions per channel (default 8)")
    p.add_argument("--texts", type=int, default=4, help="corpus texts per out neuron for forward passes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="for decomposing missing channels (default: auto)")
    p.add_argument("--out", type=Path, default=Path("reports"))
    p.add_argument(
        "--render", action="store_true", help="only rewrite ablation.md and its plots from ablation.json"
    )
    p.set_defaults(uses_torch=True, run=cmd_eval_ablation, default_channels=5)
