# Copyright 2026 The BalancedDPO authors. All rights reserved.
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
"""The scorer framework: the `Scorer` base class and its registry, the score cache, duplicate handling, and
`ScorerSet`, which runs the scorers of a run on shared models, preprocessing and embeddings. The built-in scorers
are in `multi_metric.builtin_scorers`.
"""

import contextlib
import importlib
import inspect
import json
import os
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from .cuda_graphs import CUDAGraphRunner
from .images import MultiPreprocessor, _as_image_list, hash_image


DEFAULT_REWARD_MODELS = ["pickscore", "hpsv2", "clip", "aesthetic"]


# ----------------------------------------------------------------------------------------------------------------
# Dtypes and prompts
# ----------------------------------------------------------------------------------------------------------------

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "no": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def _resolve_dtype(dtype) -> torch.dtype:
    """Accepts a torch dtype or a name ("float32", "bf16", "fp16", ...); None means float32."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().replace("torch.", "")
    if key not in _DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; choose one of {sorted(set(_DTYPES))} or a torch.dtype.")
    return _DTYPES[key]


def default_scorer_dtype(device) -> str:
    """The dtype scorers run in when none is given for training or evaluation: float16 on CUDA, float32 elsewhere.

    Scores feed votes, and votes of close pairs flip with rounding: on 512 pairs of the tiny scorers
    (`benchmarks/scorer_precision.py`), bfloat16 scoring changed 2.0% of the majority labels of float32 scoring and
    float16 none, at the speed and memory of bfloat16. CPUs run float16 slowly, so they keep float32.
    """
    return "float16" if torch.device(device).type == "cuda" else "float32"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _as_prompt_list(prompts, n: int) -> List[str]:
    if isinstance(prompts, str):
        return [prompts] * n
    prompts = [str(p) for p in prompts]
    if len(prompts) != n:
        raise ValueError(f"Got {n} images but {len(prompts)} prompts; pass one prompt per image (or a single string).")
    return prompts


# ----------------------------------------------------------------------------------------------------------------
# Score cache and per-call context
# ----------------------------------------------------------------------------------------------------------------


class ScoreCache:
    """In-memory cache of scores keyed by (scorer identity, image content hash, prompt).

    Scoring an (image, prompt) pair that is already cached runs no model. Images are hashed after preprocessing
    (the pixel tensor bytes), so PIL inputs and preprocessed tensors of the same image share entries. Pass
    `max_entries` to bound memory (least recently used entries are evicted first).
    """

    def __init__(self, max_entries: Optional[int] = None):
        self.max_entries = max_entries
        self._entries: "OrderedDict[tuple, float]" = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self):
        return len(self._entries)

    def __contains__(self, key):
        return key in self._entries

    def get(self, key) -> Optional[float]:
        value = self._entries.get(key)
        if value is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return value

    def put(self, key, value: float):
        self._entries[key] = float(value)
        self._entries.move_to_end(key)
        if self.max_entries is not None:
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def clear(self):
        self._entries.clear()
        self.hits = self.misses = 0

    def state_dict(self) -> dict:
        return {"entries": [list(key) + [value] for key, value in self._entries.items()]}

    def load_state_dict(self, state: dict):
        self._entries = OrderedDict((tuple(entry[:-1]), float(entry[-1])) for entry in state["entries"])


class ScoreContext:
    """Memo for one scoring call: lets scorers that share a model reuse its image/text embeddings and lets all
    scorers share the per-image hashes and row subsets of a preprocessed tensor."""

    def __init__(self, rows_unique: bool = False):
        self._memo: Dict[Any, Any] = {}
        # Set by ScorerSet once it has kept only the first of identical rows, so scorers need not look again.
        self.rows_unique = rows_unique

    def get(self, key, compute: Callable[[], Any]):
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def row_hashes(self, pixel_values: torch.Tensor) -> List[str]:
        return self.get(("hashes", id(pixel_values)), lambda: [hash_image(row) for row in pixel_values.detach().cpu()])

    def subset(self, pixel_values: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
        rows = tuple(rows)
        index = torch.tensor(rows, dtype=torch.long, device=pixel_values.device)
        return self.get(("subset", id(pixel_values), rows), lambda: pixel_values.index_select(0, index))


# Elements of each image compared before two images are compared in full (see `_canonical_rows`).
_DUPLICATE_SAMPLE_SIZE = 64


def _row_samples(rows: torch.Tensor, count: int) -> torch.Tensor:
    """A few evenly spaced values of each row of `rows` [..., N, D], on the CPU (one small copy)."""
    step = max(1, rows.shape[-1] // _DUPLICATE_SAMPLE_SIZE)
    samples = rows[..., ::step][..., :_DUPLICATE_SAMPLE_SIZE].reshape(count, -1).cpu().contiguous()
    return samples.view(torch.uint8)  # bytes, whatever the dtype (numpy has no bfloat16)


def _canonical_rows(samples: List[torch.Tensor], prompts: List[str], equal: Callable[[int, int], bool]):
    """For each row, the first row with the same pixels (under every preprocessing) and prompt; None when every row
    is unique, which is the common case and costs a few hashed bytes per row.

    `samples` hold a few values of each row per preprocessing (`_row_samples`): rows whose samples differ cannot be
    identical, and rows whose samples agree are compared in full with `equal(i, j)`, so the result is exact.
    Scoring only the first of identical rows makes identical inputs score identically: batched kernels may otherwise
    round two copies of an image differently, depending on the thread count.
    """
    keys = [tuple(s[i].numpy().tobytes() for s in samples) + (prompts[i],) for i in range(len(prompts))]
    if len(set(keys)) == len(keys):
        return None
    canonical, first_by_key = [], {}
    for i, key in enumerate(keys):
        candidates = first_by_key.setdefault(key, [])
        match = next((j for j in candidates if equal(i, j)), None)
        if match is None:
            candidates.append(i)
            match = i
        canonical.append(match)
    return None if canonical == list(range(len(keys))) else canonical


def _duplicates(samples: List[torch.Tensor], equal: Callable[[int, int], bool], prompts: List[str]):
    """(canonical rows by image and prompt, canonical rows by image alone: for the prompt-free scorers)."""
    return _canonical_rows(samples, prompts, equal), _canonical_rows(samples, [""] * len(prompts), equal)


def _tensor_duplicates(images: Union[torch.Tensor, Dict[str, torch.Tensor]], prompts: List[str]):
    """`_duplicates` of pixel tensors [N, 3, H, W] (or a dict of them, one per preprocessing)."""
    tensors = list(images.values()) if isinstance(images, dict) else [images]
    n = len(prompts)
    flat = [t.reshape(n, -1) for t in tensors]
    samples = [_row_samples(t, n) for t in flat]
    return _duplicates(samples, lambda i, j: all(torch.equal(t[i], t[j]) for t in flat), prompts)


def _select_rows(images, rows: List[int]):
    index = None
    selected = {}
    for key, tensor in images.items() if isinstance(images, dict) else [(None, images)]:
        if index is None or index.device != tensor.device:
            index = torch.tensor(rows, dtype=torch.long, device=tensor.device)
        selected[key] = tensor.index_select(0, index)
    return selected if isinstance(images, dict) else selected[None]


def _expand_rows(values: torch.Tensor, canonical: List[int]) -> torch.Tensor:
    """Scores of the unique rows [U] -> scores of every row [N], each duplicate taking its first copy's score."""
    position = {row: k for k, row in enumerate(sorted(set(canonical)))}
    index = torch.tensor([position[row] for row in canonical], dtype=torch.long, device=values.device)
    return values.index_select(0, index)


# ----------------------------------------------------------------------------------------------------------------
# Scorer base class and registry
# ----------------------------------------------------------------------------------------------------------------

_SCORERS: Dict[str, type] = {}


def _registry() -> Dict[str, type]:
    """The registered scorers, built-in ones included whichever module of the package was imported first."""
    importlib.import_module(f"{__package__}.builtin_scorers")  # they register themselves on its first import
    return _SCORERS


def register_scorer(name: str):
    """Class decorator registering a `Scorer` subclass under `name` so `build_scorer(name)` and
    `--reward_models name` find it."""

    def decorator(cls):
        if not (isinstance(cls, type) and issubclass(cls, Scorer)):
            raise TypeError(f"@register_scorer({name!r}) needs a subclass of rewards.Scorer, got {cls!r}.")
        cls.name = name
        _registry()[name] = cls  # after the built-ins, so a user scorer may replace one
        return cls

    return decorator


def available_scorers() -> List[str]:
    """Names of the registered scorers (built-in and user ones)."""
    return sorted(_registry())


def _scorer_class(name: str) -> type:
    registry = _registry()
    if name in registry:
        return registry[name]
    if ":" in name:
        module_name, _, class_name = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            raise ValueError(f"Cannot import module '{module_name}' for scorer '{name}': {error}") from error
        cls = module
        for part in class_name.split("."):
            cls = getattr(cls, part, None)
            if cls is None:
                raise ValueError(f"Module '{module_name}' has no attribute '{class_name}' (scorer '{name}').")
        if not (isinstance(cls, type) and issubclass(cls, Scorer)):
            raise ValueError(f"'{name}' is not a subclass of rewards.Scorer.")
        return cls
    raise ValueError(
        f"Unknown reward metric '{name}'. Available: {', '.join(available_scorers())}; or give a user scorer as "
        "'package.module:ClassName'."
    )


def build_scorer(name: str, **options) -> "Scorer":
    """Builds a scorer by registered name or as `"package.module:ClassName"`.

    Common options: `device`, `dtype` ("float32", "bfloat16", "float16" or a torch.dtype; weights are cast to it),
    `batch_size`, `temperature` (overrides the native scale), `weight` (voting weight), `cache` (a ScoreCache).
    Model options (`path`, `processor_path`, `head_path`, `arch`, `tokenizer_path`, ...) accept a Hub id or a local
    path; see each scorer's docstring.
    """
    cls = _scorer_class(name)
    accepted = _accepted_options(cls)
    cache = options.get("cache")
    if accepted is not None:
        for internal in ("model_pool", "cache"):  # passed by build_scorers; optional for user scorers
            if internal not in accepted:
                options.pop(internal, None)
        unknown = sorted(set(options) - accepted)
        if unknown:
            raise ValueError(
                f"Unknown option(s) {unknown} for scorer '{name}'; it accepts {sorted(accepted - {'model_pool'})}."
            )
    scorer = cls(**options)
    scorer.name = name
    if cache is not None:
        scorer.cache = cache
    if not scorer._identity:
        skip = {"device", "batch_size", "temperature", "weight", "cache", "model_pool"}
        scorer._identity = {k: v for k, v in options.items() if k not in skip}
    return scorer


def _accepted_options(cls) -> Optional[set]:
    """Keyword options the constructor chain of `cls` accepts (None when it takes arbitrary keywords)."""
    accepted = set()
    for klass in cls.__mro__:
        if "__init__" not in klass.__dict__ or klass is object:
            continue
        parameters = inspect.signature(klass.__init__).parameters.values()
        accepted |= {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"self"}
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            return accepted
    return None


class Scorer:
    """Base class of every scorer: maps (image, prompt) pairs to a scalar score.

    A subclass sets `self.preprocessor` (a picklable callable: list of PIL images -> float32 tensor [N, 3, H, W]) and
    implements either `compute_scores(pixel_values, prompts)` for one batch (already on the scorer's device and in
    its dtype) or, for full control, `_score_pixels(pixel_values, prompts, context)`. Override `modules()` to return
    the nn.Modules that `to(device)` must move. Register it with `@register_scorer("name")` or pass
    `"package.module:ClassName"` to `build_scorer`.

    `score()` batches by `batch_size`, runs under `torch.inference_mode()`, uses the cache when one is given and
    returns a float32 CPU tensor (a normal tensor, usable in autograd-recorded code).
    """

    name: Optional[str] = None
    default_temperature: float = 1.0
    # Scorers whose score ignores the prompt set this, so their cache entries are shared across prompts.
    prompt_free: bool = False

    def __init__(
        self,
        device=None,
        dtype=None,
        batch_size: int = 32,
        temperature: Optional[float] = None,
        weight: float = 1.0,
        cache: Optional[ScoreCache] = None,
        model_pool: Optional[dict] = None,
    ):
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = _resolve_dtype(dtype)
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        self._temperature_override = temperature is not None
        self.temperature = float(temperature) if temperature is not None else float(self.default_temperature)
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}.")
        self.weight = float(weight)
        if self.weight < 0:
            raise ValueError(f"weight must be >= 0, got {weight}.")
        self.cache = cache
        self.model_pool = model_pool if model_pool is not None else {}
        # Set by ScorerSet(cuda_graphs=True): forwards replay CUDA graphs (see CUDAGraphRunner).
        self.graphs: Optional[CUDAGraphRunner] = None
        self.preprocessor: Optional[Callable] = None
        self._preprocess_key: Optional[str] = None
        self._identity: Dict[str, Any] = {}

    # -- preprocessing ------------------------------------------------------------------------------------------

    @property
    def preprocess_key(self) -> str:
        """Scorers with equal keys use identical image preprocessing and share one preprocessed tensor."""
        if self._preprocess_key is not None:
            return self._preprocess_key
        key = getattr(self.preprocessor, "key", None)
        return key if key is not None else f"{type(self).__module__}.{type(self).__qualname__}"

    @preprocess_key.setter
    def preprocess_key(self, value: str):
        self._preprocess_key = value

    def preprocess(self, images) -> torch.Tensor:
        """List of PIL images -> float32 CPU tensor [N, 3, H, W] (the same as `self.preprocessor(images)`)."""
        if self.preprocessor is None:
            raise NotImplementedError(f"Scorer {type(self).__name__} sets no preprocessor.")
        return self.preprocessor(_as_image_list(images))

    # -- devices ------------------------------------------------------------------------------------------------

    def modules(self) -> List[nn.Module]:
        """The modules holding this scorer's weights (moved by `to`)."""
        return []

    def to(self, device) -> "Scorer":
        self.device = torch.device(device)
        for module in self.modules():
            module.to(self.device)
        return self

    @property
    def cache_id(self) -> str:
        """Identity of the scores this scorer produces (class, name, model options and dtype)."""
        options = json.dumps(self._identity, sort_keys=True, default=str)
        return f"{type(self).__module__}.{type(self).__qualname__}|{self.name}|{options}|{_dtype_name(self.dtype)}"

    # -- scoring ------------------------------------------------------------------------------------------------

    def _pixel_values(self, images) -> torch.Tensor:
        if isinstance(images, dict):
            if self.preprocess_key not in images:
                raise KeyError(f"No preprocessed tensor for key '{self.preprocess_key}' (scorer '{self.name}').")
            images = images[self.preprocess_key]
        if isinstance(images, torch.Tensor):
            if images.ndim == 3:
                images = images.unsqueeze(0)
            if images.ndim != 4:
                raise ValueError(f"Expected pixel values [N, 3, H, W], got shape {tuple(images.shape)}.")
            return images
        return self.preprocess(images)

    def score(self, images, prompts, context: Optional[ScoreContext] = None) -> torch.Tensor:
        """Scores images (a list of PIL images, the preprocessed tensor, or a dict from a MultiPreprocessor) against
        their prompts (one per image, or one string for all). Returns a float32 CPU tensor [N]."""
        return self.score_on_device(images, prompts, context).cpu().clone()

    def score_on_device(self, images, prompts, context: Optional[ScoreContext] = None) -> torch.Tensor:
        """As `score`, but without waiting for the device: a float32 tensor [N] on the scorer's device (on the CPU
        when a cache is used, which needs the values), so a ScorerSet copies every metric to the host at once."""
        pixel_values = self._pixel_values(images)
        prompts = _as_prompt_list(prompts, len(pixel_values))
        context = context if context is not None else ScoreContext()
        n = len(prompts)
        if n == 0:
            return torch.zeros(0)
        if self.cache is None:
            canonical = None
            if not context.rows_unique:
                canonical = _tensor_duplicates(pixel_values, prompts)[1 if self.prompt_free else 0]
            if canonical is not None:  # identical (image, prompt) rows run once
                rows = sorted(set(canonical))
                unique = self.score_on_device(
                    _select_rows(pixel_values, rows), [prompts[i] for i in rows], ScoreContext(rows_unique=True)
                )
                return _expand_rows(unique, canonical)
            with torch.inference_mode():
                computed = self._score_pixels(pixel_values, prompts, context).detach().float().reshape(-1)
            if computed.numel() != n:
                raise RuntimeError(f"Scorer '{self.name}' returned {computed.numel()} scores for {n} images.")
            return computed
        # Cached: each (image, prompt) is looked up; identical pairs and misses run once, and are stored.
        values = [None] * n
        hashes = context.row_hashes(pixel_values)
        keys = [(self.cache_id, h, "" if self.prompt_free else p) for h, p in zip(hashes, prompts)]
        first_row = {}
        for i, key in enumerate(keys):
            cached = self.cache.get(key)
            if cached is not None:
                values[i] = cached
            else:
                first_row.setdefault(key, i)
        rows = sorted(first_row.values())
        if rows:
            subset = pixel_values if len(rows) == n else context.subset(pixel_values, rows)
            with torch.inference_mode():
                computed = self._score_pixels(subset, [prompts[i] for i in rows], context)
                computed = computed.detach().float().cpu().tolist()
            if len(computed) != len(rows):
                raise RuntimeError(f"Scorer '{self.name}' returned {len(computed)} scores for {len(rows)} images.")
            by_key = {}
            for i, value in zip(rows, computed):
                self.cache.put(keys[i], value)
                by_key[keys[i]] = value
            values = [by_key[keys[i]] if v is None else v for i, v in enumerate(values)]
        return torch.tensor(values, dtype=torch.float32)

    def _score_pixels(self, pixel_values: torch.Tensor, prompts: List[str], context: ScoreContext) -> torch.Tensor:
        """Scores all rows; the default batches `compute_scores` over `batch_size` rows on the scorer's device."""
        outputs = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = pixel_values[start : start + self.batch_size].to(device=self.device, dtype=self.dtype)
            outputs.append(self.compute_scores(chunk, prompts[start : start + self.batch_size]).float().reshape(-1))
        return torch.cat(outputs) if outputs else torch.zeros(0)

    def compute_scores(self, pixel_values: torch.Tensor, prompts: List[str]) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement compute_scores or _score_pixels.")

    def __repr__(self):
        return (
            f"{type(self).__name__}(name={self.name!r}, temperature={self.temperature:.4g}, weight={self.weight}, "
            f"device={self.device}, dtype={_dtype_name(self.dtype)})"
        )


# ----------------------------------------------------------------------------------------------------------------
# Sets of scorers
# ----------------------------------------------------------------------------------------------------------------


def load_reward_config(config: Union[str, os.PathLike, dict, None]) -> Dict[str, dict]:
    """Reads a reward config: a JSON object mapping each metric name to its `build_scorer` options.

    Accepts a path to a JSON file, a dict, or None (empty config). Returns a fresh dict of dicts.
    """
    if config is None:
        return {}
    if isinstance(config, (str, os.PathLike)):
        path = os.fspath(config)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Reward config '{path}' not found.")
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    if not isinstance(config, dict) or not all(isinstance(v, dict) for v in config.values()):
        raise ValueError("A reward config must be a JSON object mapping metric names to objects of options.")
    return json.loads(json.dumps(config))


def _parse_names(names) -> List[str]:
    if names is None:
        return list(DEFAULT_REWARD_MODELS)
    if isinstance(names, str):
        names = names.split(",")
    names = [n.strip() for n in names if n and n.strip()]
    if not names:
        raise ValueError("No reward metric given.")
    if len(set(names)) != len(names):
        raise ValueError(f"Duplicate reward metrics in {names}.")
    return names


def _pair_duplicates(pair_inputs: Dict[str, torch.Tensor], prompts: List[str]):
    """`_tensor_duplicates` of the [2B] rows (images 0 of every pair, then images 1) of [B, 2, 3, H, W] pair
    tensors, without building that [2B] copy. `prompts` has one prompt per row."""
    count = len(prompts) // 2
    flat = [value.flatten(2) for value in pair_inputs.values()]  # [B, 2, D] views
    samples = [_row_samples(value.transpose(0, 1), 2 * count) for value in flat]

    def equal(i, j):
        return all(torch.equal(value[i % count, i // count], value[j % count, j // count]) for value in flat)

    return _duplicates(samples, equal, prompts)


class PendingScores:
    """Scores of a batch of pairs that may still be computing on the device (see `ScorerSet.score_pairs_async`).

    `result()` waits for them and returns (scores_0, scores_1), each {metric name: float32 CPU tensor [B]}.
    `host_seconds` is the host time spent starting the scoring.
    """

    def __init__(self, names: List[str], values: torch.Tensor, count: int, event=None, host_seconds: float = 0.0):
        self.names = list(names)
        self._values = values  # [metrics, 2 * count]: image 0 of every pair, then image 1
        self.count = count
        self._event = event
        self.host_seconds = host_seconds

    def done(self) -> bool:
        return self._event is None or self._event.query()

    def result(self):
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        values = self._values
        scores_0 = {m: values[i, : self.count].clone() for i, m in enumerate(self.names)}
        scores_1 = {m: values[i, self.count :].clone() for i, m in enumerate(self.names)}
        return scores_0, scores_1


def _scores_to_host(names: List[str], scores: Dict[str, torch.Tensor], non_blocking: bool = False) -> torch.Tensor:
    """One [metrics, N] float32 CPU tensor: a single device-to-host copy instead of one synchronisation per metric."""
    stacked = torch.stack([scores[m].to(scores[names[0]].device, torch.float32) for m in names])
    if stacked.device.type == "cpu":
        return stacked
    host = torch.empty(stacked.shape, dtype=torch.float32, pin_memory=non_blocking)
    host.copy_(stacked, non_blocking=non_blocking)
    return host


class ScorerSet:
    """The scorers of one run, sharing models, preprocessing, embeddings and a cache.

    Attributes: `names`, `scorers` (name -> scorer), `temperatures`, `weights` (name -> float), `preprocessor` (a
    picklable MultiPreprocessor: list of PIL images -> {preprocess_key: tensor}). `score()` returns float32 CPU
    tensors. With `offload=True`, scorers stay on the CPU and each group of scorers sharing weights moves to
    `device` only while it scores. With `cuda_graphs=True` (ignored off CUDA and with offloading), scorer forwards
    replay CUDA graphs, and `score_pairs_async` scores on a side stream, overlapping the training step.
    """

    def __init__(self, scorers: Dict[str, Scorer], device=None, offload: bool = False, cuda_graphs: bool = False):
        self.scorers = dict(scorers)
        self.names = list(self.scorers)
        self.offload = offload
        self.device = torch.device(device) if device is not None else next(iter(self.scorers.values())).device
        preprocessors = {}
        for scorer in self.scorers.values():
            preprocessors.setdefault(scorer.preprocess_key, scorer.preprocessor)
        self.preprocessor = MultiPreprocessor(preprocessors)
        self._groups = self._share_groups()
        self.cuda_graphs = cuda_graphs
        self._stream = None
        self._set_graphs()

    def set_cuda_graphs(self, enabled: bool):
        """Turns CUDA-graph forwards (and asynchronous `score_pairs_async`) on or off."""
        self.cuda_graphs = bool(enabled)
        self._set_graphs()

    def _set_graphs(self):
        # Graphs hold device pointers: a new runner whenever the weights move.
        use = self.cuda_graphs and not self.offload and self.device.type == "cuda"
        runner = CUDAGraphRunner() if use else None
        for scorer in self.scorers.values():
            scorer.graphs = runner

    @property
    def temperatures(self) -> Dict[str, float]:
        return {name: scorer.temperature for name, scorer in self.scorers.items()}

    @property
    def weights(self) -> Dict[str, float]:
        return {name: scorer.weight for name, scorer in self.scorers.items()}

    def _share_groups(self) -> List[List[str]]:
        """Groups scorers that hold a common module, so they move (offload) and run together."""
        groups: List[List[str]] = []
        owners: List[set] = []
        for name, scorer in self.scorers.items():
            ids = {id(m) for m in scorer.modules()}
            merged = [i for i, owned in enumerate(owners) if owned & ids]
            group, owned = [name], set(ids)
            for i in reversed(merged):
                group = groups.pop(i) + group
                owned |= owners.pop(i)
            groups.append(group)
            owners.append(owned)
        order = {name: i for i, name in enumerate(self.names)}
        return sorted((sorted(g, key=order.get) for g in groups), key=lambda g: order[g[0]])

    def preprocess(self, images) -> Dict[str, torch.Tensor]:
        return self.preprocessor(images)

    def to(self, device) -> "ScorerSet":
        self.device = torch.device(device)
        if not self.offload:
            for scorer in self.scorers.values():
                scorer.to(self.device)
        self._stream = None
        self._set_graphs()
        return self

    def _score_on_device(self, inputs, prompts, duplicates=None) -> Dict[str, torch.Tensor]:
        """Scores every metric, running each image once per distinct prompt (once in all for prompt-free metrics).

        `duplicates` is what `_tensor_duplicates(inputs, prompts)` returns, when the caller has already found it."""
        if not isinstance(inputs, dict):
            inputs = self.preprocessor(inputs)
        prompts = _as_prompt_list(prompts, len(next(iter(inputs.values()))))
        if duplicates is None:
            duplicates = _tensor_duplicates(inputs, prompts)
        subsets = {}

        def rows_for(scorer):
            """(inputs, prompts, canonical) to score: the unique rows only, shared by the scorers that use them."""
            canonical = duplicates[1] if scorer.prompt_free else duplicates[0]
            if canonical is None:
                return inputs, prompts, None
            rows = tuple(sorted(set(canonical)))
            if rows not in subsets:
                subsets[rows] = (_select_rows(inputs, list(rows)), [prompts[i] for i in rows])
            return (*subsets[rows], canonical)

        context = ScoreContext(rows_unique=True)
        results = {}
        for group in self._groups:
            if self.offload:
                for name in group:
                    self.scorers[name].to(self.device)
            try:
                for name in group:
                    scorer = self.scorers[name]
                    unique_inputs, unique_prompts, canonical = rows_for(scorer)
                    values = scorer.score_on_device(unique_inputs, unique_prompts, context=context)
                    results[name] = values if canonical is None else _expand_rows(values, canonical)
            finally:
                if self.offload:
                    for name in group:
                        self.scorers[name].to("cpu")
        return results

    def score(self, inputs, prompts) -> Dict[str, torch.Tensor]:
        """Scores images (a list of PIL images or the dict the preprocessor returns) against their prompts.
        Returns {metric name: float32 CPU tensor [N]}."""
        values = _scores_to_host(self.names, self._score_on_device(inputs, prompts))
        return {name: values[i].clone() for i, name in enumerate(self.names)}

    def score_pairs_async(self, pair_inputs: Dict[str, torch.Tensor], prompts) -> PendingScores:
        """Starts scoring a batch of pairs and returns at once on CUDA (with `cuda_graphs`), else when done.

        `pair_inputs` maps each preprocess key to a [B, 2, 3, H, W] tensor (the training collator's
        `scorer_inputs`); `prompts` has one prompt per pair. On CUDA the work runs on a side stream, so it overlaps
        whatever the training step queues next; `result()` of the returned PendingScores waits for it.
        """
        import time

        start = time.perf_counter()
        count = len(next(iter(pair_inputs.values())))
        prompts = _as_prompt_list(prompts, count)
        asynchronous = self.cuda_graphs and not self.offload and self.device.type == "cuda"
        stream_context = contextlib.nullcontext()
        if asynchronous:
            if self._stream is None:
                self._stream = torch.cuda.Stream(device=self.device)
            # Orders scoring after work already queued (e.g. weights moved or edited); at the top of a training step
            # that queue has been drained by the previous step's synchronisation, so this costs nothing.
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
            stream_context = torch.cuda.stream(self._stream)
        # Identical images are found on the host copies (before the transfer, so without a device synchronisation).
        duplicates = _pair_duplicates(pair_inputs, prompts + prompts)
        with stream_context:
            # Moved to the device before the [B, 2] -> [2B] reshuffle (a copy) so that copy runs on the device.
            inputs = {}
            for key, value in pair_inputs.items():
                value = value.to(self.device, non_blocking=True) if asynchronous else value
                inputs[key] = value.transpose(0, 1).reshape(-1, *value.shape[2:])
            scores = self._score_on_device(inputs, prompts + prompts, duplicates=duplicates)
            values = _scores_to_host(self.names, scores, non_blocking=asynchronous)
            event = None
            if asynchronous:
                event = torch.cuda.Event()
                event.record(self._stream)
        return PendingScores(self.names, values, count, event, host_seconds=time.perf_counter() - start)

    def score_pairs(self, inputs_0, inputs_1, prompts):
        """Scores both images of each pair in one call (one forward per model, each prompt encoded once).

        `inputs_0` / `inputs_1` are lists of PIL images or dicts from `preprocessor`; `prompts` has one prompt per
        pair. Returns (scores_0, scores_1), each {metric name: float32 CPU tensor [B]}.
        """
        if isinstance(inputs_0, dict) != isinstance(inputs_1, dict):
            raise ValueError("Give both sides of the pairs in the same form (PIL lists or preprocessed dicts).")
        if isinstance(inputs_0, dict):
            inputs = {key: torch.cat([inputs_0[key], inputs_1[key]]) for key in inputs_0}
            count = len(next(iter(inputs_0.values())))
        else:
            inputs_0, inputs_1 = _as_image_list(inputs_0), _as_image_list(inputs_1)
            inputs, count = inputs_0 + inputs_1, len(inputs_0)
        prompts = _as_prompt_list(prompts, count)
        scores = self.score(inputs, prompts + prompts)
        return {m: v[:count] for m, v in scores.items()}, {m: v[count:] for m, v in scores.items()}

    def __repr__(self):
        return f"ScorerSet({list(self.scorers.values())}, offload={self.offload})"


def build_scorers(
    names: Union[str, Sequence[str], None] = None,
    config: Union[str, dict, None] = None,
    device=None,
    dtype=None,
    cache: Optional[ScoreCache] = None,
    offload: bool = False,
    cuda_graphs: bool = False,
) -> ScorerSet:
    """Builds a ScorerSet from metric names (a list or a comma-separated string; default the four of the paper) and
    a reward config (path, dict or None). `device` / `dtype`, when given, override the config's. Scorers that use the
    same model (e.g. `clip` and `aesthetic` with one CLIP path and dtype) share one model object."""
    names = _parse_names(names)
    for name in names:  # fail on a bad name before loading any model
        _scorer_class(name)
    config = load_reward_config(config)
    pool: dict = {}
    scorers = {}
    target_device = device
    for name in names:
        options = dict(config.get(name, {}))
        if device is not None:
            options["device"] = device
        if dtype is not None:
            options["dtype"] = dtype
        if offload:
            target_device = target_device if target_device is not None else options.get("device")
            options["device"] = "cpu"
        if cache is not None:
            options["cache"] = cache
        scorers[name] = build_scorer(name, model_pool=pool, **options)
    return ScorerSet(scorers, device=target_device, offload=offload, cuda_graphs=cuda_graphs)
