"""Failure types without skill labels: embed, cluster, name, validate.

Real data carries no skill label, so the labelled path (`failure_types.group`:
by skill and consensus answer) has nothing to group by. This path finds the
types in the probes themselves:

1. Embedding (`Embedder`, `combine`). Each consensus-backed probe becomes two
   vectors from one model (the auditor by default; its weights, jitted): the
   mean of the SigLIP tower's output tokens on the image the models saw, and
   the mean of the LLM's final hidden states over the probe's text, "question
   + consensus answer + edit text" (`probe_text`; the edit or caption is the
   auditor's first text when its route had one). Gemma 3 reads the text
   alone; PaliGemma, a prefix LM that needs an image, reads it after the
   image and only the text positions are pooled. Each block is centred,
   reduced to `dims` principal components, scaled to unit total variance and
   weighted (`image_weight`, `text_weight`), and the blocks are concatenated.
2. Clustering (`cluster`, `assign`). scikit-learn's HDBSCAN clusters the
   failure exemplars (probes at least one target fails); the exemplars it
   calls noise belong to no type. Every other probe joins the cluster of its
   nearest centroid if it lies within that cluster's radius (`radius_scale`
   times the largest of the members' distances to their centroid), so a type
   has failure *rates* as the labelled types have, and is counted, scored and
   ranked by `failure_types` exactly as they are.
3. Naming (`name_type`). For each of the `name_top` best-ranked types, the
   `name_show` members nearest its centroid are shown to a *namer*, which
   writes candidate names, each with the probe that tests it: a question and
   the answers that mean "this is one of them" (`Candidate`).
   - `question_namer` (any auditor): the auditor's own question route on the
     shown members' images; a question it writes becomes a candidate whose
     answers are those the references give to it on the shown members
     (most common first, until they cover half of them). The name reads
     `"QUESTION" -> ANSWERS`. In the scene world this is all the tiny
     auditor can write: scene-language questions, not names.
   - `chat_namer` (an instruction-tuned auditor, e.g. Gemma 3 IT): shown one
     member image and the shown probes as text, it writes a short name; the
     probe asks "is this question about NAME?" of each record's own
     question, answer "yes".
4. Validation (`validate`). The references (their consensus, `ask`) answer
   the candidate's probe on held-out members (members not shown to the
   namer, up to `name_members`) and on non-members (probes of other types or
   of none, up to `name_nonmembers`). A candidate is kept only if it
   separates them: member hit rate - non-member hit rate >= `name_margin`
   *and* the two 95% Wilson intervals do not overlap. The kept candidate
   with the largest separation names the type. When none is kept, the type
   keeps a *descriptive* name built from its members, not by a model
   (`descriptive_name`: the question words most over-represented among its
   members and its most common consensus answers), marked
   `named_by: "descriptive"`. Every candidate and its rates are reported.

Where records carry a skill (the scene world), `label_check` measures the
clusters against the labelled path: adjusted Rand index of the clusters
against the skill:answer categories and against the labelled failure types
(noise exemplars count as singletons; also reported over the clustered ones
alone), and `analyse_unlabelled` reports the planted gaps' recall of the
unlabelled types next to the labelled one's. Nothing here reads the ground
truth except those measurements.

The world's knowledge (the attributes a question names, the truth the
measurements read) comes in as a `failure_types.Knowledge` from the stage.
Of the model layer this package imports only its input helpers
(`models.inputs.fit_images`): the caller passes the model module
(`Embedder.from_sampler(sampler, models.build)`) and the mining round's
`rollout.Auditing` (namers, `references_ask`).

Modules, one a step: config.py (settings, problems), embed.py (1),
clustering.py (2), naming.py (3), validation.py (4), unlabelled.py (the
types, their measurements and the stage's call, `mine_unlabelled`). Their
public names are this package's.
"""

from auditdm_jax.mine.clusters.clustering import assign, centroids, cluster
from auditdm_jax.mine.clusters.config import (DEFAULTS, DESCRIPTIVE, NAMERS, Ask, problems,
                                              settings)
from auditdm_jax.mine.clusters.embed import Embedder, combine, probe_text
from auditdm_jax.mine.clusters.naming import (CHAT_PROBE, CHAT_PROMPT, chat_namer,
                                              default_namers, descriptive_name, name_type,
                                              question_namer, references_ask)
from auditdm_jax.mine.clusters.unlabelled import (analyse_unlabelled, label_check,
                                                  mine_unlabelled, probes_of, unlabelled_types)
from auditdm_jax.mine.clusters.validation import Candidate, Namer, Validation, validate

__all__ = [
    "Ask", "CHAT_PROBE", "CHAT_PROMPT", "Candidate", "DEFAULTS", "DESCRIPTIVE", "Embedder",
    "NAMERS", "Namer", "Validation", "analyse_unlabelled", "assign", "centroids",
    "chat_namer", "cluster", "combine", "default_namers", "descriptive_name", "label_check",
    "mine_unlabelled", "name_type", "probe_text", "probes_of", "problems", "question_namer",
    "references_ask", "settings", "unlabelled_types", "validate",
]
