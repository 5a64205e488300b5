"""Import Apple ml-mdm model YAMLs and `vis_model.pth` checkpoints as mdm pipelines.

The YAML is read with PyYAML semantics (the last duplicate key wins, with a warning) and mapped onto
:class:`mdm.config.MDMConfig`. Dataclass fields that ml-mdm's own parser silently drops because they sit at
the YAML's top level (`mixed_ratio`, `multi_res_weights`, sampler flags) are imported as written unless
`as_parsed=True`. Checkpoints are read without unpickling foreign objects and loaded strictly.
"""

from __future__ import annotations

import logging
import warnings
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch
import yaml

from mdm import io
from mdm.config import ConfigError, DiffusionConfig, MDMConfig, ModelConfig, TextConfig, UNetConfig
from mdm.interop.safe_load import load_state_dict
from mdm.models.unet import NestedUNet

DEFAULT_T5 = "google/flan-t5-xl"  # the encoder the released models were trained with

log = logging.getLogger(__name__)


class MlmdmError(ValueError):
    """An ml-mdm file that cannot be imported faithfully."""


class _DuplicateWarningLoader(yaml.SafeLoader):
    """SafeLoader that warns on duplicate mapping keys and keeps the last, as PyYAML does."""

    source = "<yaml>"

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                warnings.warn(
                    f"{self.source}: duplicate key {key!r} (line {key_node.start_mark.line + 1}); the last one wins",
                    stacklevel=2,
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


# Top-level trainer, reader and bookkeeping keys with no effect on the model or the diffusion.
_IGNORED_TOP = {
    "name",
    "dataset_config",
    "min_examples",
    "sample_dir",
    "sample_image_size",
    "test_file_list",
    "output_dir",
    "prediction_length",
    "num_training_steps",
    "avg_lm_steps",
    "categorical_conditioning",
    "vocab_file",
    "text_model",
    "model",
    "vision_model",
    "reader_config",
    "reader_config_file",
    "use_lm_mask",
    "metrics",
    "use_precomputed_text_embeddings",
    "batch_size",
    "gradient_clip_norm",
    "loss_factor",
    "num_gradient_accumulations",
    "warmup_steps",
    "log_freq",
    "save_freq",
    "lr",
    "fp16",
    "seed",
    "use_adamw",
    "pretrained_vision_file",
    "num_eval_batches",
    "device",
    "predict_variances",
    "reproject_signal",
    "random_low_noise",
    "multinode",
    "loglevel",
    "eval_freq",
    "clip_model",
    "unet_config",
    "diffusion_config",
}
_SAMPLER_FIELDS = {
    "num_diffusion_steps",
    "schedule_type",
    "prediction_type",
    "loss_target_type",
    "beta_start",
    "beta_end",
    "threshold_function",
    "rescale_schedule",
    "rescale_signal",
    "schedule_shifted",
    "schedule_shifted_power",
}
_DIFFUSION_FIELDS = {
    "model_output_scale",
    "use_vdm_loss_weights",
    "use_double_loss",
    "multi_res_weights",
    "no_use_residual",
    "mixed_ratio",
    "use_random_interp",
    "random_downsample",
    "average_downsample",
    "mid_downsample",
}
_UNET_FIELDS = {
    "num_resnets_per_resolution",
    "temporal_dim",
    "attention_levels",
    "num_attention_layers",
    "num_temporal_attention_layers",
    "conditioning_feature_dim",
    "conditioning_feature_proj_dim",
    "num_lm_head_layers",
    "masked_cross_attention",
    "resolution_channels",
    "skip_mid_blocks",
    "skip_cond_emb",
    "nesting",
    "micro_conditioning",
    "temporal_mode",
    "temporal_spatial_ds",
    "temporal_positional_encoding",
    "resnet_config",
    "inner_config",
    "skip_inner_unet_input",
    "skip_normalization",
    "initialize_inner_with_pretrained",
    "freeze_inner_unet",
    "interp_conditioning",
}
_RESNET_FIELDS = {"num_channels", "output_channels", "num_groups_norm", "dropout", "use_attention_ffn"}


def _none(v: Any) -> bool:
    return v is None or (isinstance(v, str) and v.strip().lower() in ("", "none", "null"))


def _int_list(v: Any, n: int | None, key: str, source: str) -> list[int]:
    """ml-mdm list fields: a comma string or a list; one value is repeated for every stage when n is given."""
    if _none(v):
        return []
    if isinstance(v, int):
        v = [v]
    if isinstance(v, str):
        v = [x for x in v.split(",") if x.strip()]
    try:
        out = [int(x) for x in v]
    except (TypeError, ValueError):
        raise MlmdmError(f"{source}: {key} must be integers, got {v!r}") from None
    if n is not None and len(out) == 1:
        out = out * n
    return out


def _enum(v: Any, table: dict[str, str], key: str, source: str) -> str:
    name = str(v).split(".")[-1].upper()
    if name not in table:
        raise MlmdmError(f"{source}: {key} = {v!r} is not one of {', '.join(table)}")
    return table[name]


def _level(d: dict, key: str, source: str, innermost: bool, text_dim: int) -> UNetConfig:
    """Map one ml-mdm UNetConfig/NestedUNetConfig mapping onto a level config."""
    unknown = sorted(set(d) - _UNET_FIELDS)
    if unknown:
        raise MlmdmError(f"{source}: unknown key(s) {', '.join(key + '.' + k for k in unknown)}")
    res = d.get("resnet_config") or {}
    bad = sorted(set(res) - _RESNET_FIELDS)
    if bad:
        raise MlmdmError(f"{source}: unknown key(s) {', '.join(key + '.resnet_config.' + k for k in bad)}")
    if d.get("temporal_mode") or _int_list(d.get("num_temporal_attention_layers"), None, key, source):
        raise MlmdmError(f"{source}: {key}: temporal (video) levels are not supported by the importer")
    if d.get("skip_inner_unet_input"):
        raise MlmdmError(f"{source}: {key}.skip_inner_unet_input: true cannot run (ml-mdm crashes on it)")
    channels = _int_list(d.get("resolution_channels", "128,256,256,512,1024"), None, key, source)
    n = len(channels)
    micro = {}
    if not _none(d.get("micro_conditioning")):
        for item in str(d["micro_conditioning"]).split(","):
            name, _, default = item.partition(":")
            try:
                micro[name.strip()] = float(default)
            except ValueError:
                raise MlmdmError(f"{source}: {key}.micro_conditioning item {item!r} must be name:number") from None
    proj = int(d.get("conditioning_feature_proj_dim", -1))
    if innermost and d.get("skip_cond_emb", False) and text_dim > 0:
        raise MlmdmError(f"{source}: {key}.skip_cond_emb: true on the innermost level of a text model cannot run")
    level = UNetConfig(
        channels=channels,
        num_res_blocks=_int_list(d.get("num_resnets_per_resolution", "2"), n, key, source),
        attention_levels=_int_list(d.get("attention_levels", "2,3"), None, key, source),
        num_attention_layers=_int_list(d.get("num_attention_layers", "1"), n, key, source),
        attention_ffn=bool(res.get("use_attention_ffn", False)),
        num_groups=int(res.get("num_groups_norm", 32)),
        dropout=float(res.get("dropout", 0.0)),
        temb_dim=None if _none(d.get("temporal_dim")) else int(d["temporal_dim"]),
        masked_cross_attention=bool(int(d.get("masked_cross_attention", 1))),
        micro_conditioning=micro,
    )
    if innermost:
        level.mid_blocks = not d.get("skip_mid_blocks", False)
        level.text_proj_dim = proj if proj > 0 and text_dim > 0 else 0
        level.num_lm_head_layers = int(d.get("num_lm_head_layers", 0))
    else:
        level.normalize_input = not d.get("skip_normalization", False)
    return level


def _tree(unet: dict, source: str, text_dim: int) -> UNetConfig:
    chain = [unet]
    while isinstance(chain[-1].get("inner_config"), dict):
        chain.append(chain[-1]["inner_config"])
    levels = [
        _level(d, "unet_config" + ".inner_config" * i, source, i == len(chain) - 1, text_dim)
        for i, d in enumerate(chain)
    ]
    for outer, inner in pairwise(levels):
        outer.inner = inner
    return levels[0]


def _architecture_levels(name: str) -> int | None:
    if name == "unet":
        return 1
    if name == "nested_unet":
        return 2
    if name.startswith("nested") and name.endswith("_unet") and name[6:-5].isdigit():
        return int(name[6:-5]) + 1
    return None


def read_yaml(path: str | Path) -> dict:
    """The YAML as a dict, with duplicate keys reported."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: ml-mdm config not found")
    loader_cls = type("_Loader", (_DuplicateWarningLoader,), {"source": str(path)})
    try:
        data = yaml.load(path.read_text(), Loader=loader_cls)
    except yaml.YAMLError as e:
        raise MlmdmError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise MlmdmError(f"{path}: expected a mapping at the top level")
    return data


def config_from_mlmdm(
    path: str | Path, text_dim: int, as_parsed: bool = False, text_encoder: str | None = None
) -> MDMConfig:
    """Translate an ml-mdm model YAML into an MDMConfig; `text_dim` is the text-encoder width (0 = none).

    A text model records `text_encoder` (a T5 directory or hub id; default FLAN-T5 XL) with the released
    models' token and character limits (128 tokens; captions cut to 512 characters at inference).
    """
    source = str(path)
    data = read_yaml(path)
    unknown = sorted(set(data) - _IGNORED_TOP - _SAMPLER_FIELDS - _DIFFUSION_FIELDS - _UNET_FIELDS)
    if unknown:
        raise MlmdmError(f"{source}: unknown top-level key(s) {', '.join(unknown)}")
    if not isinstance(data.get("unet_config"), dict):
        raise MlmdmError(f"{source}: 'unet_config' section missing")
    diff = dict(data.get("diffusion_config") or {})
    sampler = dict(diff.pop("sampler_config", None) or {})
    bad = sorted(set(diff) - _DIFFUSION_FIELDS)
    if bad:
        raise MlmdmError(f"{source}: unknown key(s) {', '.join('diffusion_config.' + k for k in bad)}")
    bad = sorted(set(sampler) - _SAMPLER_FIELDS - {"reproject_signal"})
    if bad:
        raise MlmdmError(f"{source}: unknown key(s) {', '.join('diffusion_config.sampler_config.' + k for k in bad)}")
    for section, fields in ((sampler, _SAMPLER_FIELDS), (diff, _DIFFUSION_FIELDS)):
        for k in sorted(fields & set(data)):
            if k in section:
                continue
            if as_parsed:
                log.warning("%s: top-level %s ignored, as ml-mdm's parser does", source, k)
            else:
                log.warning(
                    "%s: top-level %s = %r imported as written (ml-mdm's parser would drop it)",
                    source,
                    k,
                    data[k],
                )
                section[k] = data[k]

    unet = _tree(data["unet_config"], source, text_dim)
    n_levels = len(unet.levels())
    arch = str(data.get("vision_model") or data.get("model") or "")
    expected = _architecture_levels(arch)
    if expected is not None and expected != n_levels:
        raise MlmdmError(f"{source}: model {arch!r} has {expected} level(s) but unet_config nests {n_levels}")

    if not _none(sampler.get("schedule_type")) and str(sampler["schedule_type"]).upper() == "SIGMOID":
        raise MlmdmError(f"{source}: schedule_type SIGMOID is not usable in ml-mdm (never wired in)")
    schedule = _enum(
        sampler.get("schedule_type", "DDPM"),
        {"DEEPFLOYD": "cosine", "DDPM": "linear", "COSINE": "logsnr_cosine"},
        "schedule_type",
        source,
    )
    preds = {"DDPM": "eps", "DDIM": "eps", "V_PREDICTION": "v"}
    prediction = _enum(sampler.get("prediction_type", "DDPM"), preds, "prediction_type", source)
    target = sampler.get("loss_target_type")
    target = prediction if _none(target) else _enum(target, preds, "loss_target_type", source)
    if float(sampler.get("rescale_schedule", 1.0)) != 1.0:
        raise MlmdmError(f"{source}: rescale_schedule != 1 is not supported")
    if float(diff.get("model_output_scale", 0) or 0) != 0:
        raise MlmdmError(f"{source}: model_output_scale != 0 is not supported")
    shifted = bool(sampler.get("schedule_shifted", False))
    if n_levels > 1 and not shifted:
        raise MlmdmError(f"{source}: schedule_shifted: false on a nested model (signal rescaling) is not supported")
    if diff.get("use_vdm_loss_weights", True):
        log.warning("%s: use_vdm_loss_weights is ignored: mdm's loss has no time weighting", source)
    weights = diff.get("multi_res_weights")
    mixed = diff.get("mixed_ratio")
    use_double = bool(diff.get("use_double_loss", False))
    diffusion = DiffusionConfig(
        schedule=schedule,
        num_train_timesteps=int(sampler.get("num_diffusion_steps", 32)),
        beta_start=float(sampler.get("beta_start", 1e-4)),
        beta_end=float(sampler.get("beta_end", 0.02)),
        snr_shift="shift" if shifted else "none",
        shift_power=float(sampler.get("schedule_shifted_power", 1)),
        prediction_type=prediction,
        loss_target=target,
        level_weights=None if _none(weights) or not use_double else _floats(weights, "multi_res_weights", source),
        loss_on_all_levels=use_double,
        mixed_ratio=None if _none(mixed) else _floats(mixed, "mixed_ratio", source),
        cond_drop_prob=0.1,
        thresholding=_enum(
            sampler.get("threshold_function", "CLIP"),
            {"CLIP": "clip", "DYNAMIC": "dynamic", "DYNAMIC_IF": "dynamic_if", "NONE": "none"},
            "threshold_function",
            source,
        ),
    )
    reader = data.get("reader_config") or {}
    size = data.get("sample_image_size") or reader.get("image_size")
    if _none(size):
        raise MlmdmError(f"{source}: no image size (sample_image_size or reader_config.image_size)")
    model = ModelConfig(image_size=int(size), text_dim=text_dim, unet=unet)
    text = TextConfig(encoder="t5", path=text_encoder or DEFAULT_T5, max_chars=512) if text_dim > 0 else TextConfig()
    cfg = MDMConfig(model=model, diffusion=diffusion, text=text)
    try:
        return cfg.validate(source)
    except ConfigError as e:
        raise MlmdmError(str(e)) from None


def _floats(v: Any, key: str, source: str) -> list[float]:
    parts = str(v).split(":") if isinstance(v, str) else v
    try:
        return [float(x) for x in parts]
    except (TypeError, ValueError):
        raise MlmdmError(f"{source}: {key} must look like 'a:b', got {v!r}") from None


def _text_dim_from_state(sd: dict[str, torch.Tensor]) -> int:
    """The text width the checkpoint was trained with: lm_proj's input, else cond_emb's input (0 = none)."""
    inner = max((k for k in sd if k.endswith("cond_emb.weight")), key=lambda k: k.count("inner_unet."), default=None)
    if inner is None:
        return 0
    prefix = inner[: -len("cond_emb.weight")]
    proj = sd.get(prefix + "lm_proj.weight")
    return int(proj.shape[1] if proj is not None else sd[inner].shape[1])


def _unused_by_reference(key: str, n_levels: int) -> bool:
    """Parameters ml-mdm creates but never runs: interp layers, and mid blocks / text layers of nested levels."""
    depth = key.count("inner_unet.")
    rest = key.split("inner_unet.")[-1]
    if rest.startswith("interp_layer"):
        return True
    nested_level = depth < n_levels - 1
    return nested_level and rest.split(".")[0] in ("mid_blocks", "cond_emb", "lm_proj", "lm_head")


def check_state_dict(model: torch.nn.Module, sd: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Strict key, shape, dtype and finiteness check; returns the tensors in the model's dtype."""
    n_levels = model.num_levels
    extra = [k for k in sd if _unused_by_reference(k, n_levels)]
    if extra:
        log.warning("%s: dropping %d tensor(s) ml-mdm never uses: %s", source, len(extra), ", ".join(extra[:5]))
        sd = {k: v for k, v in sd.items() if k not in extra}
    expected = model.state_dict()
    io.check_keys(expected, sd, f"{source}: checkpoint does not match the config", limit=None, error=MlmdmError)
    out = {}
    for k, v in sd.items():
        if not v.is_floating_point():
            raise MlmdmError(f"{source}: {k} has dtype {v.dtype}, expected floating point")
        if not torch.isfinite(v).all():
            raise MlmdmError(f"{source}: {k} holds non-finite values")
        out[k] = v.to(expected[k].dtype)
    return out


def _encoder_path(text_encoder: Any) -> str | None:
    """What the converted config records for a text encoder given as a path, hub id or encoder object."""
    if isinstance(text_encoder, (str, Path)):
        return str(Path(text_encoder).resolve()) if Path(text_encoder).is_dir() else str(text_encoder)
    return getattr(text_encoder, "path", None)


def load(
    checkpoint: str | Path,
    config_yaml: str | Path,
    text_encoder: Any = None,
    text_dim: int | None = None,
    as_parsed: bool = False,
    dtype: torch.dtype = torch.float32,
) -> Any:
    """Build an :class:`mdm.MDMPipeline` from an ml-mdm checkpoint and its model YAML.

    The text width comes from `text_dim`, else from the text encoder, else from the checkpoint itself.
    """
    from mdm.pipeline import MDMPipeline

    sd, meta = load_state_dict(checkpoint)
    found = _text_dim_from_state(sd)
    if text_dim is None and text_encoder is not None and hasattr(text_encoder, "dim"):
        text_dim = int(text_encoder.dim)
    if text_dim is not None and found and text_dim != found:
        raise MlmdmError(f"{checkpoint}: trained with {found}-wide text features, but text_dim = {text_dim}")
    cfg = config_from_mlmdm(
        config_yaml,
        text_dim=found if text_dim is None else text_dim,
        as_parsed=as_parsed,
        text_encoder=_encoder_path(text_encoder),
    )
    with torch.device("meta"):
        unet = NestedUNet(cfg.model)
    unet.load_state_dict(check_state_dict(unet, sd, str(checkpoint)), strict=True, assign=True)
    unet = unet.to(dtype).eval()
    provenance = {
        "source": Path(checkpoint).name,
        "sha256": io.sha256(checkpoint),
        **{k: str(v) for k, v in meta.items()},
    }
    return MDMPipeline(
        unet,
        cfg,
        text_encoder=None if isinstance(text_encoder, (str, Path)) else text_encoder,
        provenance=provenance,
    )
