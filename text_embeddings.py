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
"""Text embeddings of captions, optionally cached per caption, shared by the families with large text encoders.

`--cache_text_embeddings` encodes every distinct caption once and keeps the embeddings in host memory, so the text
encoders (SDXL's two CLIPs, SD3's three encoders, FLUX's CLIP and T5-XXL, about 9.5 GB in bf16 alone) can be freed
before training. Each family gives `PromptEmbeddings` its own tokenizer and encoder functions.
"""

from collections import OrderedDict

import torch


TEXT_ENCODE_BATCH_SIZE = 32


class PromptEmbeddings:
    """Captions -> a family's text conditioning: a tuple of tensors with one row per caption (SDXL, SD3 and FLUX:
    `(prompt_embeds, pooled_prompt_embeds)`), on the training device.

    `tokenize` (`list[str] -> dict[str, Tensor]`) is what the DataLoader workers run (the collator's `tokenize_fn`);
    `encode` (`dict[str, Tensor] -> tuple[Tensor, ...]`) runs the text encoders. Without a cache, the token ids of
    each batch are encoded at every micro-step. With `cache=True` every distinct caption is encoded once and kept in
    CPU memory (in the encoders' dtype), keyed by its text; `max_entries` bounds the cache (the least recently used
    caption goes first). `precompute` fills the cache up front, after which `release_text_encoders` drops the
    encoders: from then on a caption that is not cached is an error.
    """

    def __init__(self, tokenize, encode, device, cache=False, max_entries=None):
        self.tokenize = tokenize
        self.encode = encode
        self.device = device
        self.cache = OrderedDict() if cache else None
        self.max_entries = max_entries

    @property
    def cached(self):
        return self.cache is not None

    @property
    def released(self):
        """True once the text encoders were freed: only cached captions can be looked up."""
        return self.encode is None

    @torch.no_grad()
    def encode_captions(self, captions):
        """Embeddings of `captions` from the text encoders, on the training device (no cache involved)."""
        if self.released:
            shown = ", ".join(repr(c) for c in list(captions)[:3])
            raise RuntimeError(
                f"Captions {shown} are not in the text-embedding cache (they were not precomputed), and the text"
                " encoders were freed after --cache_text_embeddings encoded the dataset's captions and the validation"
                " prompts. Sample or validate with those prompts, or train without --cache_text_embeddings."
            )
        return tuple(e.to(self.device) for e in self.encode(self.tokenize(list(captions))))

    def precompute(self, captions, batch_size=TEXT_ENCODE_BATCH_SIZE, max_bytes=None):
        """Encodes every distinct caption of `captions` that is not cached yet; returns how many were encoded.

        With `max_bytes`, stops with a ValueError as soon as the first batch shows that the whole cache would need
        more host memory than that."""
        todo = [c for c in dict.fromkeys(captions) if c not in self.cache]
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            stored = self._store(chunk, self.encode_captions(chunk))
            if start == 0 and max_bytes is not None:
                per_caption = sum(e.numel() * e.element_size() for e in next(iter(stored.values())))
                needed = per_caption * (len(todo) + len(self.cache) - len(stored))
                if needed > max_bytes:
                    raise ValueError(
                        f"--cache_text_embeddings would need {needed / 2**30:.1f} GiB of host memory for"
                        f" {len(todo)} distinct captions ({per_caption / 2**20:.2f} MiB each), more than the"
                        f" {max_bytes / 2**30:.1f} GiB it may take on this machine. Lower --max_sequence_length, train"
                        " on fewer rows (--max_train_samples), bound the cache with --text_embeddings_cache_size N (the"
                        " text encoders then stay loaded), or drop --cache_text_embeddings."
                    )
        return len(todo)

    def _store(self, captions, embeddings):
        # One clone per caption, so that an evicted entry does not keep its whole batch alive.
        rows = zip(*(e.detach().cpu() for e in embeddings))
        entries = {caption: tuple(t.clone() for t in row) for caption, row in zip(captions, rows)}
        for caption, entry in entries.items():
            self.cache[caption] = entry
            self.cache.move_to_end(caption)
        if self.max_entries is not None:
            while len(self.cache) > self.max_entries:
                self.cache.popitem(last=False)
        return entries

    def cache_bytes(self):
        return sum(t.numel() * t.element_size() for entry in self.cache.values() for t in entry)

    def release_text_encoders(self):
        """Drops this object's reference to the text encoders (the family drops its own)."""
        self.encode = None

    def lookup(self, captions):
        """Embeddings of any captions: from the cache when there is one (encoding and caching the missing ones while
        the encoders are loaded), else from the encoders."""
        captions = list(captions)
        if not self.cached:
            return self.encode_captions(captions)
        found, missing = {}, []
        for caption in dict.fromkeys(captions):
            if caption in self.cache:
                self.cache.move_to_end(caption)
                found[caption] = self.cache[caption]
            else:
                missing.append(caption)
        if missing:
            found.update(self._store(missing, self.encode_captions(missing)))
        return tuple(
            torch.stack([found[c][k] for c in captions]).to(self.device, non_blocking=True)
            for k in range(len(found[captions[0]]))
        )

    def __call__(self, batch, index):
        """Embeddings of the training captions of the pairs `index` of `batch`."""
        if self.cached:
            return self.lookup([batch["train_captions"][i] for i in index.tolist()])
        if self.released:
            raise RuntimeError("The text encoders were freed but the text embeddings are not cached.")
        token_ids = {key: value[index.to(value.device)] for key, value in batch.items() if key.startswith("input_ids")}
        with torch.no_grad():
            return tuple(e.to(self.device) for e in self.encode(token_ids))
