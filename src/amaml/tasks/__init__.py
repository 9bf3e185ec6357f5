"""Task families for meta-learning: synthetic regression and collaborative filtering.

Build one with :func:`make_family`::

    from amaml.tasks import make_family
    fam = make_family("cosmixture", shots=50, queries=50, seed=0)
    support_x, support_y, query_x, query_y = fam.train.batch([0, 1, 2, 3, 4])

Classification families (``"glyphs"``, ``"omniglot"``, its minimal background splits
``"omniglot-minimal"``, ``"omniglot-small1"``, ``"omniglot-small2"``, and
``"mini-imagenet"``; ``kind == "classification"``) draw N-way episodes of images with int64 labels::

    fam = make_family("glyphs", ways=5, shots=1, queries=15, n_test=600, seed=0)
    batch = fam.sample_train_batch(32, torch.Generator().manual_seed(0))  # fresh episodes
    episodes = fam.test.batch(range(len(fam.test)))                      # fixed episodes

With ``pool=`` (synthetic families) meta-training tasks hold pools from which
:func:`draw_episode` draws a fresh episode; :func:`oracle_nrmse` fits a synthetic family's
own parameters to each support set, the best the support points allow.

This package imports nothing from the rest of :mod:`amaml`.
"""

from .base import KINDS, DataError, FamilyRequest, Task, TaskFamily, TaskSet
from .classification import DEFAULT_WAYS, build_classification
from .collaborative import Ratings, family_from_ratings
from .download import ARCHIVES, UNVERIFIED_ARCHIVES, Archive, default_root, download_family
from .episodes import draw_episode
from .episodic import (
    FRESH_EPISODES,
    AbstractClassSource,
    ClassificationTask,
    EpisodeSet,
    Rotated,
)
from .glyphs import Glyphs
from .images import ImageFolderClasses, read_mini_imagenet, read_omniglot
from .lake_runs import (
    LakeRun,
    mhd_predictions,
    modified_hausdorff,
    pixel_nn_predictions,
    read_lake_runs,
)
from .omniglot import MINIMAL_SPLITS, read_minimal
from .oracle import oracle_nrmse, supports_oracle
from .registry import (
    FamilyBuilder,
    family_kind,
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
    "DEFAULT_WAYS",
    "FRESH_EPISODES",
    "KINDS",
    "MINIMAL_SPLITS",
    "UNVERIFIED_ARCHIVES",
    "AbstractClassSource",
    "AbstractSyntheticFunction",
    "Alpine",
    "AlpinePaper",
    "Archive",
    "ClassificationTask",
    "CosMixture",
    "CosMixturePaper",
    "DataError",
    "EpisodeSet",
    "FamilyBuilder",
    "FamilyRequest",
    "Glyphs",
    "ImageFolderClasses",
    "LakeRun",
    "Ratings",
    "Rotated",
    "Sinusoid",
    "Task",
    "TaskFamily",
    "TaskSet",
    "build_classification",
    "default_root",
    "download_family",
    "draw_episode",
    "family_from_ratings",
    "family_kind",
    "has_fixed_data",
    "list_families",
    "make_family",
    "mhd_predictions",
    "modified_hausdorff",
    "oracle_nrmse",
    "pixel_nn_predictions",
    "read_lake_runs",
    "read_mini_imagenet",
    "read_minimal",
    "read_omniglot",
    "register_family",
    "supports_oracle",
]
