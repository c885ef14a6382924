"""A tiny channel store for the ablation tests: layer 1 of the tiny Llama (three sides, four
neurons, three channels each) with its activation thresholds, and the app around it."""

from datetime import UTC, datetime
from pathlib import Path

from channelscope.core import db
from channelscope.core import tables as T
from channelscope.method import rotate
from channelscope.method.decomposer import Decomposer
from channelscope.method.intervention import load_language_model
from channelscope.method.weights import load_model
from channelscope.worker import corpus, store

LAYER, NEURONS = 1, [0, 1, 2, 3]
TEXTS = [
    "The capital of France is Paris. The capital of Japan is Tokyo.",
    "She went to the market and bought apples, pears and bread.",
    "def main():\n    print('hello world')\n    return 0\n",
    "In 1999, the numbers rose from 12 to 345 and then to 6789.",
]
PROMPT = "The capital of France is Paris. She went to the market."


def fill_store(url: str, gguf: Path, cache: Path) -> str:
    """A tiny run (layer 1, three sides, four neurons, three channels) and its thresholds."""
    model = load_model(gguf)
    # t = 3: the tiny vocabulary (512 tokens) rarely has z > 6, and a channel must claim tokens.
    settings = rotate.with_overrides(rotate.Settings(), channels=3, mask_z=3.0)
    decomposer = Decomposer(model, settings, reference_count=8, cache_dir=cache)
    engine = db.make_engine(url)
    with db.session(engine) as session:
        model_row = store.ensure_model(session, model)
        reference = store.ensure_reference(session, model_row, decomposer.reference_key, decomposer.reference)
        run = store.ensure_run(
            session, model_row, store.run_settings(settings, "unembedding", 8), 0, reference
        )
        for side in model.sides:
            shard = T.Shard(run_id=run.id, layer=LAYER, side=side, neuron_start=0, neuron_stop=len(NEURONS))
            session.add(shard)
            session.flush()
            store.write_neurons(session, run, shard, decomposer.neurons(LAYER, side, NEURONS))
            shard.done_at = datetime.now(UTC)
        lm = load_language_model(gguf)
        sequences = corpus.encode(lm, TEXTS)
        thresholds = corpus.activation_thresholds(lm, sequences)
        corpus.store_thresholds(session, model_row.id, "test", 0.9, sum(map(len, sequences)), thresholds)
        session.commit()
        run_hash = run.hash
    engine.dispose()
    return run_hash


def make_app(url: str, model_dirs: list[Path], **runtime):
    from channelscope.web.main import create_app
    from channelscope.web.runtime import ModelRuntime

    app = create_app(url)
    app.state.runtime = ModelRuntime(model_dirs, "cpu", **({"max_runs": 2, "timeout_s": 60.0} | runtime))
    return app
