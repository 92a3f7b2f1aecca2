"""The frozen model as a soft-prompt black box, on this machine.

One call, :meth:`LocalBlackBox.logits`, scores a whole CMA-ES population: P candidate prompts x B
examples -> [P, B, C] class scores. Examples are sorted by length and cut into chunks under a token
cap (no padding waste, bounded memory); everything runs under ``torch.inference_mode()``.

Heads (``head=``):

* ``encoder`` - a sentence encoder (the MiniLM default): mean-pool the example tokens and score
  each class by cosine similarity to the embedding of its label description. The prompt positions
  are left out of the pooling so that a neutral prompt keeps the zero-shot geometry.
* ``mlm`` - masked LM + verbalizer (BERT/RoBERTa): the label words' logits at the [MASK] token.
* ``causal`` - causal LM + verbalizer (GPT-2/Llama): the label words' next-token logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
import torch.nn.functional as F

from bbfl.blackbox import chunking
from bbfl.blackbox.base import QueryCounter
from bbfl.blackbox.causal import (
    PROMPT_POSITIONS,
    ids_keeping_tail,
    scores_after_input,
    split_off_tail,
    template_tail,
)
from bbfl.blackbox.loading import DTYPES, Head, default_model_path, load_model, mlm_head, pick_head, resolve_device
from bbfl.blackbox.placement import PromptPlacement, added_to_embedding_output, prompt_token_ids, resolve_placement
from bbfl.blackbox.prefix import prefix_encode, supports_prefix
from bbfl.exceptions import ConfigError
from bbfl.models import resolve_model

if TYPE_CHECKING:
    from bbfl.data import Split, Task

PromptAttention = Literal["auto", "prefix", "full"]


@dataclass
class Encoded:
    """A split tokenized once for one task and head, sorted by length for bucketing."""

    input_ids: list[torch.Tensor]  # one 1-D tensor per example, in sorted order
    read_at: torch.Tensor  # [B] token index the head reads ([MASK] or last token); unused by encoder
    labels: torch.Tensor  # [B] in the original order
    order: torch.Tensor  # [B] original index of each sorted example
    n_tokens: int  # real tokens, without prompt

    def __len__(self) -> int:
        return len(self.input_ids)

    def subset(self, indices: torch.Tensor | list[int]) -> Encoded:
        """The examples at ``indices`` (original order), still length-sorted: a minibatch without re-tokenizing."""
        wanted = torch.zeros(len(self), dtype=torch.bool)
        wanted[torch.as_tensor(indices, dtype=torch.long)] = True
        keep = torch.nonzero(wanted[self.order], as_tuple=True)[0]  # sorted positions, in sorted order
        original = self.order[keep]
        return Encoded(
            input_ids=[self.input_ids[int(j)] for j in keep],
            read_at=self.read_at[keep],
            labels=self.labels[torch.sort(original).values],
            order=torch.argsort(torch.argsort(original)),  # rank of each kept example in original order
            n_tokens=sum(len(self.input_ids[int(j)]) for j in keep),
        )


class LocalBlackBox:
    """A frozen transformers model that scores candidate soft prompts.

    Parameters
    ----------
    model : a local model directory or hub name; ``None`` is the embedded MiniLM.
    head : how class scores are read out (see module docstring); ``auto`` picks from the config.
    device, dtype : where and in which precision the frozen model runs.
    prompt_attention : ``full`` (plain concatenation: the BBT paper's function) or ``prefix`` (prompt
        tokens read only each other: faster, but another function, see :mod:`bbfl.blackbox.prefix`);
        ``auto`` = ``full``.
    prompt_placement : ``after_embeddings`` (official BBT: the prompt is added to the embedding layer's
        output at prompt tokens 1000..), ``inputs_embeds`` (fed as word embeddings), or ``auto``
        (official for MLM heads on BERT/RoBERTa, else ``inputs_embeds``); see :mod:`bbfl.blackbox.placement`.
    max_length : examples are truncated to this many tokens.
    max_tokens : cap on candidate x example x token cells per forward (memory bound).
    budget : hard cap on queries (one candidate on one batch); ``None`` = unlimited.
    similarity_scale : the encoder head's logits are ``scale * cosine``.
    prompt_position : ``start`` (the papers': prompt first) or ``after_input`` (causal head only:
        ``[input][prompt][template tail]``, the input's key/values shared over the population, see
        :mod:`bbfl.blackbox.causal`).
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        head: Head = "auto",
        device: str = "cpu",
        dtype: str = "float32",
        prompt_attention: PromptAttention = "auto",
        prompt_placement: PromptPlacement = "auto",
        max_length: int = 128,
        max_tokens: int = 32768,
        budget: int | None = None,
        similarity_scale: float = 20.0,
        prompt_position: str = "start",
    ) -> None:
        from transformers import AutoConfig, AutoTokenizer

        if dtype not in DTYPES:
            raise ConfigError(f"unknown --dtype {dtype!r}; expected one of {sorted(DTYPES)}")
        self.model_name = model or default_model_path()
        self.device = resolve_device(device)
        self.dtype = DTYPES[dtype]
        if max_length < 8 or max_tokens < 1:
            raise ConfigError(f"max_length must be >= 8 and max_tokens >= 1, got {max_length}, {max_tokens}")
        self.max_length, self.max_tokens, self.similarity_scale = max_length, max_tokens, similarity_scale
        self.counter = QueryCounter(budget)
        path = resolve_model(self.model_name)  # named models and .gguf files: a cached transformers dir
        try:
            config = AutoConfig.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot load model {self.model_name!r}: {exc}") from exc
        self.head = pick_head(config) if head == "auto" else head
        if self.head not in ("encoder", "mlm", "causal"):
            raise ConfigError(f"unknown head {head!r}; expected auto, encoder, mlm or causal")
        if prompt_position not in PROMPT_POSITIONS or (prompt_position != "start" and self.head != "causal"):
            raise ConfigError(f"prompt_position {prompt_position!r}: expected start, or after_input with a causal head")
        self.prompt_position = prompt_position
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = load_model(path, self.head, self.dtype).to(self.device).eval()
        self.model.requires_grad_(False)
        self.body = self.model.base_model
        if prompt_attention == "auto":  # the paper's function; prefix is an opt-in variant
            prompt_attention = "full"
        if prompt_attention not in ("full", "prefix"):
            raise ConfigError(f"unknown prompt_attention {prompt_attention!r}; expected auto, full or prefix")
        if prompt_attention == "prefix" and not supports_prefix(self.body):
            raise ConfigError(f"prompt_attention='prefix' needs a BERT/RoBERTa encoder, not {config.model_type!r}")
        self.prompt_attention = prompt_attention
        self.prompt_placement = resolve_placement(prompt_placement, self.head, supports_prefix(self.body))
        self._task_key: tuple | None = None

    # ------------------------------------------------------------------ model facts
    @property
    def hidden_size(self) -> int:
        return self.word_embeddings.weight.shape[1]

    @property
    def word_embeddings(self) -> torch.nn.Embedding:
        return self.model.get_input_embeddings()

    @property
    def embedding_std(self) -> float:
        """Std of the word-embedding matrix (BBT's sigma_emb for scaling the projection)."""
        return float(self.word_embeddings.weight.float().std())

    def token_embeddings(self, text_or_token: str, length: int) -> torch.Tensor:
        """[length, H] embeddings of a token repeated, or of a text's tokens cycled (a prompt init)."""
        if text_or_token in self.tokenizer.all_special_tokens:
            ids = [self.tokenizer.convert_tokens_to_ids(text_or_token)]
        else:
            ids = self.tokenizer(text_or_token, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ConfigError(f"prompt init {text_or_token!r} has no tokens")
        ids = torch.tensor([ids[i % len(ids)] for i in range(length)], device=self.device)
        return self.word_embeddings(ids).detach().float()

    # ------------------------------------------------------------------ data
    def encode(self, task: Task, split: Split) -> Encoded:
        """Tokenize a split once (the head decides which template is used)."""
        task = task.for_head(self.head)
        self._prepare_task(task)
        if self.head == "encoder":
            texts = task.format_for_encoder(split)
        elif self.head == "mlm":
            texts = task.format(split, self.tokenizer.mask_token)
        else:  # causal: the prompt ends where the label word would follow
            texts = task.format_before_mask(split)
            if self.prompt_position == "after_input":  # the prompt goes between the input and this tail
                tail = template_tail(task.template)
                texts = split_off_tail(texts, tail)
                self._tail_ids = torch.tensor(self.tokenizer(tail, add_special_tokens=False)["input_ids"])
        if self.head == "causal" and self.prompt_position != "after_input":
            enc = ids_keeping_tail(self.tokenizer, texts, task.template, self.max_length)
        else:
            enc = self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]
        if self.head == "mlm":
            enc = [_keep_mask_in_view(ids, self.tokenizer.mask_token_id, t) for ids, t in zip(enc, texts)]
        lengths = np.array([len(ids) for ids in enc])
        order = np.argsort(lengths, kind="stable")
        ids_sorted = [torch.tensor(enc[i], device=self.device) for i in order]
        if self.head == "mlm":
            read_at = [int((ids == self.tokenizer.mask_token_id).nonzero()[0]) for ids in ids_sorted]
        else:
            read_at = [len(ids) - 1 for ids in ids_sorted]
        return Encoded(
            input_ids=ids_sorted,
            read_at=torch.tensor(read_at, device=self.device),
            labels=torch.as_tensor(split.labels, device=self.device),
            order=torch.as_tensor(order, device=self.device),
            n_tokens=int(lengths.sum()),
        )

    def perturbed(self, data: Encoded, rate: float, seed: int) -> Encoded:
        """A copy of ``data`` with ``rate`` of each example's ordinary tokens replaced by random ones.

        FedBPT's fitness divides the clean loss by the loss on such data, to keep the prompt from
        over-fitting a client's few examples. Special tokens and [MASK] stay in place.
        """
        if not 0.0 <= rate <= 1.0:
            raise ConfigError(f"perturbation rate must be in [0, 1], got {rate}")
        rng = torch.Generator().manual_seed(seed)
        special = torch.tensor(sorted(set(self.tokenizer.all_special_ids)))
        vocab = self.word_embeddings.num_embeddings
        lengths = [len(ids) for ids in data.input_ids]
        ids = torch.cat([x.cpu() for x in data.input_ids])  # all examples at once, split back below
        flip = ~torch.isin(ids, special) & (torch.rand(len(ids), generator=rng) < rate)
        candidates = torch.randint(0, vocab, (len(ids),), generator=rng)
        candidates = torch.where(torch.isin(candidates, special), ids, candidates)
        out = [x.to(self.device) for x in torch.split(torch.where(flip, candidates, ids), lengths)]
        return Encoded(out, data.read_at, data.labels, data.order, data.n_tokens)

    def _prepare_task(self, task: Task) -> None:
        key = (task.name, tuple(task.labels), tuple(task.label_words), tuple(task.label_descriptions))
        if key == self._task_key:
            return
        if self.head == "encoder":
            self.label_matrix = self._embed_texts(task.label_descriptions)  # [C, H], unit norm
        else:
            self.label_ids = torch.tensor([self._label_token(w) for w in task.label_words], device=self.device)
        self._task_key = key

    def _label_token(self, word: str) -> int:
        # BPE vocabularies (GPT-2, RoBERTa) store a word after a space as its own token.
        space = " " if self.head == "causal" or getattr(self.body.config, "model_type", "") == "roberta" else ""
        ids = self.tokenizer(space + word, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ConfigError(f"label word {word!r} has no token in {self.model_name}")
        return ids[0]

    @torch.no_grad()  # not inference_mode: white-box tuning backprops through scores built on these
    def _embed_texts(self, texts: list[str]) -> torch.Tensor:
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        enc = {k: v.to(self.device) for k, v in enc.items()}
        hidden = self.body(**enc).last_hidden_state.float()
        return F.normalize(_mean_pool(hidden, enc["attention_mask"]), dim=-1)

    # ------------------------------------------------------------------ scoring
    def logits(self, prompts: torch.Tensor | None, data: Encoded) -> torch.Tensor:
        """[P, B, C] class scores of each candidate prompt ([P, L, H]; ``None`` = no prompt) on ``data``.

        Counts P queries (BBT's unit) against the budget, before running.
        """
        n_cand = 1 if prompts is None else prompts.shape[0]
        n_prompt = 0 if prompts is None else prompts.shape[1]
        tokens = n_cand * (data.n_tokens + n_prompt * len(data))
        with self.counter.charge(queries=n_cand, examples=n_cand * len(data), tokens=tokens):
            with torch.inference_mode():
                out = self.forward(prompts, data)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
        return out

    def paired_logits(self, prompts: torch.Tensor, data: Encoded) -> torch.Tensor:
        """[K, B, C] scores where example b reads its own prompt ``prompts[k, b]`` ([K, B, L, H]).

        For input-dependent prompts (ZooPFL's input surgery): K versions of a per-example prompt,
        e.g. the unperturbed one and K - 1 zeroth-order probes. Counts K queries of B examples.
        """
        if prompts.dim() != 4 or prompts.shape[1] != len(data):
            raise ConfigError(f"paired prompts must be [K, {len(data)}, L, H], got {tuple(prompts.shape)}")
        n_cand, _, n_prompt, _ = prompts.shape
        tokens = n_cand * (data.n_tokens + n_prompt * len(data))
        with self.counter.charge(queries=n_cand, examples=n_cand * len(data), tokens=tokens):
            with torch.inference_mode():
                out = self.forward(prompts, data, paired=True)
        return out

    def forward(self, prompts: torch.Tensor | None, data: Encoded, paired: bool = False) -> torch.Tensor:
        """The scoring pass itself, without accounting or inference mode (white-box tuning backprops it).

        ``paired``: prompts are [K, B, L, H], one per example (see :meth:`paired_logits`).
        """
        if prompts is None:
            prompts = torch.zeros(1, 0, self.hidden_size, device=self.device)
        prompts = prompts.to(self.device, self.dtype)
        if paired:
            prompts = prompts[:, data.order.to(prompts.device)]  # into the length order of data.input_ids
        n_cand, n_prompt = prompts.shape[0], prompts.shape[-2]
        rows, row = [], []
        for cand, ex in chunking.chunks(n_cand, [len(t) + n_prompt for t in data.input_ids], self.max_tokens):
            chunk = prompts[cand, ex] if paired else prompts[cand]
            row.append(self._score_chunk(chunk, data, ex).float())
            if ex.stop == len(data):  # this candidate chunk has seen every example
                rows.append(torch.cat(row, 1))
                row = []
        by_length = torch.cat(rows, 0)  # [P, B] in length order
        return by_length[:, torch.argsort(data.order)]

    def _score_chunk(self, prompts: torch.Tensor, data: Encoded, ex: slice) -> torch.Tensor:
        ids = data.input_ids[ex]
        if self.prompt_position == "after_input":
            return scores_after_input(self.model, prompts, ids, self._tail_ids, self.label_ids, self._pad_id())
        input_ids = torch.nn.utils.rnn.pad_sequence(ids, batch_first=True, padding_value=self._pad_id())
        mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(t) for t in ids], batch_first=True)
        insert_at = self._insert_at()
        if self.prompt_attention == "prefix" and prompts.dim() == 3:  # per-example prompts take the full path
            prompt_ids = self._prompt_ids(prompts.shape[-2])
            hidden = prefix_encode(self.body, prompts, input_ids, mask, insert_at, prompt_ids)  # [p, b, T, H]
        else:
            hidden = self._full_encode(prompts, input_ids, mask, insert_at)
        return self._read_out(hidden, mask, data.read_at[ex])

    def _full_encode(self, prompts, input_ids, mask, insert_at) -> torch.Tensor:
        n_cand, n_prompt = prompts.shape[0], prompts.shape[-2]
        n_ex = input_ids.shape[0]
        per_example = prompts if prompts.dim() == 4 else prompts[:, None].expand(-1, n_ex, -1, -1)
        full_mask = torch.cat([mask[:, :insert_at], mask.new_ones(n_ex, n_prompt), mask[:, insert_at:]], 1)
        full_mask = full_mask.repeat(n_cand, 1)
        prompt_ids = self._prompt_ids(n_prompt)
        if prompt_ids is not None and n_prompt > 0:  # official BBT: A z added to the embedding layer's output
            ids = torch.cat([input_ids[:, :insert_at], prompt_ids.expand(n_ex, -1), input_ids[:, insert_at:]], 1)
            zeros = per_example.new_zeros(n_cand, n_ex, 1, per_example.shape[-1])
            before, after = (
                zeros.expand(-1, -1, insert_at, -1),
                zeros.expand(-1, -1, input_ids.shape[1] - insert_at, -1),
            )
            offset = torch.cat([before, per_example, after], 2).flatten(0, 1)
            with added_to_embedding_output(self.body, offset):
                hidden = self.body(input_ids=ids.repeat(n_cand, 1), attention_mask=full_mask).last_hidden_state
        else:
            words = self.word_embeddings(input_ids)[None].expand(n_cand, -1, -1, -1)
            embeds = torch.cat([words[:, :, :insert_at], per_example, words[:, :, insert_at:]], 2).flatten(0, 1)
            hidden = self.body(inputs_embeds=embeds, attention_mask=full_mask).last_hidden_state
        hidden = hidden.unflatten(0, (n_cand, n_ex))
        return torch.cat([hidden[:, :, :insert_at], hidden[:, :, insert_at + n_prompt :]], 2)

    def _read_out(self, hidden: torch.Tensor, mask: torch.Tensor, read_at: torch.Tensor) -> torch.Tensor:
        if self.head == "encoder":
            pooled = F.normalize(_mean_pool(hidden.float(), mask), dim=-1)
            return self.similarity_scale * pooled @ self.label_matrix.T
        picked = hidden[:, torch.arange(hidden.shape[1], device=hidden.device), read_at]  # [p, b, H]
        return self.token_head(picked)[..., self.label_ids].float()

    def token_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits of hidden states: the causal LM's output embeddings, or the masked-LM head."""
        head = self.model.get_output_embeddings() if self.head == "causal" else mlm_head(self.model)
        return head(hidden)

    def _prompt_ids(self, length: int) -> torch.Tensor | None:
        # the tokens at the prompt positions under the official placement; None = prompts are word embeddings
        if self.prompt_placement != "after_embeddings":
            return None
        return prompt_token_ids(length, self.word_embeddings.num_embeddings, self.device)

    def _insert_at(self) -> int:
        # after [CLS]/<s>/<bos> when the tokenizer adds one; at the very start otherwise (GPT-2)
        first = self.tokenizer("a")["input_ids"][0]
        return 1 if first in (self.tokenizer.cls_token_id, self.tokenizer.bos_token_id) else 0

    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else (self.tokenizer.eos_token_id or 0)


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.to(hidden.dtype)
    return (hidden * weights[..., None]).sum(-2) / weights.sum(-1, keepdim=True).clamp(min=1)


def _keep_mask_in_view(ids: list[int], mask_id: int, text: str) -> list[int]:
    if mask_id not in ids:
        raise ConfigError(f"the [MASK] token was truncated away; raise max_length (example: {text[:60]!r}...)")
    return ids
