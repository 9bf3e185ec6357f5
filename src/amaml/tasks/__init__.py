"""Task families for meta-learning: synthetic regression and collaborative filtering.

Build one with :func:`make_family`::

    from amaml.tasks import make_family
    fam = make_family("cosmixture", shots=50, queries=50, seed=0)
    support_x, support_y, query_x, query_y = fam.train.batch([0, 1, 2, 3, 4])

With ``pool=`` (synthetic families) meta-training tasks hold pools from which
:func:`draw_episode` draws a fresh episode; :func:`oracle_nrmse` fits a synthetic family's
own parameters to each support set, the best the support points allow.

This package imports nothing from the rest of :mod:`amaml`.
"""

from .base import DataError, FamilyRequest, Task, TaskFamily, TaskSet
from .collaborative import Ratings, family_from_ratings
from .download import ARCHIVES, Archive, default_root, download_family
from .episodes import draw_episode
from .oracle import oracle_nrmse, supports_oracle
from .registry import (
    FamilyBuilder,
    has_fixed_data,
    list_families,
    make_family,
    register_family,
)
from .synthetic import (
    AbstractSyntheticFunction,
    Alpine,
    AlpinePaper,
    CosMixture,
    CosMixturePaper,
    Sinusoid,
)

__all__ = [
    "ARCHIVES",
    "AbstractSyntheticFunction",
    "Alpine",
    "AlpinePaper",
    "Archive",
    "CosMixture",
    "CosMixturePaper",
    "DataError",
    "FamilyBuilder",
    "FamilyRequest",
    "Ratings",
    "Sinusoid",
    "Task",
    "TaskFamily",
    "TaskSet",
    "default_root",
    "download_family",
    "draw_episode",
    "family_from_ratings",
    "has_fixed_data",
    "list_families",
    "make_family",
    "oracle_nrmse",
    "register_family",
    "supports_oracle",
]
