"""The words the pages use for their numbers, defined once: the glossary page shows these, and
every number's label links to its entry (`/glossary#<id>`)."""

from __future__ import annotations

from channelscope.core.schemas import SIGN_CONVENTION
from channelscope.web import pages
from channelscope.web.ablation import BASELINE_DEFINITION, SELECTIVITY_DEFINITION

TERMS = [
    pages.Term(
        id="channel",
        term="channel",
        definition="A direction c found from a neuron's weight vector w by a Householder reflection "
        "(so |c| = |w|), chosen to make its vocabulary projection c @ U as heavy-tailed as possible: "
        "a few tokens far out on one tail. Channels are found one after another, each with the tokens "
        "of the ones before it masked, in discovery order 0, 1, 2, ...",
    ),
    pages.Term(id="sign", term="tail and sign", definition=SIGN_CONVENTION),
    pages.Term(
        id="kurtosis",
        term="excess kurtosis",
        definition="E[(z - mean)^4] / sd^4 - 3 of a projection over the scored tokens: 0 for a normal "
        "distribution, large when a few tokens lie far out. Every 'kurtosis' on these pages is excess "
        "kurtosis; the solver maximises it.",
    ),
    pages.Term(
        id="min-kurtosis",
        term="min_kurtosis (the cut-off)",
        definition="Channels whose excess kurtosis is below it (5 unless the page says otherwise) are "
        "treated as junk: folded on the neuron page and left out of search.",
    ),
    pages.Term(
        id="z",
        term="z",
        definition="A token's z-score in a projection (w @ U or c @ U), over the scored tokens: how many "
        "standard deviations it lies from the mean. Signed: negative is the low tail.",
    ),
    pages.Term(
        id="faithfulness",
        term="faithfulness",
        definition="The mean z, in the neuron's own projection w @ U, of a channel's top 20 tokens, "
        "oriented to the channel's tail: how much the neuron itself carries what the channel names.",
    ),
    pages.Term(
        id="percentile",
        term="percentile (faithfulness percentile)",
        definition="Where a channel's faithfulness falls, 0 to 100, among the channels found the same way "
        "in random vectors of the same norm (the run's reference). The number to trust most: a channel at "
        "percentile 12 is less faithful than most channels of random vectors. A neuron's best percentile "
        "is the highest over its non-generic channels, 'none' when every channel is generic.",
    ),
    pages.Term(
        id="score",
        term="score (a neuron's, against random vectors)",
        definition="Where a neuron's best percentile falls, 0 to 100, among the best percentiles of the "
        "reference's random vectors, each scored with itself held out. A best over several channels is "
        "high for random vectors too (the best of five uniform percentiles has a median of 87), so the "
        "best percentile alone flatters every neuron; on this scale a random vector scores about 50, "
        "and a neuron near 50 has no channel more faithful than a random vector's best. The layer "
        "table sorts by it. Measures version 3 (a run measured before shows '–' until "
        "`channelscope measures RUN`).",
    ),
    pages.Term(
        id="percentile-local",
        term="vs. cos (percentile against directions at the same cosine)",
        definition="Where a channel's faithfulness falls among directions exactly as close to this w "
        "(the channel's own cos(w, c)) whose other part is one of the reference's channels, a sparse "
        "direction of U that no neuron put there. A heavy-tailed w hands its tail to anything near it, "
        "so the plain percentile cannot fail there; this one can. Near 50: the channel's tokens are no "
        "further out on w than a chance sparse direction that close would put its own. Measures "
        "version 2 (a run measured before shows '–' until `channelscope measures RUN`).",
    ),
    pages.Term(
        id="at-peaks",
        term="at the peaks (on real text)",
        definition="Of a neuron's top contexts on the corpus, how many hold one of a channel's top "
        "tokens at the peak (gate, in) or just after it (out), against the share of the corpus's "
        "positions holding one (chance), with an exact binomial test. Twenty contexts: only strong "
        "effects show, and 'no evidence' is not 'fails'.",
    ),
    pages.Term(
        id="every-position",
        term="at every position (on real text)",
        definition="A channel's behavioural test over the whole corpus: the neuron's pre-activation "
        "where the channel's top tokens are (gate, in), or its activation just before them (out), as "
        "a standardised mean, oriented by the neuron's sign on them, against token sets as common in "
        "the corpus. Passing at their 95th percentile happens to 5 % of channels by chance.",
    ),
    pages.Term(
        id="generic",
        term="generic",
        definition="A channel whose direction is one that the channels of random vectors also find (a "
        "direction of U that many vectors' channels share), so it says little about this neuron. Generic "
        "channels are folded and do not count toward the best percentile.",
    ),
    pages.Term(
        id="reconstruction",
        term="reconstruction",
        definition="|P_k w| / |w|: how much of w the span of its first k channels holds, beside the same "
        "for random vectors at the same cosines to w. Channels are chosen for sparse projections, not to "
        "span w, so the random vectors often reconstruct w as well or better; the curve alone proves "
        "nothing.",
    ),
    pages.Term(
        id="alpha",
        term="α* (alpha*)",
        definition="How much of a channel an ablation removes: w' = w - α*·c, with α* from the paper's "
        "grid rule, fitted on the original w for the first channel and refitted on the current w' for "
        "each further one.",
    ),
    pages.Term(id="selectivity", term="S (selectivity)", definition=SELECTIVITY_DEFINITION),
    pages.Term(id="baseline", term="random-direction baseline", definition=BASELINE_DEFINITION),
]
