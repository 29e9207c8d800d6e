"""Loading Hugging Face image and video classifiers (with their heads) for model actors.

``tasks.models.load_model`` loads ``AutoModel`` (no classification head). Concept studies need the
class logits, so actors of VCC and VTCD set up with ``load_classifier`` instead.
"""

from __future__ import annotations

from interpflow.tasks.models import (DTYPES, LoadedModel, ModelConfig, check_dtype, check_model_source,
                                     model_identity, resolve_device)
from interpflow.tasks.sites import SiteMap

VIDEO_TYPES = ("videomae", "vivit", "timesformer", "vjepa2")


def classifier_auto(hf_config):
    """The auto class for a config: video classification for video model types (or a
    ``...ForVideoClassification`` architecture), image classification otherwise."""
    from transformers import AutoModelForImageClassification, AutoModelForVideoClassification

    architectures = getattr(hf_config, "architectures", None) or []
    video = getattr(hf_config, "model_type", "") in VIDEO_TYPES or any("Video" in a for a in architectures)
    return AutoModelForVideoClassification if video else AutoModelForImageClassification


def load_classifier(cfg: ModelConfig, model: str) -> LoadedModel:
    """Actor setup: an HF image or video classifier (head included) from a local folder or hub id."""
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    check_model_source(model)
    device = resolve_device(cfg)
    check_dtype(cfg.dtype, device)
    hf_config = AutoConfig.from_pretrained(model, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    net = classifier_auto(hf_config).from_pretrained(model, revision=cfg.revision, dtype=DTYPES[cfg.dtype],
                                                     trust_remote_code=cfg.trust_remote_code)
    net.to(device).eval()
    return LoadedModel(net, None, device, SiteMap(net), str(model), model_identity(str(model), cfg.revision))
