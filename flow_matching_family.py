# Copyright 2026 The BalancedDPO authors and The HuggingFace Inc. team. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""What the flow-matching transformer families share on top of the training loop every family shares.

`train_balanced_dpo_sd3.py` (SD3 / SD3.5) and `train_balanced_dpo_flux.py` (FLUX.1) each define a
`FlowMatchingFamily` with what is their own (text encoders and how they encode a prompt, the transformer's inputs,
the pipeline call); this module holds what the two have in common:

- `FlowMatchingFamily`: a `training.ModelFamily` for a diffusers transformer trained with the rectified-flow
  Diffusion-DPO loss: its arguments (`--weighting_scheme`, `--logit_mean`, `--logit_std`, `--mode_scale`,
  `--max_sequence_length`, `--cache_text_embeddings`, `--text_embeddings_cache_size`, `--quantize_base`) and their
  checks, loading (an NF4 base through diffusers' bitsandbytes integration), the noise
  (`balanced_dpo.flow_matching_noised_pairs`) and validation / sampling pipelines.
- `PromptEmbeddingPipeline`: a pipeline whose prompts are turned into embeddings by the family's
  `text_embeddings.PromptEmbeddings` (the caption cache SDXL uses too), so that
  validation and sampling condition exactly as training does, with or without the text encoders.
"""

import gc
import time

import torch
from accelerate.logging import get_logger

import balanced_dpo
import training
import training_args
from text_embeddings import PromptEmbeddings


logger = get_logger(__name__)

# T5's relative attention works for any length, but diffusers' SD3 and FLUX pipelines refuse more than 512 tokens.
MAX_T5_SEQUENCE_LENGTH = 512
QUANTIZE_BASE_CHOICES = ("nf4",)
# How much of the available host memory a precomputed text-embedding cache may take.
CACHE_MEMORY_SHARE = 0.8


def check_nf4_supported():
    """Raises ValueError, naming the fix, where diffusers' bitsandbytes 4-bit quantization cannot run.

    diffusers' `BnB4BitDiffusersQuantizer` quantizes on CUDA, XPU or MPS only; it would fail with "No GPU found" after
    the arguments, the dataset and the other models were loaded.
    """
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ValueError("--quantize_base nf4 needs bitsandbytes: `pip install bitsandbytes`.") from None
    has_gpu = torch.cuda.is_available()
    has_gpu = has_gpu or (hasattr(torch, "xpu") and torch.xpu.is_available())
    has_gpu = has_gpu or (hasattr(torch, "mps") and torch.backends.mps.is_available())
    if not has_gpu:
        raise ValueError(
            "--quantize_base nf4 needs a GPU: diffusers quantizes to 4 bits with bitsandbytes on CUDA, XPU or MPS"
            " only, and none is visible here. Drop --quantize_base to train the base model in --mixed_precision, or"
            " run on a GPU."
        )


# ----------------------------------------------------------------------------------------------------------------
# Text conditioning, optionally cached per caption
# ----------------------------------------------------------------------------------------------------------------


class PromptEmbeddingPipeline:
    """A diffusers pipeline whose prompts are encoded by the family's `PromptEmbeddings` instead of its own text
    encoders.

    Validation images and sampled latents are then conditioned exactly as training is (the same token length, the
    same code path, the cache when there is one), and need no text encoder once `--cache_text_embeddings` freed them.
    Everything else (`to`, `disable_lora`, `set_progress_bar_config`, ...) goes to the pipeline.
    """

    def __init__(self, pipeline, family):
        self.pipeline = pipeline
        self.family = family

    def __call__(self, prompt=None, **kwargs):
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        kwargs.update(self.family.pipeline_prompt_kwargs(prompts))
        return self.pipeline(**kwargs)

    def to(self, *args, **kwargs):
        self.pipeline.to(*args, **kwargs)
        return self

    def __getattr__(self, name):
        return getattr(self.pipeline, name)

    def __setattr__(self, name, value):
        # `pipeline.scheduler = ...` (online sampling with --online_scheduler) reaches the wrapped pipeline.
        if name in ("pipeline", "family"):
            object.__setattr__(self, name, value)
        else:
            setattr(self.pipeline, name, value)


# ----------------------------------------------------------------------------------------------------------------
# The family
# ----------------------------------------------------------------------------------------------------------------


class FlowMatchingFamily(training.ModelFamily):
    """A diffusers transformer family trained with the rectified-flow Diffusion-DPO loss (SD3 / SD3.5, FLUX.1).

    Subclasses set `pipeline_class`, `transformer_class`, `text_encoder_names` (the pipeline's component names of
    the text encoders), `default_max_sequence_length` and the usual `ModelFamily` attributes, and implement
    `load_text_encoders`, `tokenizer_fn`, `encode`, `conditioning_kwargs`, `predict` and `pipeline_prompt_kwargs`.
    """

    denoiser_name = "transformer"
    # diffusers' transformer families save LoRAs with peft's keys (lora_A / lora_B).
    lora_in_diffusers_format = False
    transformer_class = None
    text_encoder_names = ()
    # Tokens of the T5 prompt (`--max_sequence_length`); None: decided in `resolve_max_sequence_length`.
    default_max_sequence_length = None

    # -- arguments ------------------------------------------------------------------------------------------------

    @classmethod
    def add_arguments(cls, parser):
        group = parser.add_argument_group("flow matching (the noise level of each pair)")
        group.add_argument(
            "--weighting_scheme",
            type=str,
            default="logit_normal",
            choices=list(balanced_dpo.WEIGHTING_SCHEMES),
            help="How sigma is drawn (logit_normal, mode; uniform otherwise) and how errors are weighted (sigma_sqrt,"
            " cosmap), as in diffusers' SD3 and FLUX training scripts.",
        )
        group.add_argument("--logit_mean", type=float, default=0.0, help="Mean of the logit-normal density.")
        group.add_argument(
            "--logit_std", type=float, default=1.0, help="Standard deviation of the logit-normal density."
        )
        group.add_argument("--mode_scale", type=float, default=1.29, help="Scale of the `mode` density.")
        group = parser.add_argument_group("text encoders and memory")
        default_length = cls.default_max_sequence_length
        group.add_argument(
            "--max_sequence_length",
            type=int,
            default=default_length,
            help=f"Tokens of the T5 prompt, in training, validation and sampling alike (default: {cls.max_sequence_length_help()}).",
        )
        group.add_argument(
            "--cache_text_embeddings",
            action="store_true",
            help="Encode each distinct caption (and validation prompt) once and keep the embeddings in CPU memory."
            " A map-style dataset is encoded before training and the text encoders, T5 included, are then freed; a"
            " streaming dataset is encoded as captions first appear.",
        )
        group.add_argument(
            "--text_embeddings_cache_size",
            type=int,
            default=None,
            help="Most captions kept by --cache_text_embeddings (least recently used go first; the text encoders then"
            " stay loaded; default: no limit).",
        )
        group.add_argument(
            "--quantize_base",
            type=str,
            default=None,
            choices=list(QUANTIZE_BASE_CHOICES),
            help="Load the frozen transformer in 4-bit NF4 (bitsandbytes, through diffusers' BitsAndBytesConfig);"
            " the LoRA trains in float32 on top. Needs a GPU.",
        )

    @classmethod
    def max_sequence_length_help(cls):
        return str(cls.default_max_sequence_length)

    @classmethod
    def validate_args(cls, args):
        if args.text_embeddings_cache_size is not None:
            if not args.cache_text_embeddings:
                raise ValueError("--text_embeddings_cache_size needs --cache_text_embeddings.")
            if args.text_embeddings_cache_size < 1:
                raise ValueError("--text_embeddings_cache_size must be a positive number of captions.")
        if args.max_sequence_length is not None and not 1 <= args.max_sequence_length <= MAX_T5_SEQUENCE_LENGTH:
            raise ValueError(
                f"--max_sequence_length must be in [1, {MAX_T5_SEQUENCE_LENGTH}] (got {args.max_sequence_length})."
            )
        if not args.logit_std > 0:
            raise ValueError(f"--logit_std must be positive (got {args.logit_std}).")
        if args.resolution % 16 != 0:
            # 8x VAE downsampling, then 2x2 patches (SD3's patch embedding, FLUX's packing).
            raise ValueError(f"--resolution must be a multiple of 16 for {cls.description} (got {args.resolution}).")
        if args.quantize_base == "nf4":
            check_nf4_supported()

    # -- loading --------------------------------------------------------------------------------------------------

    def __init__(self, args, transformer, vae, text_encoders, tokenizers, noise_scheduler, weight_dtype):
        super().__init__(args, transformer, vae, weight_dtype)
        self.text_encoders = tuple(text_encoders)
        self.tokenizers = list(tokenizers)
        # Never used for sampling: its sigma table stays the training one (see balanced_dpo.flow_matching_sigmas).
        self.noise_scheduler = noise_scheduler
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.guidance_embeds = bool(getattr(transformer.config, "guidance_embeds", False))
        self.max_sequence_length = self.resolve_max_sequence_length(args)
        self.prompt_embeddings = PromptEmbeddings(
            self.tokenizer_fn(),
            self.encode,
            transformer.device,
            cache=getattr(args, "cache_text_embeddings", False),
            max_entries=getattr(args, "text_embeddings_cache_size", None),
        )

    def resolve_max_sequence_length(self, args):
        return args.max_sequence_length or self.default_max_sequence_length

    @classmethod
    def from_pretrained(cls, args, device, weight_dtype):
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler

        path, revision, variant = args.pretrained_model_name_or_path, args.revision, args.variant
        noise_scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(
            path, subfolder="scheduler", revision=revision
        )
        tokenizers, text_encoders = cls.load_text_encoders(args, weight_dtype)
        vae_config = AutoencoderKL.load_config(path, subfolder="vae", revision=revision)
        vae_dtype = cls.vae_dtype(vae_config, weight_dtype)
        vae = AutoencoderKL.from_pretrained(
            path, subfolder="vae", revision=revision, variant=variant, torch_dtype=vae_dtype
        )
        transformer = cls.load_transformer(args, device, weight_dtype)
        for model in (vae, *text_encoders):
            model.requires_grad_(False)
            model.to(device)
        logger.info(
            f"{cls.description}: resolution {args.resolution}, weights {weight_dtype}, VAE {vae_dtype},"
            f" base {'NF4' if args.quantize_base == 'nf4' else 'not quantized'},"
            f" cached text embeddings {args.cache_text_embeddings}"
        )
        return cls(args, transformer, vae, text_encoders, tokenizers, noise_scheduler, weight_dtype)

    @classmethod
    def vae_dtype(cls, vae_config, weight_dtype):
        """The training precision, except float32 for a VAE that asks to be upcast under fp16."""
        if weight_dtype == torch.float16 and vae_config.get("force_upcast", False):
            return torch.float32
        return weight_dtype

    @classmethod
    def load_text_encoders(cls, args, weight_dtype):
        """(tokenizers, text encoders) of the pipeline, frozen, in `weight_dtype`, on the CPU."""
        raise NotImplementedError

    @classmethod
    def load_transformer(cls, args, device, weight_dtype):
        """The frozen transformer on `device`, in `weight_dtype` or, with `--quantize_base nf4`, in 4-bit NF4 with
        `weight_dtype` as its compute dtype.

        Loaded directly in `weight_dtype` (never in float32 first: FLUX's 12 B parameters would take 48 GB of host
        memory). The NF4 path is that of diffusers' FLUX quantization example: `BitsAndBytesConfig`, then peft's
        `prepare_model_for_kbit_training` (which keeps the few unquantized weights, the norms, in float32).
        """
        kwargs = {
            "subfolder": "transformer",
            "revision": args.revision,
            "variant": args.variant,
            "torch_dtype": weight_dtype,
        }
        if args.quantize_base == "nf4":
            from diffusers import BitsAndBytesConfig
            from peft import prepare_model_for_kbit_training

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=weight_dtype
            )
            kwargs["device_map"] = {"": device}  # each process quantizes onto its own GPU
            transformer = cls.transformer_class.from_pretrained(args.pretrained_model_name_or_path, **kwargs)
            transformer = prepare_model_for_kbit_training(transformer, use_gradient_checkpointing=False)
        else:
            transformer = cls.transformer_class.from_pretrained(args.pretrained_model_name_or_path, **kwargs)
            transformer.to(device)
        transformer.requires_grad_(False)
        return transformer

    def prepare(self, train_dataset, streaming, prompts=()):
        """With --cache_text_embeddings on a map-style dataset (or the prompts of an online run): encodes every
        caption, the empty prompt and the validation prompts now, then frees the text encoders."""
        args = self.args
        if not args.cache_text_embeddings or streaming:
            return
        captions = list(prompts)
        if train_dataset is not None:
            captions += train_dataset.select_columns([args.caption_column])[args.caption_column]
        captions = [c for c in dict.fromkeys(captions) if isinstance(c, str) and c.strip()]
        captions.append("")  # --proportion_empty_prompts, and the negative prompt of classifier-free guidance
        captions += training_args.read_validation_prompts(args.validation_prompts)
        captions = list(dict.fromkeys(captions))
        if args.text_embeddings_cache_size is not None and len(captions) > args.text_embeddings_cache_size:
            logger.warning(
                f"{len(captions)} distinct captions exceed --text_embeddings_cache_size"
                f" {args.text_embeddings_cache_size}: encoding them on the fly and keeping the text encoders."
            )
            return
        available = training._available_host_memory()
        start = time.perf_counter()
        self.prompt_embeddings.precompute(
            captions, max_bytes=CACHE_MEMORY_SHARE * available if available is not None else None
        )
        self.release_text_encoders()
        logger.info(
            f"Encoded {len(captions)} distinct captions in {time.perf_counter() - start:.1f}s"
            f" ({self.prompt_embeddings.cache_bytes() / 2**30:.2f} GiB in CPU memory); text encoders freed."
        )

    def release_text_encoders(self):
        self.prompt_embeddings.release_text_encoders()
        self.text_encoders = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def tokenize_fn(self):
        # Cached embeddings are looked up by caption: no token ids needed.
        return None if self.prompt_embeddings.cached else self.tokenizer_fn()

    # -- the family's own ------------------------------------------------------------------------------------------

    def tokenizer_fn(self):
        """Picklable `list[str] -> dict[str, Tensor]` of token ids (keys starting with `input_ids`)."""
        raise NotImplementedError

    def encode(self, token_ids):
        """The text encoders' conditioning of tokenized captions: a tuple of tensors with one row per caption."""
        raise NotImplementedError

    def conditioning_kwargs(self, embeddings):
        """The transformer's text keyword arguments from embeddings already doubled to [2P, ...]."""
        raise NotImplementedError

    def pipeline_prompt_kwargs(self, prompts):
        """Keyword arguments of the pipeline call that condition it on `prompts` (embeddings, no text)."""
        raise NotImplementedError

    # -- one micro-step -------------------------------------------------------------------------------------------

    def conditioning(self, batch, index, label):
        embeddings = self.prompt_embeddings(batch, index)
        doubled = [e.to(self.weight_dtype).repeat(2, *([1] * (e.ndim - 1))) for e in embeddings]
        return self.conditioning_kwargs(doubled)

    def noised_pairs(self, latents, generator):
        args = self.args
        return balanced_dpo.flow_matching_noised_pairs(
            latents,
            generator,
            self.noise_scheduler,
            weighting_scheme=args.weighting_scheme,
            logit_mean=args.logit_mean,
            logit_std=args.logit_std,
            mode_scale=args.mode_scale,
        )

    # -- validation and sampling ----------------------------------------------------------------------------------

    def validation_pipeline(self, lora_dir=None):
        """The family's pipeline with the training VAE and transformer (LoRA on) or, with `lora_dir`, a fresh base
        transformer (NF4 again with --quantize_base) and the saved LoRA; its prompts go through `PromptEmbeddings`,
        so no text encoder is loaded again."""
        args = self.args
        components = dict.fromkeys(self.text_encoder_names)
        if self.vae.dtype == self.weight_dtype:
            components["vae"] = self.vae
        if lora_dir is None:
            components["transformer"] = self.denoiser
        elif args.quantize_base is not None:
            components["transformer"] = self.load_transformer(args, self.vae.device, self.weight_dtype)
        pipeline = self.pipeline_class.from_pretrained(
            args.pretrained_model_name_or_path,
            revision=args.revision,
            variant=args.variant,
            torch_dtype=self.weight_dtype,
            **components,
        )
        if lora_dir is not None:
            pipeline.load_lora_weights(lora_dir, weight_name=training.LORA_WEIGHTS_NAME)
        return PromptEmbeddingPipeline(pipeline, self)

    def default_license(self):
        return self.default_license_fields()["license"]
