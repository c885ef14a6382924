"""The page objects. Each page's HTML and its `.json` twin are rendered from one of these, so the
two cannot drift (the Datasette habit). A neuron side inside a page is
core.schemas.NeuronSideOut, the same object `channelscope export` writes.

Links are part of the data: a JSON reader can walk the site the way a person clicks through it.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from channelscope.core.schemas import ChannelOut, NeuronSideOut, TokenScore


class Problem(BaseModel):
    """The body of every error: 404, 422, 503, 504 (RFC 9457 in spirit)."""

    status: int
    title: str
    detail: str


class ModelOut(BaseModel):
    name: str
    url: str
    file: str  # the file or folder name it was read from (not the server's path to it)
    sha256: str
    n_layers: int
    d_model: int
    d_mlp: int
    vocab_size: int
    sides: list[str]


class RunOut(BaseModel):
    hash: str
    url: str  # the model page pinned to this run
    solver: str
    seed: int
    channels: int  # C, channels per vector
    projection: str
    algorithm_version: int
    created_at: datetime
    settings: dict
    # How far the run has got; None on a page pinned to the run that must never change while the
    # run grows (a neuron's own page: its channels are committed whole and never change, but a
    # run can always be extended, and asking for a neuron on a page extends it).
    shards_done: int | None
    shards_total: int | None
    neurons_done: int | None
    neurons_total: int | None
    complete: bool | None  # every shard done


class Pinning(BaseModel):
    """Which run a page shows and how to get back to exactly this view."""

    pinned: bool  # ?run= was given
    permalink: str  # this page with the run pinned


# --- home and model ---------------------------------------------------------------------------------


class ModelRuns(BaseModel):
    model: ModelOut
    runs: list[RunOut]


class HomePage(BaseModel):
    models: list[ModelRuns]
    search_url: str
    starting: str | None  # what is being computed behind the site (bin/up), while it is


class LayerSideCell(BaseModel):
    layer: int
    side: str
    url: str
    neurons: int  # with channels computed so far
    vectors: int  # the kurtosis columns are over these: every vector (overview) or the computed ones
    mean_kurtosis: float  # raw kurtosis of w @ U
    max_kurtosis: float
    mean_channels: float | None  # channels with kurtosis >= 5 per computed neuron; None without any
    best_percentile: float | None


class ModelPage(BaseModel):
    model: ModelOut
    run: RunOut | None  # the run shown: pinned, or the newest with neurons
    pinning: Pinning | None
    runs: list[RunOut]  # every run of the model, each URL pinning this page to it
    cells: list[LayerSideCell]
    random_url: str


# --- layer -----------------------------------------------------------------------------------------


class NeuronRow(BaseModel):
    neuron: int
    url: str
    kurtosis: float  # raw kurtosis of w @ U
    raw_tokens: str | None  # its own top tokens (the overview's); None without an overview
    has_channels: bool  # the channel columns below are None until a run has computed them
    # max faithfulness percentile over the non-generic channels; None without channels, or
    # when every channel is generic (there is nothing to rank: the page reads "none")
    best_percentile: float | None
    score: float | None  # measures.neuron_score; None without channels or before measures v3
    best_kurtosis: float | None
    channel_count: int | None  # channels with kurtosis >= 5
    generic_count: int | None
    reconstruction: float | None  # |P_C w| / |w| with all C channels
    reconstruction_baseline: float | None  # the same for random vectors at the channels' cosines
    # its best non-generic channel (highest faithfulness percentile) and that channel's first
    # tokens; None without channels, or when every channel is generic
    best_channel: int | None = None
    best_channel_tokens: str | None = None
    best_channel_url: str | None = None


class SortLink(BaseModel):
    sort: str
    label: str
    url: str
    active: bool


class LayerPage(BaseModel):
    model: ModelOut
    run: RunOut | None  # where the channel columns come from; None while no run has this layer
    pinning: Pinning
    layer: int
    side: str
    side_urls: dict[str, str]
    sort: str
    order: str
    sorts: list[SortLink]
    limit: int
    after: str | None
    rows: list[NeuronRow]
    first_url: str
    next_url: str | None  # keyset: the page after the last row shown
    layer_urls: dict[int, str]  # the layers with something to show on this side (never a 404)


# --- ablation ----------------------------------------------------------------------------------------


class ChannelToggle(BaseModel):
    index: int
    label: str  # its top tokens, made visible
    tail: int  # +1 / -1 (core.schemas.SIGN_CONVENTION)
    effect: str  # promotes / suppresses (out), fires on / is inhibited by (gate, in)
    kurtosis: float
    cos: float
    alpha: float  # stored alpha*, fitted on the original w
    masked: int  # |T_k|
    generic: bool
    faithfulness_percentile: float
    below_cutoff: bool
    checked: bool


class ExamplePrompt(BaseModel):
    channel: int
    text: str
    source: str  # where it came from: a corpus passage, or the channel's tokens strung together
    url: str  # the ablation of that channel on that prompt


class Controls(BaseModel):
    action: str  # the form's target: the ablation page
    run: str
    side: str
    channels: list[ChannelToggle]
    prompt: str
    examples: list[ExamplePrompt]
    max_prompt_tokens: int  # prompts are cut off beyond this many tokens


class Applied(BaseModel):
    channel: int
    alpha: float  # alpha* as applied
    refitted: bool  # refitted on the current w' (every channel after the first)
    cos: float
    masked: int


class Selectivity(BaseModel):
    value: float | None  # S; None where it is undefined (no target, or nothing changed)
    baseline_median: float | None
    baseline_low: float | None  # the draws' 10th and 90th percentiles (None for fewer than 5 finite draws)
    baseline_high: float | None
    baseline: list[float | None]  # each random draw
    note: str | None = None


class TokenMove(BaseModel):
    id: int
    token: str
    z_before: float  # in z units of the original projection
    z_after: float
    target: bool  # in T


class WeightPreview(BaseModel):
    selectivity: Selectivity
    targets: int  # |T|
    top_before: list[TokenScore]  # the neuron's top tokens (its dominant tail) before
    top_after: list[TokenScore]  # and after, z over the scored tokens of w' @ U
    tail: int  # +1 / -1: the first ablated channel's tail, which orients drops and rises
    effect: str = ""  # what that channel does to its tokens (core.schemas.effect)
    drops: list[TokenMove]  # lose most of what the channels did: fall on a +1 tail, rise on -1
    rises: list[TokenMove]
    seconds: float


class PromptToken(BaseModel):
    position: int
    id: int
    token: str
    pre_before: float | None  # read sides: x . w of this side
    pre_after: float | None
    act_before: float  # the neuron's activation act(g) * u
    act_after: float
    counted: bool  # a position S counts (read: token or next token in T; out: neuron active)
    target: bool  # the token itself is in T
    logit_drop: float | None  # out: mean oriented drop of T's next-token logits here


class NextToken(BaseModel):
    id: int
    token: str
    probability: float
    other: float  # its probability on the other side of the ablation (after, in the before list)
    target: bool


class TargetNext(BaseModel):
    """One of the channels' own tokens at the last position: its next-token probability before
    and after the ablation."""

    id: int
    token: str
    before: float
    after: float


class ModelEffect(BaseModel):
    tokens: list[PromptToken]
    scale: float  # the largest |value| in the strip, for shading
    selectivity: Selectivity
    positions: int  # where S is measured
    threshold: float | None  # out: the activation threshold
    threshold_note: str
    next_before: list[NextToken]
    next_after: list[NextToken]
    target_next: list[TargetNext]  # the channels' own tokens most likely next, before and after
    seconds: float


class AblationPage(BaseModel):
    model: ModelOut
    run: RunOut
    pinning: Pinning
    layer: int
    neuron: int
    side: str
    neuron_url: str
    json_url: str
    controls: Controls
    applied: list[Applied]
    preview: WeightPreview | None
    model_effect: ModelEffect | None
    model_note: str | None  # why there is no real-model effect, if there is none
    selectivity_definition: str
    baseline_definition: str


# --- neuron and channel -----------------------------------------------------------------------------


class ChannelLink(BaseModel):
    index: int
    url: str
    label: str  # its first top tokens, shown visibly
    below_cutoff: bool  # kurtosis < min_kurtosis
    below_median: bool  # faithfulness percentile < 50: less faithful than most random vectors' channels


class RawProjection(BaseModel):
    """The neuron side's own projection z_w = w @ U, the view LM-Debugger gives: for every
    vector of the model, with or without channels. z-scores over the scored tokens."""

    source: str  # "overview" (every vector, computed at set-up) or "run" (stored with the channels)
    norm: float
    kurtosis: float  # excess kurtosis of z_w over all tokens
    skew: float
    top_tokens: list[TokenScore]  # highest z first
    bottom_tokens: list[TokenScore]  # lowest z first


class ChannelsState(BaseModel):
    """Where the channels of a neuron without any stand: asked for, computing, or why not."""

    state: str  # queued, computing, failed, limited, full, unavailable, off
    message: str
    refresh_url: str  # this page again (it fills in when the channels are committed)
    refresh_seconds: int | None  # how soon to look again, while they are coming


class NeuronPage(BaseModel):
    model: ModelOut
    run: RunOut | None  # the run the channels come from; None while no run has this neuron
    pinning: Pinning
    layer: int
    neuron: int
    side: str
    min_kurtosis: float
    # max faithfulness percentile over the non-generic channels, as the layer table shows it;
    # None when every channel is generic (or there are none yet)
    best_percentile: float | None
    raw: RawProjection | None  # None only without an overview and without channels: never shown
    data: NeuronSideOut | None  # the channels; None until a run has computed them
    channels_state: ChannelsState | None  # while data is None
    channels: list[ChannelLink]
    cosines: list[list[float]]  # channel x channel cos of the channel vectors
    side_urls: dict[str, str]
    layer_url: str
    previous_url: str | None  # the previous and next neuron this run computed
    next_url: str | None
    random_url: str
    histogram_url: str
    # two runs of this neuron side; None on a page that can change (unpinned) while no other run
    # has it. A page pinned to its run is cached for good, so it keeps the link: another run may
    # compute the neuron later.
    compare_url: str | None
    json_url: str
    ablation: Controls | None  # the ablation form of this neuron side (None without channels)
    text_url: str  # what the neuron does on real text (TextPage): never part of this page's cache


class HistogramBin(BaseModel):
    low: float
    high: float
    count: int


class Histogram(BaseModel):
    """z-scores of a vector's projection over the scored tokens."""

    scored_tokens: int
    bins: list[HistogramBin]


class NearestChannel(BaseModel):
    layer: int
    side: str
    neuron: int
    channel: int
    cos: float  # signed: negative, the same direction on the other tail; ranked by |cos|
    url: str


class ChannelPage(BaseModel):
    model: ModelOut
    run: RunOut
    pinning: Pinning
    layer: int
    neuron: int
    side: str
    neuron_url: str
    label: str
    channel: ChannelOut
    tokens: list[TokenScore]  # top 100 on its tail, z recomputed from the stored vector and U
    histogram: Histogram
    nearest: list[NearestChannel]
    nearest_note: str  # how they were found, or why not
    nearest_candidates: int  # channels compared (0 when none were)
    # the highest |cos| a random direction reaches among that many channels, on average
    # (web.neighbours.random_max_abs_cos); None when none were compared
    nearest_baseline: float | None
    ablate_url: str  # this neuron side's ablation page with this channel switched off
    # the text page at this channel's row: the top contexts holding its tokens (never cached here)
    text_url: str
    previous_url: str | None
    next_url: str | None
    vector: list[float]  # the channel vector c, |c| = |w|
    json_url: str


# --- on real text (worker/activations.py) ----------------------------------------------------------


class ContextToken(BaseModel):
    id: int
    token: str
    activation: float  # act(g) * u at this token


class TopContext(BaseModel):
    number: int  # its rank, from 1: the page's anchor #context-{number}
    peak: float  # the activation at the peak, the context's rank key
    peak_index: int  # the peak's index in tokens
    tokens: list[ContextToken]  # the window around the peak, inside its document
    channels: list[str]  # "side index" of each channel whose tokens it holds at that side's position


class Density(BaseModel):
    """One signal's histogram over every position of the corpus: bins over [low, high], values
    beyond in the end bins."""

    signal: str  # activation, gate, in
    meaning: str
    low: float
    high: float
    counts: list[int]


class EveryPosition(BaseModel):
    """The behavioural test over every corpus position (docs/method.md, "Behaviour on real text"):
    the neuron's standardised mean pre-activation at positions holding the channel's tokens (read
    sides) or activation at positions followed by them (out), oriented by its sign on them,
    among the same for frequency-matched random token sets."""

    effect: float | None  # (mean there - mean everywhere) / sd everywhere, oriented: > 0 as the sign
    # says; None where no position holds the tokens
    random_median: float | None  # the same for the random sets
    random_sets: int
    percentile: float | None  # of effect among theirs; None when untestable
    positions: int  # corpus positions the figure rests on
    passed: bool | None  # percentile >= 95 (5 % of channels pass by chance); None: untestable


class ChannelAtPeaks(BaseModel):
    """Do the channel's top tokens sit where the neuron fires? docs/method.md, "Behaviour on real
    text": counted over the top contexts, against the corpus's own share of those tokens."""

    side: str
    index: int
    url: str
    label: str
    position: str  # "peak" (read sides: the peak token) or "next" (out: the token after it)
    contexts: int
    hits: int
    chance: float  # share of corpus positions holding one of the channel's tokens
    expected: float  # contexts * chance
    low: float  # 95 % interval of hits / contexts
    high: float
    p_value: float  # two-sided exact binomial test against chance
    expected_direction: str  # "more" or "fewer", from the sign of the neuron on those tokens
    verdict: str  # as expected, opposite, no evidence, untestable
    hit_contexts: list[int]  # the numbers of the contexts that hold one of its tokens there
    every_position: EveryPosition | None  # None: the pass's per-token sums are not on this server
    # From weights alone, beside the test on text: the channel's faithfulness percentiles
    faithfulness_percentile: float  # against random vectors' channels
    percentile_local: float | None  # against random directions at its cosine to w ("vs. cos")


class TextPage(BaseModel):
    """What the neuron does on real text: its top contexts and densities from the stored
    activation pass, and each channel of its newest run checked against them. Never cached
    forever: a pass stored later must show up on a page served before it."""

    model: ModelOut
    layer: int
    neuron: int
    neuron_url: str
    json_url: str
    stored: bool  # an activation pass is stored for this model
    message: str  # what the page shows, or how to compute it
    corpus: str | None  # the corpus's manifest hash
    documents: int | None
    tokens: int | None
    threshold: float | None  # the 90th percentile of |activation|: "active" beyond +-it (ablation)
    densities: list[Density]
    contexts: list[TopContext]
    channels: list[ChannelAtPeaks]


class ChannelMatch(BaseModel):
    a: int  # channel index in run a
    b: int
    cos: float  # |cos| of the parts orthogonal to w
    jaccard: float  # top-20 token overlap


class RunChoice(BaseModel):
    hash: str
    solver: str
    seed: int
    created_at: datetime


class ComparePage(BaseModel):
    model: ModelOut
    layer: int
    neuron: int
    side: str
    runs: list[RunChoice]  # every run that has this neuron side
    run_a: RunOut | None
    run_b: RunOut | None
    a: NeuronSideOut | None
    b: NeuronSideOut | None
    matches: list[ChannelMatch]
    mean_cos: float | None
    mean_jaccard: float | None
    baseline_cos: float | None  # random vectors at the same cosines to w, matched the same way
    # run a's channels matched the same way with those of other neurons of this layer and side
    # (each against its own w): what "consistent" reaches with no shared cause
    other_neurons_cos: float | None
    other_neurons: int  # how many neurons that mean is over (up to OTHER_NEURONS)
    message: str | None
    neuron_url: str


# --- search ----------------------------------------------------------------------------------------


class TokenMatch(BaseModel):
    model: str
    run: str | None  # the run whose channels were searched; None for a model without one
    id: int
    token: str


class SearchHit(BaseModel):
    model: str
    run: str
    layer: int
    side: str
    neuron: int
    channel: int
    url: str
    # the matched token and its signed z in c @ U, as the channel page shows it (the index
    # stores it oriented); its best-placed spelling when the query matched several
    token: TokenScore
    rank: int  # its place among the channel's top tokens, from 0
    also: list[TokenScore]  # the other spellings the query matched on this channel, listed once
    tail: int  # +1 / -1 (core.schemas.SIGN_CONVENTION)
    effect: str  # promotes / suppresses (out), fires on / is inhibited by (gate, in)
    kurtosis: float
    faithfulness_percentile: float
    generic: bool
    label: str


class RawHit(BaseModel):
    """A vector whose own projection w @ U puts the token far out, with or without channels."""

    model: str
    layer: int
    side: str
    neuron: int
    url: str  # the neuron page
    token: TokenScore  # the matched token and its raw z in w @ U (signed: negative = suppressed)


class SearchQuery(BaseModel):
    token: str | None
    exact: bool
    model: str | None
    run: str | None
    layer_min: int | None
    layer_max: int | None
    side: str | None
    min_kurtosis: float
    include_generic: bool
    sort: str
    limit: int


class CloseToken(BaseModel):
    model: str
    token: str
    url: str


class SearchPage(BaseModel):
    query: SearchQuery
    models: list[str]
    matches: list[TokenMatch] = Field(description="vocabulary tokens the query matched")
    hits: list[SearchHit]
    next_url: str | None
    raw_hits: list[RawHit]  # after the channels: every vector's raw projection, exact
    raw_threshold: float  # |raw z| a vector's projection must reach to be listed
    raw_next_url: str | None
    raw_note: str | None  # models whose raw projections are not (all) computed yet
    message: str | None  # the empty state, or what the filters hid
    close: list[CloseToken]  # for a token not in the vocabulary


class Suggestion(BaseModel):
    model: str
    token: str
    url: str


class SuggestPage(BaseModel):
    token: str
    suggestions: list[Suggestion]


class Term(BaseModel):
    id: str  # its anchor on the glossary page: /glossary#<id>
    term: str
    definition: str


class GlossaryPage(BaseModel):
    terms: list[Term]


class Health(BaseModel):
    status: str  # "ok" or "unavailable"
    database: str  # "reachable" or the reason it is not
    revision: str | None
    head: str
