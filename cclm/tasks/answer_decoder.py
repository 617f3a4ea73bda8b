"""CCLM's VQA head (``head: cclm`` for xGQA and easy-VQA): a generative answer decoder that ranks the answer list.

As the reference (``models/model_vqa.py``), the decoder is a causal language model over answer tokens whose layers
cross-attend to the question's fused states (the question attending to the image through the fusion stack). It
starts as a copy of the backbone: its word/position embeddings, its fusion layers (self-attention, now causal, and
cross-attention, now to the question) and its MLM head, tied to the decoder's own word embeddings.

- Training: the answer's summed token negative log-likelihood (``<s> answer </s>``, each token predicted from the
  ones before it), averaged over questions (the reference's answer-weighted loss with one answer per question,
  weight 1).
- Prediction (:meth:`AnswerDecoder.rank`): every answer's first token is scored from ``<s>`` alone, the ``k``
  answers with the most probable first token are scored in full, and the best full score wins.

Full score = the answer's log-probability. The reference adds the first token's log-probability a second time
(ALBEF's ``rank_answer``, which CCLM copies; BLIP dropped it): ``first_token_twice=True`` reproduces that.

The answers' token ids live in buffers (saved with the head): :meth:`AnswerDecoder.set_answers`.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from cclm.model.cross_view import CrossViewModel
from cclm.model.heads import build_mlm_head
from cclm.model.text import additive_mask

K_TEST = 128  # the reference's k_test for GQA
LOGITS_PER_CHUNK = 2**27  # vocabulary logits held at once while scoring candidates (512 MiB in fp32)


class AnswerDecoder(nn.Module):
    def __init__(self, backbone: CrossViewModel):
        super().__init__()
        self.embeddings = copy.deepcopy(backbone.text.embeddings)
        self.layers = copy.deepcopy(backbone.fusion.layers)  # HF layers with cross-attention (is_decoder)
        self.lm_head = build_mlm_head(backbone.encoder_config, self.embeddings.word_embeddings)
        self.lm_head.load_state_dict(backbone.mlm_head.state_dict())
        self.register_buffer("answer_ids", torch.zeros(0, 0, dtype=torch.long))
        self.register_buffer("answer_mask", torch.zeros(0, 0, dtype=torch.long))

    # ---------------------------------------------------------------------------------------------- answers
    @property
    def has_answers(self) -> bool:
        return self.answer_ids.numel() > 0

    def set_answers(self, ids: torch.Tensor, mask: torch.Tensor) -> None:
        """The answer list's token ids [A, L] and mask (``<s> answer </s>`` then padding), row i = label i."""
        if ids.dim() != 2 or ids.shape != mask.shape:
            raise ValueError(
                f"answer ids {tuple(ids.shape)} and mask {tuple(mask.shape)}: expected [A, L] each"
            )
        if ids.shape[1] < 2 or bool((mask[:, :2].sum(1) < 2).any()):
            raise ValueError("every answer needs a start token and at least one answer token")
        if bool((ids[:, 0] != ids[0, 0]).any()):
            raise ValueError("the answers do not all begin with the same start token")
        device = self.answer_ids.device
        self.answer_ids = ids.to(device=device, dtype=torch.long)
        self.answer_mask = mask.to(device=device, dtype=torch.long)

    def answers(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and mask of the answers ``labels``, cut to the longest of them."""
        if not self.has_answers:
            raise RuntimeError(
                "the answer decoder has no answer tokens: call TaskModel.set_answer_tokens first"
            )
        ids, mask = self.answer_ids[labels], self.answer_mask[labels]
        length = int(mask.sum(1).max())
        return ids[:, :length], mask[:, :length]

    # -------------------------------------------------------------------------------------------- decoding
    def forward(
        self, ids: torch.Tensor, mask: torch.Tensor, states: torch.Tensor, states_mask: torch.Tensor
    ) -> torch.Tensor:
        """Next-token logits [N, L, vocab] of answer tokens ``ids`` [N, L] (``mask``: 1 = token) conditioned on
        the question states [N, Q, H] (``states_mask`` [N, Q])."""
        hidden = self.embeddings(input_ids=ids)
        length = ids.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=ids.device).tril()
        allowed = causal & mask[:, None, :].bool()  # [N, L, L]: earlier (and own) real tokens
        self_mask = (~allowed)[:, None].to(hidden.dtype) * torch.finfo(hidden.dtype).min
        cross_mask = additive_mask(states_mask, hidden.dtype)
        for layer in self.layers:
            hidden = layer(
                hidden,
                attention_mask=self_mask,
                encoder_hidden_states=states,
                encoder_attention_mask=cross_mask,
            )
        return self.lm_head(hidden)

    def log_likelihood(
        self, ids: torch.Tensor, mask: torch.Tensor, states: torch.Tensor, states_mask: torch.Tensor
    ) -> torch.Tensor:
        """log p(answer | question) [N]: the summed log-probability of every answer token after the start token."""
        logits = self(ids, mask, states, states_mask)[:, :-1].float()
        token_log_probs = -F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        return (token_log_probs * mask[:, 1:]).sum(1)

    def loss(self, labels: torch.Tensor, states: torch.Tensor, states_mask: torch.Tensor) -> torch.Tensor:
        """The answer LM loss of gold ``labels`` [B]: per-question summed token NLL, averaged over questions."""
        ids, mask = self.answers(labels)
        return -self.log_likelihood(ids, mask, states, states_mask).mean()

    @torch.no_grad()
    def rank(
        self,
        states: torch.Tensor,
        states_mask: torch.Tensor,
        k: int = K_TEST,
        first_token_twice: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(answer ids [B, k], their scores [B, k]), best first: the ``k`` answers whose first token is most
        probable after ``<s>``, each scored by its full log-likelihood (plus the first token's log-probability
        again with ``first_token_twice``, as the reference)."""
        if not self.has_answers:
            raise RuntimeError(
                "the answer decoder has no answer tokens: call TaskModel.set_answer_tokens first"
            )
        size, count = states.shape[0], self.answer_ids.shape[0]
        k = min(int(k), count)
        start = self.answer_ids[:1, :1].expand(size, 1)
        first_logits = self(start, torch.ones_like(start), states, states_mask)[:, 0].float()
        first = first_logits.log_softmax(dim=-1)[:, self.answer_ids[:, 1]]  # [B, A]
        first_top, candidates = first.topk(k, dim=1)
        rows = torch.arange(size, device=states.device).repeat_interleave(k)
        ids, mask = self.answers(candidates.flatten())
        chunk = max(1, LOGITS_PER_CHUNK // (ids.shape[1] * self.lm_head.decoder.out_features))
        scores = torch.cat(
            [
                self.log_likelihood(
                    ids[i : i + chunk],
                    mask[i : i + chunk],
                    states[rows[i : i + chunk]],
                    states_mask[rows[i : i + chunk]],
                )
                for i in range(0, len(rows), chunk)
            ]
        ).view(size, k)
        if first_token_twice:
            scores = scores + first_top
        scores, order = scores.sort(dim=1, descending=True, stable=True)
        return candidates.gather(1, order), scores
