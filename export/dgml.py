"""DGML (Xu et al., "Towards Improved and Interpretable Deep Metric Learning via Attentive
Grouping", IEEE TPAMI) on the same backbones as the CMN: G groups, each with a learnable
query that attends over the backbone's regions; the embedding is the G group features, each
L2-normalised, concatenated.

As upstream ``architectures/group_layers.py::LearnQ_fen`` (XinyiXuXD/DGML-master): keys are a
bias-free 1x1 projection of the feature map to channels / 8 (256 on ResNet-50's 2048), values
a bias-free 1x1 projection to ``group_dim`` shared by all groups; group g's attention is the
softmax over the positions of q_g . k_p (no scaling, no temperature), and its feature the
attention-weighted sum of the values. 1x1 convolutions are written as Linear layers on the
flattened regions (the same maths, one MatMul each in the exported graph).

Retrieval ranks by the sum of the per-group cosines. The exported ``embedding`` is the
concatenation of the unit group features divided by sqrt(G), i.e. the L2-normalised
concatenation: its inner product is that sum divided by G, so the runtime's inner product
ranks exactly as DGML does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pytorch_metric_learning.losses import ProxyAnchorLoss
from torch import nn

from cmn_edge.metadata import OUTPUT_GROUP_ATTENTION

from .model import BackboneModel

#: upstream's key reduction: 2048 -> 256 channels on ResNet-50
KEY_REDUCTION = 8
#: the diversity loss softplus(SCALE (cos - MARGIN)) of upstream's ``dirdiv_bd``
#: (binomial deviance with beta1 = 2, beta2 = 0.5, C = 25)
DIVERSITY_SCALE = 50.0
DIVERSITY_MARGIN = 0.5


def diversity_loss(groups: torch.Tensor) -> torch.Tensor:
    """Mean over images and group pairs of softplus(50 (cos(f_g, f_g') - 0.5)), [B, G, D] in.

    It pushes the groups of one image apart (cosine under 0.5) so that each group learns a
    different part of the image. Upstream sums the G(G-1)/2 pairs and divides by G-1; the
    mean over pairs used here is the same up to the constant G/2 (1.5 at G = 3).
    """
    count = groups.shape[1]
    if count < 2:
        return groups.new_zeros(())
    unit = F.normalize(groups, dim=-1)
    cosine = unit @ unit.transpose(1, 2)  # B,G,G
    rows, cols = torch.triu_indices(count, count, 1, device=groups.device)
    return F.softplus(DIVERSITY_SCALE * (cosine[:, rows, cols] - DIVERSITY_MARGIN)).mean()


class GroupHead(nn.Module):
    """G learnable queries over shared keys and values (upstream ``LearnQ_fen``)."""

    def __init__(
        self, channels: int, groups: int = 3, group_dim: int = 170, reduction: int = KEY_REDUCTION
    ) -> None:
        super().__init__()
        if groups < 1 or group_dim < 1:
            raise ValueError(
                f"DGML needs at least one group of one dimension ({groups}x{group_dim})"
            )
        key_dim = max(1, channels // reduction)
        self.key_proj = nn.Linear(channels, key_dim, bias=False)  # upstream key_conv
        self.value_proj = nn.Linear(channels, group_dim, bias=False)  # upstream val_conv
        # upstream que_embedding: one 1x1 conv to one channel per group = one row per group
        self.queries = nn.Linear(key_dim, groups, bias=False)

    @property
    def groups(self) -> int:
        return self.queries.weight.shape[0]

    @property
    def group_dim(self) -> int:
        return self.value_proj.weight.shape[0]

    def group_keys(self) -> torch.Tensor:
        """[G, C]: the queries folded through the key projection (input-independent), so that
        the attention logits are one MatMul of the regions with a constant in the graph."""
        return self.queries.weight @ self.key_proj.weight

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw group features [B, G, D] and attention [B, G, R] for a feature map [B, C, h, w]."""
        tokens = features.flatten(2).transpose(1, 2)  # B,R,C
        logits = self.queries(self.key_proj(tokens))  # B,R,G
        attention = torch.softmax(logits, dim=1).transpose(1, 2)  # B,G,R
        return torch.matmul(attention, self.value_proj(tokens)), attention

    def attend_folded(
        self, features: torch.Tensor, keys: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward`` for inference graphs, with ``keys`` = ``group_keys()`` as a constant,
        and each group's attended region feature [B, G, C] projected once instead of
        projecting all R regions (the same maths)."""
        tokens = features.flatten(2).transpose(1, 2)  # B,R,C
        logits = torch.matmul(tokens, keys.t())  # B,R,G
        attention = torch.softmax(logits, dim=1).transpose(1, 2)  # B,G,R
        return self.value_proj(torch.matmul(attention, tokens)), attention

    def simulate_int8(self, simulation, quantize_output) -> None:
        """``cmn-export qat``: INT8 rounding where the exported graph has it (the value
        projection's weights per channel and its output; the folded group keys per group)."""
        from torch.nn.utils import parametrize

        from .qat import _PerChannelWeights, fake_quantize_rows

        parametrize.register_parametrization(
            self.value_proj, "weight", _PerChannelWeights(simulation)
        )
        simulation.parametrized.append(self.value_proj)
        quantize_output(self.value_proj)
        seen: dict[str, torch.Tensor] = {}

        def keep_tokens(_module, args):
            seen["tokens"] = args[0]

        def folded_logits(_module, _args, out):
            if not simulation.enabled:
                return out
            keys = fake_quantize_rows(self.group_keys())  # exported as a constant, per group
            return torch.matmul(seen.pop("tokens"), keys.t())

        simulation.hooks.append(self.key_proj.register_forward_pre_hook(keep_tokens))
        simulation.hooks.append(self.queries.register_forward_hook(folded_logits))


class GroupMetricLoss(nn.Module):
    """Proxy-Anchor on each group's unit features, with proxies of its own, averaged."""

    def __init__(
        self, num_classes: int, groups: int, group_dim: int, margin: float, alpha: float
    ) -> None:
        super().__init__()
        self.losses = nn.ModuleList(
            ProxyAnchorLoss(num_classes, group_dim, margin=margin, alpha=alpha)
            for _ in range(groups)
        )

    def forward(self, parts: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        terms = [loss(parts[:, g], labels) for g, loss in enumerate(self.losses)]
        return torch.stack(terms).mean()


class DGML(BackboneModel):
    """Backbone + group head. ``forward`` returns the L2-normalised embedding [B, G*D]."""

    head_type = "dgml"
    regulariser = "diversity"
    output_names = (*BackboneModel.output_names, OUTPUT_GROUP_ATTENTION)

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0",
        groups: int = 3,
        group_dim: int = 170,
        pretrained: bool = True,
        backbone_weights: str | None = None,
    ) -> None:
        super().__init__(backbone, pretrained, backbone_weights)
        self.head = GroupHead(self.spec.channels, groups, group_dim)

    @property
    def num_concepts(self) -> int:
        """The embedding's size (the metadata's ``num_concepts``): G x D."""
        return self.head.groups * self.head.group_dim

    @staticmethod
    def embedding_of(parts: torch.Tensor) -> torch.Tensor:
        """Unit group features [B, G, D] -> the normalised concatenation [B, G*D]."""
        return F.normalize(parts.flatten(1), dim=-1)

    def embed_features(self, features: torch.Tensor) -> torch.Tensor:
        groups, _ = self.head(features)
        return self.embedding_of(F.normalize(groups, dim=-1))

    def training_terms(
        self, features: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(embedding, the metric loss's input: unit group features [B, G, D], diversity)."""
        groups, _ = self.head(features)
        parts = F.normalize(groups, dim=-1)
        return self.embedding_of(parts), parts, diversity_loss(groups)

    def explain_features(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """Embedding, unit group features [B, G, D] and group attention maps [B, G, h, w]."""
        groups, attention = self.head(features)
        parts = F.normalize(groups, dim=-1)
        h, w = features.shape[-2:]
        return {
            "embedding": self.embedding_of(parts),
            "groups": parts,
            "attention": attention.reshape(attention.shape[0], attention.shape[1], h, w),
        }

    def exportable(self) -> nn.Module:
        return ExportableDGML(self)

    def metadata_fields(self) -> dict:
        return {"head": "dgml", "groups": self.head.groups, "group_dim": self.head.group_dim}


class ExportableDGML(nn.Module):
    """DGML for inference, with the CMN graph's outputs so the runtime reads it unchanged:

    - ``embedding`` [N, G*D]: the normalised concatenation (retrieval);
    - ``concept_scores`` [N, G*D]: the unit group features concatenated (sqrt(G) x the
      embedding, as a CMN's embedding is its normalised scores);
    - ``attention`` [N, G*D, h, w]: for each embedding dimension, the attention map of the
      group it belongs to (where the dimension's value was gathered), so a per-dimension
      explanation reads the right map;
    - ``group_attention`` [N, G, h, w]: the G maps themselves, DGML's explanation.
    """

    def __init__(self, model: DGML) -> None:
        super().__init__()
        self.backbone = model.backbone
        self.head = model.head
        with torch.no_grad():  # a buffer, so the graph holds it as one constant [G, C]
            self.register_buffer("keys", model.head.group_keys().detach().clone())

    def forward(
        self, images: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        features = self.backbone(images)
        groups, attention = self.head.attend_folded(features, self.keys)
        parts = F.normalize(groups, dim=-1)
        scores = parts.flatten(1)
        embedding = scores / math.sqrt(self.head.groups)
        h, w = features.shape[-2:]
        maps = attention.reshape(-1, self.head.groups, h, w)
        per_dim = maps.unsqueeze(2).expand(-1, -1, self.head.group_dim, -1, -1)
        per_dim = per_dim.reshape(-1, self.head.groups * self.head.group_dim, h, w)
        return embedding, scores, per_dim, maps
