"""The Concept Metrics Network (CMN, TNNLS 2025) on a CNN backbone.

C learnable concept vectors cross-attend to the backbone's regions; each concept's score is
the cosine between its projected vector and its attended feature, and the L2-normalised
scores are the embedding, so dimension i reads as "how present is concept i".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cmn_edge.metadata import OUTPUT_ATTENTION, OUTPUT_EMBEDDING, OUTPUT_SCORES

from .backbones import Backbone, BackboneSpec, get_spec
from .heads import CMN_TOKEN_NORMS


class ConceptHead(nn.Module):
    """The CMN head of shchen0001/CMN ``net/CMN.py``, with names that say what each part does.

    Upstream name -> here: MLP1/lnorm1 -> token_proj/token_norm, MLP2/lnorm2 ->
    key_proj/key_norm, MLP3/lnorm3 -> query_proj/query_norm, concept_v -> concepts.
    """

    def __init__(
        self,
        channels: int,
        num_concepts: int,
        concept_dim: int | None = None,
        token_norm: str = "layer",
    ) -> None:
        super().__init__()
        concept_dim = concept_dim or channels
        if token_norm not in CMN_TOKEN_NORMS:
            known = ", ".join(CMN_TOKEN_NORMS)
            raise ValueError(f"unknown token norm '{token_norm}' (known: {known})")
        # "layer" is upstream's LayerNorm; "none" keeps each region's magnitude (see heads.py)
        self.token_norm = nn.LayerNorm(channels) if token_norm == "layer" else nn.Identity()
        self.token_proj = nn.Linear(channels, channels)
        self.key_norm = nn.LayerNorm(concept_dim)
        self.key_proj = nn.Linear(concept_dim, channels, bias=False)
        self.query_norm = nn.LayerNorm(concept_dim)
        self.query_proj = nn.Linear(concept_dim, channels, bias=False)
        self.concepts = nn.Parameter(torch.empty(num_concepts, concept_dim))
        for weight in (self.token_proj.weight, self.key_proj.weight, self.query_proj.weight):
            nn.init.kaiming_normal_(weight, mode="fan_out")
        nn.init.zeros_(self.token_proj.bias)
        nn.init.kaiming_normal_(self.concepts, mode="fan_out")

    @property
    def num_concepts(self) -> int:
        return self.concepts.shape[0]

    def concept_keys(self) -> torch.Tensor:
        """[C, D]: what each concept looks for among the regions (input-independent)."""
        return self.key_proj(self.key_norm(self.concepts))

    def concept_queries(self) -> torch.Tensor:
        """[C, D], unit rows: what each concept's attended feature is compared with."""
        return F.normalize(self.query_proj(self.query_norm(self.concepts)), dim=-1)

    def attend(
        self, features: torch.Tensor, keys: torch.Tensor, queries: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw concept scores [B, C] and attention [B, C, R] for a feature map [B, D, h, w]."""
        tokens = self.token_proj(self.token_norm(features.flatten(2).transpose(1, 2)))  # B,R,D
        affinity = torch.matmul(tokens, keys.t()).transpose(1, 2)  # B,C,R
        # As upstream: normalise over concepts for each region, scale by the region count.
        attention = torch.softmax(F.normalize(affinity, dim=1) * affinity.shape[-1], dim=-1)
        attended = torch.matmul(attention, tokens)  # B,C,D
        scores = (F.normalize(attended, dim=-1) * queries.unsqueeze(0)).sum(-1)
        return scores, attention

    def attend_factored(
        self, features: torch.Tensor, keys: torch.Tensor, queries: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``attend`` without the attended features [B, C, D], for inference graphs.

        The attended feature of concept c is a_c T (a_c its attention row, T the tokens), so
        its cosine with the unit query q_c is (a_c T q_c) / sqrt(a_c T T^T a_c^T). Both terms
        come from [B, R, C] tensors: T Q^T is a MatMul with a constant weight (quantizable
        like any projection) and T T^T is only R x R. At C=512, D=1280, R=49 this drops the
        largest activation from 655k to 25k values per image and the MatMul of two
        activations from 32M to 4M MACs.
        """
        tokens = self.token_proj(self.token_norm(features.flatten(2).transpose(1, 2)))  # B,R,D
        affinity = torch.matmul(tokens, keys.t())  # B,R,C
        attention = torch.softmax(F.normalize(affinity, dim=2) * affinity.shape[1], dim=1)
        along_query = torch.matmul(tokens, queries.t())  # B,R,C
        numerator = (attention * along_query).sum(1)  # B,C
        gram = torch.matmul(tokens, tokens.transpose(1, 2))  # B,R,R
        squared_norm = (attention * torch.matmul(gram, attention)).sum(1)  # B,C
        # F.normalize's floor (1e-12 on the norm), on the squared norm
        scores = numerator / torch.sqrt(squared_norm.clamp_min(1e-24))
        return scores, attention.transpose(1, 2)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.attend(features, self.concept_keys(), self.concept_queries())

    def simulate_int8(self, simulation, quantize_output) -> None:
        """``cmn-export qat``: INT8 rounding where the exported graph has it (the token
        projection's weights per channel and its input and output; the projected keys and
        queries, constants in the graph, per concept)."""
        from torch.nn.utils import parametrize

        from .qat import _PerChannelWeights, fake_quantize_rows

        parametrize.register_parametrization(
            self.token_proj, "weight", _PerChannelWeights(simulation)
        )
        simulation.parametrized.append(self.token_proj)
        for module in (self.token_norm, self.token_proj, self.key_proj, self.query_proj):
            if module in (self.key_proj, self.query_proj):
                # the exported graph holds the projected keys/queries as constant weights,
                # quantized per concept
                simulation.hooks.append(
                    module.register_forward_hook(
                        lambda _m, _i, out: fake_quantize_rows(out) if simulation.enabled else out
                    )
                )
            else:
                quantize_output(module)

    @torch.no_grad()
    def init_from_features(self, features: torch.Tensor, key_spread: float = 0.05) -> dict:
        """Start where the pretrained features are, instead of at random: identity token
        projection; every concept's key along the mean region (so each concept attends
        almost evenly, and the training spreads the keys apart); the queries along the
        principal directions of the regions' average over ``features`` [N, D, h, w] (the
        training images' pretrained feature maps). With ``token_norm="none"`` the embedding
        is then the average-pooled features projected on their first C principal
        directions: within 1.2 / 0.1 R@1 of the plain backbone on cub100 / caltech97 test,
        where a random head starts at 66 / 90 (``benchmarks/head_start.py``). Returns what it
        set, for the training log."""
        tokens = self.token_norm(features.flatten(2).transpose(1, 2).float())  # N,R,D
        channels = tokens.shape[-1]
        if self.token_proj.weight.shape != (channels, channels):
            raise ValueError("init_from_features needs a square token projection")
        self.token_proj.weight.copy_(torch.eye(channels))
        self.token_proj.bias.zero_()
        pooled = tokens.mean(1)  # N,D
        _, strength, directions = torch.linalg.svd(pooled.double(), full_matrices=False)
        count = self.num_concepts
        queries = directions[:count].float()
        if len(queries) < count:  # fewer images than concepts: random directions fill in
            queries = torch.cat([queries, torch.randn(count - len(queries), channels)])
        # each direction signed so an average image scores positive along it
        queries = queries * torch.where(queries @ pooled.mean(0) < 0, -1.0, 1.0).unsqueeze(1)
        mean_region = F.normalize(tokens.reshape(-1, channels).mean(0), dim=0)
        generator = torch.Generator().manual_seed(0)
        noise = torch.randn(count, channels, generator=generator) / channels**0.5
        keys = mean_region.unsqueeze(0) + key_spread * noise
        for norm, proj, target in (
            (self.key_norm, self.key_proj, keys),
            (self.query_norm, self.query_proj, queries),
        ):
            # proj(norm(concepts)) = target: least squares over the C normalised concepts
            basis = norm(self.concepts).double()  # C, concept_dim
            proj.weight.copy_((torch.linalg.pinv(basis) @ target.double()).t().float())
        explained = float((strength[:count] ** 2).sum() / (strength**2).sum())
        return {"images": len(pooled), "variance_explained": explained}

    def separation_loss(self) -> torch.Tensor:
        """mean log(1 + |cos|) between distinct concept vectors, times C, as upstream."""
        unit = F.normalize(self.concepts, dim=-1)
        correlation = unit @ unit.t()
        off_diagonal = correlation * (1 - torch.eye(len(unit), device=unit.device))
        return torch.log1p(off_diagonal.abs()).mean() * correlation.shape[1]


class BackboneModel(nn.Module):
    """A backbone and an embedding head: what training, export and qat share between heads
    (``export/heads.py`` lists them). Subclasses set ``spec``, ``backbone`` and ``head``."""

    #: the metadata's head type, and the name of the head's own regularising loss
    head_type = ""
    regulariser = ""
    #: the graph outputs of ``exportable()``, in order; the first three are what the runtime
    #: reads from any model
    output_names: tuple[str, ...] = (OUTPUT_EMBEDDING, OUTPUT_SCORES, OUTPUT_ATTENTION)
    #: whether the exported graph gets DIML's ``regions`` output (``export/regions.py``)
    has_regions = False
    spec: BackboneSpec
    backbone: Backbone
    head: nn.Module

    def __init__(
        self, backbone: str, pretrained: bool = True, backbone_weights: str | None = None
    ) -> None:
        super().__init__()
        self.spec = get_spec(backbone)
        self.backbone = Backbone(self.spec, pretrained=pretrained, weights_file=backbone_weights)

    @property
    def num_concepts(self) -> int:
        """The embedding's size (the metadata's ``num_concepts``)."""
        raise NotImplementedError

    def freeze_batchnorm(self) -> None:
        """Keep ImageNet BatchNorm statistics and affine terms (small metric-learning batches)."""
        for module in self.backbone.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
                for param in module.parameters():
                    param.requires_grad_(False)

    def embed_features(self, features: torch.Tensor) -> torch.Tensor:
        """The L2-normalised embedding of a backbone feature map."""
        raise NotImplementedError

    def training_terms(
        self, features: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(embedding, what the metric loss takes, the head's regularising loss)."""
        raise NotImplementedError

    def explain_features(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def exportable(self) -> nn.Module:
        """The inference module that is traced to ONNX (outputs: ``output_names``)."""
        raise NotImplementedError

    def metadata_fields(self) -> dict:
        """Head-specific ONNX metadata fields (none: the defaults, which mean CMN)."""
        return {}

    def explain(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.explain_features(self.backbone(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed_features(self.backbone(images))

    def forward_tail(self, trunk_features: torch.Tensor) -> torch.Tensor:
        """Embedding from cached trunk features, for tuning the last stages on a CPU."""
        return self.embed_features(self.backbone.tail(trunk_features))


class CMN(BackboneModel):
    """Backbone + concept head. ``forward`` returns the L2-normalised embedding [B, C]."""

    head_type = "cmn"
    regulariser = "separation"
    has_regions = True

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0",
        num_concepts: int = 512,
        concept_dim: int | None = None,
        pretrained: bool = True,
        backbone_weights: str | None = None,
        token_norm: str = "layer",
    ) -> None:
        super().__init__(backbone, pretrained, backbone_weights)
        self.head = ConceptHead(self.spec.channels, num_concepts, concept_dim, token_norm)

    @property
    def num_concepts(self) -> int:
        return self.head.num_concepts

    def explain_features(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """Embedding, raw scores and attention maps [B, C, h, w]."""
        scores, attention = self.head(features)
        h, w = features.shape[-2:]
        return {
            "embedding": F.normalize(scores, dim=-1),
            "concept_scores": scores,
            "attention": attention.reshape(attention.shape[0], attention.shape[1], h, w),
        }

    def embed_features(self, features: torch.Tensor) -> torch.Tensor:
        scores, _ = self.head(features)
        return F.normalize(scores, dim=-1)

    def training_terms(
        self, features: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(embedding, the embedding again for the metric loss, concept separation)."""
        embedding = self.embed_features(features)
        return embedding, embedding, self.head.separation_loss()

    def exportable(self) -> nn.Module:
        return ExportableCMN(self)


class ExportableCMN(nn.Module):
    """CMN for inference: the concept keys and queries are folded into constants."""

    def __init__(self, model: CMN) -> None:
        super().__init__()
        self.backbone = model.backbone
        self.head = model.head
        with torch.no_grad():
            self.register_buffer("keys", model.head.concept_keys().detach().clone())
            self.register_buffer("queries", model.head.concept_queries().detach().clone())

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        features = self.backbone(images)
        scores, attention = self.head.attend_factored(features, self.keys, self.queries)
        h, w = features.shape[-2:]
        embedding = F.normalize(scores, dim=-1)
        return embedding, scores, attention.reshape(attention.shape[0], attention.shape[1], h, w)
