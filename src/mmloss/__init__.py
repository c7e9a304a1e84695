"""mmloss: fused, memory-lean contrastive losses for multimodal sentence-embedding training."""

from mmloss._version import __version__
from mmloss.backends import last_backend
from mmloss.constants import IGNORE_INDEX
from mmloss.contrastive import contrastive_loss
from mmloss.joint import KeyBlock, joint_contrastive_loss
from mmloss.losses import KDMCSELoss, LossOutput, MCSELoss, MCSEOLoss, SimCSELoss
from mmloss.similarity_ops import similarity, topk_similarity

__all__ = [
    "IGNORE_INDEX",
    "KDMCSELoss",
    "KeyBlock",
    "LossOutput",
    "MCSELoss",
    "MCSEOLoss",
    "SimCSELoss",
    "__version__",
    "contrastive_loss",
    "joint_contrastive_loss",
    "last_backend",
    "similarity",
    "topk_similarity",
]
